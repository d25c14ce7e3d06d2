"""v* with the one-pass LM head (rome/head.py) against the plain head, in one run.

    OMP_NUM_THREADS=1 python benchmarks/head.py [--n 8] [--start 1000] [--repeats 2]

For each CounterFact record the default's v* is optimised on the embedded model (no edit is
applied) with the cached engine as it runs (the one-pass head on the CPU) and with the same
engine reading the plain head (full logits at the reads, autograd through the log-softmax),
alternating so that both share the machine's state. Prints each fact's steps and seconds,
how far apart the two v* land, and the median and total seconds per v* with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.hparams import HParams, resolve  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.rome import values as V  # noqa: E402
from romebatch.rome.keys import compute_keys, sample_prefixes  # noqa: E402
from romebatch.rome.update import current_value  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each head per fact")
    args = ap.parse_args()

    lm = load_model(None)
    hp = resolve(HParams(), lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    prefixes = sample_prefixes(lm, hp.prefixes, hp.prefix_top_k, hp.seed)
    facts = load_manifest(DATA, skip_invalid=True).facts[args.start : args.start + args.n]
    shipped = V.step_reads
    seconds: dict[str, list[float]] = {"one pass": [], "plain": []}
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; records {args.start}+{args.n}")
    for fact in facts:
        k_star, _ = compute_keys(lm, hp.layer, fact.prompt, fact.subject, prefixes)
        v_init = current_value(lm, hp.layer, k_star)
        found = {}
        for _ in range(args.repeats):
            for name, steps in (("one pass", shipped), ("plain", partial(shipped, one_pass=False))):
                V.step_reads = steps  # optimise_value looks it up at each call
                started = time.perf_counter()
                result = V.optimise_value(
                    lm,
                    hp.layer,
                    fact.prompt,
                    fact.subject,
                    fact.target_new,
                    prefixes,
                    v_init,
                    true_target=fact.target_true if hp.v_stop_beats_true else None,
                    **hp.value_options(),
                )
                seconds[name].append(time.perf_counter() - started)
                found[name] = result
        V.step_reads = shipped
        a, b = found["one pass"], found["plain"]
        apart = float((a.v_star - b.v_star).norm() / (b.v_star - v_init).norm())
        print(f"{fact.subject[:40]:40s} steps {a.steps:2d} / {b.steps:2d}   v* apart {apart:.1e}", flush=True)
    for name in seconds:
        print(f"{name:9s} median v* {statistics.median(seconds[name]):.2f} s, total {sum(seconds[name]):.1f} s")
    print(f"one pass / plain, total: {sum(seconds['one pass']) / sum(seconds['plain']):.3f}")


if __name__ == "__main__":
    main()
