"""Key statistics C = E[k kᵀ] at the edited layer (ROME §3.1, "mom2"), cached on disk.

C is the uncentred second moment of the down-projection's inputs over a text corpus
(rome/corpus.py), accumulated in float64 and stored in float32. It depends only on the base
weights below and at the layer, the corpus and the sample count, so it is computed once per
such combination and cached under `$ROMEBATCH_HOME/stats/` (rome/stats_cache.py), named by a
hash of every input that shapes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..home import romebatch_home
from ..hooks import Hook, attach
from ..lm import as_btd, make_batch, model_inputs
from ..model import LoadedModel
from .corpus import Progress, corpus_id, corpus_sequences, read_corpus, sample_corpus
from .stats_cache import UNCHECKED, checksum_metadata, key_dim, read_cached, save_cached, stamp

STATS_VERSION = 1  # bump when the computation changes: old cache files are then ignored


@dataclass
class KeyStats:
    layer: int
    mom2: torch.Tensor  # (d_ff, d_ff) float32: C = E[k kᵀ]
    tokens: int  # how many keys it averages
    cholesky: torch.Tensor | None = None  # lower factor of C + ridge, float64, set by `factor`

    def factor(self, ridge: float) -> KeyStats:
        """Factor C + ridge, or raise UserError if it is not positive definite: C from a cache
        that passed its checks but was forged, or keys that span too little for the ridge."""
        c = self.mom2.double()
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        factor, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            raise UserError(
                f"the key statistics C of layer {self.layer} ({self.tokens:,} tokens) plus the ridge "
                f"{ridge:g} are not positive definite, so no edit can be solved for",
                hint=f"delete the layer's cache under {romebatch_home() / 'stats'} to recompute it, or raise ridge",
            )
        self.cholesky = factor
        return self


@torch.inference_mode()
def second_moment(
    lm: LoadedModel,
    layers: list[int],
    sequences: list[list[int]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> dict[int, tuple[torch.Tensor, int]]:
    """E[k kᵀ] of the down-projection inputs of each layer over every real token: float32."""
    d_ff = None
    sums: dict[int, torch.Tensor] = {}
    count = 0
    top = max(layers)
    done = 0
    total = sum(len(s) for s in sequences)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = make_batch(chunk, lm.pad_id, device=lm.device)
        real = batch.attention_mask.bool()  # (B, T)
        captured: dict[int, torch.Tensor] = {}

        def keep(layer):
            def fn(x):
                captured[layer] = as_btd(x, batch)[real].double()  # (tokens, d_ff), pads dropped  # noqa: B023 (the hook runs within this iteration)

            return fn

        hooks = [Hook(lm.name("down_proj", layer), keep(layer), on="input", stop=layer == top) for layer in layers]
        with attach(lm.model, hooks):
            lm.model(**model_inputs(lm, batch), use_cache=False)
        for layer, keys in captured.items():
            d_ff = keys.shape[1]
            sums.setdefault(layer, torch.zeros(d_ff, d_ff, dtype=torch.float64, device=keys.device))
            sums[layer] += keys.T @ keys  # (d_ff, d_ff)
        count += int(real.sum())
        done += sum(len(s) for s in chunk)
        if progress:
            progress(done, total)
    return {layer: ((s / count).float().cpu(), count) for layer, s in sums.items()}


def stats_key(lm: LoadedModel, base_hash: str, layer: int, corpus_id: str, n_tokens: int, seq_len: int) -> str:
    """A hash of every input that shapes C: a different input can never share a cache file.

    C depends on every weight at and below the layer (and the sampled corpus on all of
    them), so the key holds the hash of the whole model, not just the editable weights.
    """
    canonical = json.dumps(
        {
            "version": STATS_VERSION,
            "base": base_hash,
            "model": lm.full_hash(),
            "layer": layer,
            "module": lm.name("down_proj", layer),
            "corpus": corpus_id,
            "tokens": n_tokens,
            "seq_len": seq_len,
            "dtype": str(lm.weight(layer).dtype),
            "vocab": len(lm.tokenizer),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def load_or_compute_stats(
    lm: LoadedModel,
    layers: list[int],
    base_hash: str,
    *,
    n_tokens: int,
    seq_len: int,
    seed: int,
    corpus: str | None = None,
    sampling: str = "encyclopedic",
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress | None = None,
) -> dict[int, KeyStats]:
    """C for each layer: from the cache when present and verified, else computed (all missing layers in one pass).

    A cache file is used only if its checksum, shape (d_ff × d_ff for the layer), dtype, token
    count and values all check out (`read_cached`); any other is reported through `log` and
    recomputed, and the fresh result overwrites it.
    """
    cache_dir = cache_dir or romebatch_home() / "stats"
    name = corpus_id(corpus, sampling, seed)
    paths = {
        layer: cache_dir / f"{stats_key(lm, base_hash, layer, name, n_tokens, seq_len)}.safetensors" for layer in layers
    }
    result: dict[int, KeyStats] = {}
    unchecked: list[str] = []  # caches written before checksums: said once, not once a layer
    for layer, path in paths.items():
        if not path.exists():
            continue
        cached, problem = read_cached(path, layer, key_dim(lm, layer), n_tokens)
        if cached is not None:
            result[layer] = KeyStats(layer, *cached)
            if problem == UNCHECKED:
                unchecked.append(path.name)
                stamp(path, *cached, log)
        else:
            log(f"The cached key statistics {path.name} are not valid ({problem}); computing them again.")
    if unchecked:
        log(
            f"The cached key statistics {', '.join(unchecked)} were written without a checksum (an older "
            "romebatch): their shape and values check out, so they are kept (journals were edited with "
            "them) and a checksum is recorded now."
        )
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result

    if corpus is None:
        log(
            f"Sampling {n_tokens:,} tokens of {sampling} text from the model for the key statistics "
            "(once, then cached)..."
        )
        sequences = sample_corpus(lm, n_tokens, seq_len, seed, sampling, progress=progress)
    else:
        sequences = corpus_sequences(lm, read_corpus(corpus), n_tokens, seq_len)
    log(
        f"Computing key statistics for layer(s) {', '.join(map(str, missing))} over {sum(map(len, sequences)):,} tokens..."
    )
    moments = second_moment(lm, missing, sequences, progress=progress)
    for layer, (mom2, count) in moments.items():
        result[layer] = KeyStats(layer, mom2, count)
        tensors = {"mom2": mom2.contiguous(), "tokens": torch.tensor([count])}
        save_cached(
            paths[layer],
            tensors,
            {"corpus": name, "layer": str(layer), "base": base_hash, **checksum_metadata(tensors)},
            log,
        )
    return result
