"""What the single-edit benchmarks share: the embedded model, its default settings, facts and
key statistics, read once (benchmarks/norm_penalty.py, benchmarks/prompt_key.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.hparams import HParams, resolve  # noqa: E402
from romebatch.manifest import Fact, load_manifest  # noqa: E402
from romebatch.model import LoadedModel, load_model  # noqa: E402
from romebatch.rome import load_or_compute_stats, sample_prefixes  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"


@dataclass
class Setup:
    lm: LoadedModel
    hp: HParams  # the defaults, resolved for the model
    layer: int
    facts: list[Fact]
    prefixes: list[str]
    chol: torch.Tensor  # the Cholesky factor of C (+ ridge), float64
    c: torch.Tensor  # C (+ ridge), float64


def setup(skip: int, n: int) -> Setup:
    """One thread, the embedded model with romebatch's defaults, CounterFact records skip..skip+n."""
    torch.set_num_threads(1)
    lm = load_model()
    hp = resolve(HParams(), lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    assert hp.layer is not None  # resolve sets it
    facts = load_manifest(DATA, skip_invalid=True).facts[skip : skip + n]
    prefixes = sample_prefixes(lm, hp.prefixes, hp.prefix_top_k, hp.seed)
    stats = load_or_compute_stats(lm, [hp.layer], lm.base_hash(), **hp.stats_options())[hp.layer].factor(hp.ridge)
    chol = stats.cholesky.double()
    return Setup(lm, hp, hp.layer, facts, prefixes, chol, chol @ chol.T)
