"""Key statistics C = E[k kᵀ] at the edited layer (ROME §3.1, "mom2"), cached on disk.

C is the uncentred second moment of the down-projection's inputs over a text corpus,
accumulated in float64 and stored in float32. It depends only on the base weights below
and at the layer, the corpus and the sample count, so it is computed once per such
combination and cached under `$ROMEBATCH_HOME/stats/`, named by a hash of every input
that shapes it. The paper uses 100,000 Wikipedia samples; offline, the default corpus is
text sampled from the model itself (seeded), or any plain-text / JSONL file the user gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..hooks import Hook, attach
from ..lm import as_btd, make_batch, model_inputs
from ..model import LoadedModel, romebatch_home

STATS_VERSION = 1  # bump when the computation changes: old cache files are then ignored

Progress = Callable[[int, int], None]  # (done, total) in tokens


@dataclass
class KeyStats:
    layer: int
    mom2: torch.Tensor  # (d_ff, d_ff) float32: C = E[k kᵀ]
    tokens: int  # how many keys it averages
    cholesky: torch.Tensor | None = None  # lower factor of C + ridge, float64, set by `factor`

    def factor(self, ridge: float) -> "KeyStats":
        c = self.mom2.double()
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        self.cholesky = torch.linalg.cholesky(c)
        return self


def read_corpus(path: str | Path) -> list[str]:
    """Texts from a plain-text file (one text per blank-line-separated paragraph) or JSONL ("text")."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--stats-corpus {path}: cannot read it ({error})") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"--stats-corpus {path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"--stats-corpus {path}:{number}: field 'text': expected a string")
            texts.append(record["text"])
    else:
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not texts:
        raise UserError(f"--stats-corpus {path}: no text in it")
    return texts


def corpus_sequences(lm: LoadedModel, texts: list[str], n_tokens: int, seq_len: int) -> list[list[int]]:
    """Tokenise texts and cut them into sequences of at most seq_len tokens, n_tokens in all."""
    sequences, total = [], 0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            if len(chunk) < 2:
                continue
            chunk = chunk[: n_tokens - total]
            sequences.append(chunk)
            total += len(chunk)
            if total >= n_tokens:
                return sequences
    return sequences


@torch.inference_mode()
def sample_corpus(lm: LoadedModel, n_tokens: int, seq_len: int, seed: int,
                  progress: Progress | None = None, batch_size: int = 32) -> list[list[int]]:
    """Token sequences sampled from the model itself (plain sampling from the start token)."""
    tok = lm.tokenizer
    start = next(t for t in (tok.bos_token_id, tok.eos_token_id, 0) if t is not None)
    sequences: list[list[int]] = []
    total = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while total < n_tokens:
            rows = min(batch_size, -(-(n_tokens - total) // seq_len))
            inputs = torch.full((rows, 1), start, dtype=torch.long, device=lm.device)
            out = lm.model.generate(
                inputs, attention_mask=torch.ones_like(inputs), do_sample=True, top_k=0, top_p=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=lm.pad_id,
            )
            for row in out.tolist():
                chunk = row[: n_tokens - total]
                sequences.append(chunk)
                total += len(chunk)
                if total >= n_tokens:
                    break
            if progress:
                progress(min(total, n_tokens), n_tokens)
    return sequences


@torch.inference_mode()
def second_moment(lm: LoadedModel, layers: list[int], sequences: list[list[int]],
                  batch_size: int = 16, progress: Progress | None = None) -> dict[int, tuple[torch.Tensor, int]]:
    """E[k kᵀ] of the down-projection inputs of each layer over every real token: float32."""
    d_ff = None
    sums: dict[int, torch.Tensor] = {}
    count = 0
    top = max(layers)
    done = 0
    total = sum(len(s) for s in sequences)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        batch = make_batch(chunk, lm.pad_id, device=lm.device)
        real = batch.attention_mask.bool()  # (B, T)
        captured: dict[int, torch.Tensor] = {}

        def keep(layer):
            def fn(x):
                captured[layer] = as_btd(x, batch)[real].double()  # (tokens, d_ff), pads dropped
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
    canonical = json.dumps({
        "version": STATS_VERSION, "base": base_hash, "model": lm.full_hash(), "layer": layer, "module": lm.name("down_proj", layer),
        "corpus": corpus_id, "tokens": n_tokens, "seq_len": seq_len, "dtype": str(lm.weight(layer).dtype),
        "vocab": len(lm.tokenizer),
    }, sort_keys=True)
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
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress | None = None,
) -> dict[int, KeyStats]:
    """C for each layer: from the cache when present, else computed (all missing layers in one pass)."""
    from safetensors.torch import load_file, save_file

    cache_dir = cache_dir or romebatch_home() / "stats"
    if corpus is None:
        corpus_id = f"self-sampled:seed={seed}"
    else:
        corpus_id = "file:" + hashlib.sha256(Path(corpus).read_bytes()).hexdigest()
    paths = {layer: cache_dir / f"{stats_key(lm, base_hash, layer, corpus_id, n_tokens, seq_len)}.safetensors"
             for layer in layers}
    result: dict[int, KeyStats] = {}
    for layer, path in paths.items():
        if path.exists():
            tensors = load_file(str(path))
            result[layer] = KeyStats(layer, tensors["mom2"], int(tensors["tokens"].item()))
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result

    if corpus is None:
        log(f"Sampling {n_tokens:,} tokens of text from the model for the key statistics (once, then cached)...")
        sequences = sample_corpus(lm, n_tokens, seq_len, seed, progress=progress)
    else:
        sequences = corpus_sequences(lm, read_corpus(corpus), n_tokens, seq_len)
    log(f"Computing key statistics for layer(s) {', '.join(map(str, missing))} over {sum(map(len, sequences)):,} tokens...")
    moments = second_moment(lm, missing, sequences, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for layer, (mom2, count) in moments.items():
        # Write to a temp file and rename: a crash never leaves a half-written cache entry.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        save_file({"mom2": mom2.contiguous(), "tokens": torch.tensor([count])}, tmp,
                  metadata={"corpus": corpus_id, "layer": str(layer), "base": base_hash})
        os.replace(tmp, paths[layer])
        result[layer] = KeyStats(layer, mom2, count)
    return result
