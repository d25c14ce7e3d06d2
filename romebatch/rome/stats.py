"""Key statistics C = E[k kᵀ] at the edited layer (ROME §3.1, "mom2"), cached on disk.

C is the uncentred second moment of the down-projection's inputs over a text corpus,
accumulated in float64 and stored in float32. It depends only on the base weights below
and at the layer, the corpus and the sample count, so it is computed once per such
combination and cached under `$ROMEBATCH_HOME/stats/`, named by a hash of every input
that shapes it. The paper uses 100,000 Wikipedia samples; offline, the default corpus is
text sampled from the model itself (seeded), or any plain-text / JSONL file the user gives.

A cache file is never trusted blindly: it records a sha256 of its tensors (with mom2's shape
and dtype and the token count) in its metadata, and a read checks that checksum, the shape
(d_ff × d_ff for the layer), float32, a token count from 1 to the requested number, and
finite values. A file that fails any check, or one written before checksums existed, is
named in one log line and recomputed (the new file replaces it); it is never used.

How the model's own text is sampled matters for many edits. Each edit leaks into every
other key in proportion to √(uᵀCu), which u = C⁻¹k* minimises only for keys distributed
like C; text sampled from the start token is web prose with few relation phrases
(" is a native speaker of"), so its C under-weights exactly the keys of neighbourhood
prompts, and edits leak into them twice as much as C predicts (benchmarks/RESULTS.md).
"encyclopedic" sampling starts every sequence with a short encyclopedic opener instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..home import romebatch_home
from ..hooks import Hook, attach
from ..lm import as_btd, generate_ids, make_batch, model_inputs
from ..model import LoadedModel

STATS_VERSION = 1  # bump when the computation changes: old cache files are then ignored

Progress = Callable[[int, int], None]  # (done, total) in tokens


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


def read_corpus(path: str | Path) -> list[str]:
    """Texts from a plain-text file (one text per blank-line-separated paragraph) or JSONL ("text")."""
    from ..files import open_regular_file

    path = Path(path)
    try:
        with open_regular_file(str(path), encoding="utf-8") as handle:
            raw = handle.read()
    except UserError as error:
        raise UserError(f"--stats-corpus {error.message}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--stats-corpus {path}: cannot read it ({error})") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise UserError(
                    f"--stats-corpus {path}:{number}: invalid JSON ({getattr(error, 'msg', error)})"
                ) from None
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
            chunk = ids[start : start + seq_len]
            if len(chunk) < 2:
                continue
            chunk = chunk[: n_tokens - total]
            sequences.append(chunk)
            total += len(chunk)
            if total >= n_tokens:
                return sequences
    return sequences


# Openers of the sentences an encyclopedia is made of: who someone is, where something is,
# who made it, what it speaks or plays. Generic phrases written for romebatch (no dataset's
# templates); "{}" takes a first name from NAMES. Changing either changes the corpus id,
# so cached statistics from the old list are never reused.
OPENERS = (
    "{} (born 1952) is",
    "{} was born in",
    "{} is a professional",
    "{} is a citizen of",
    "{} speaks",
    "{} plays",
    "{} works as a",
    "{} is known for",
    "{} was educated at",
    "{} died in",
    "The capital of",
    "The official language of",
    "The headquarters of",
    "The city of",
    "The river",
    "It is located in",
    "The company was founded",
    "The album was released",
    "The film was directed by",
    "The university is",
    "The team plays",
    "The village is",
    "The language is",
    "The band was formed",
    "The mountain is",
    "The airport is",
    "The newspaper was",
    "The church is",
    "The station is",
    "In 1920, the",
    "In 1875,",
    "During the war,",
    "The novel was written",
    "The game was developed by",
    "The station is owned by",
    "The car is produced by",
    "The museum is",
    "The programme was broadcast on",
    "The software is",
    "The family moved to",
    "The party was",
    "The religion of",
    "The position of",
    "Its main product is",
    "The district is",
    "The island is",
    "The species is",
    "The instrument",
)
NAMES = ("Maria", "John", "Pierre", "Hans", "Yuki", "Carlos", "Anna", "Ivan", "Ahmed", "Sofia", "Lars", "Giovanni")
# Encyclopedic sequences are short: the opener's own sentence is the fact-like part, and the
# model drifts into web prose after it (see benchmarks/RESULTS.md, "Issue 21: numbers moved
# out of code comments").
ENCYCLOPEDIC_LEN = 40
# The corpora `sample_corpus` can draw. The hyper-parameters name the same two for validation
# (hparams.STATS_SAMPLINGS); the algorithm does not import its caller's configuration, and
# tests/test_stats_sampling.py keeps the two equal.
SAMPLINGS = ("plain", "encyclopedic")


def _corpus_digest(path: str | Path) -> str:
    """sha256 of a corpus file, read as `read_corpus` reads it: a FIFO or a device is refused, not read forever."""
    with _open_corpus(path) as handle:
        try:
            return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            raise UserError(f"--stats-corpus {path}: cannot read it ({error})") from None


def check_corpus_file(path: str | Path) -> None:
    """Refuse a corpus that cannot be read (missing, a folder, a FIFO, too large) before any work."""
    with _open_corpus(path):
        pass


def _open_corpus(path: str | Path):
    from ..files import open_regular_file

    try:
        return open_regular_file(str(path), encoding=None)
    except UserError as error:
        raise UserError(f"--stats-corpus {error.message}") from None


def corpus_id(corpus: str | None, sampling: str, seed: int) -> str:
    """What names a corpus in the cache key: the file's bytes, or how the model sampled it."""
    if corpus is not None:
        return "file:" + _corpus_digest(corpus)
    if sampling == "plain":
        return f"self-sampled:seed={seed}"
    openers = hashlib.sha256(json.dumps([OPENERS, NAMES, ENCYCLOPEDIC_LEN]).encode()).hexdigest()[:16]
    return f"self-sampled:{sampling}:{openers}:seed={seed}"


@torch.inference_mode()
def sample_corpus(
    lm: LoadedModel,
    n_tokens: int,
    seq_len: int,
    seed: int,
    sampling: str = "plain",
    progress: Progress | None = None,
    batch_size: int = 32,
) -> list[list[int]]:
    """Token sequences sampled from the model itself (plain sampling, top_k 0).

    "plain": each sequence starts from the start token and is `seq_len` long.
    "encyclopedic": each starts with an opener from OPENERS (drawn with `seed`) and is
    ENCYCLOPEDIC_LEN tokens long (at most `seq_len`), the opener included.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    tok = lm.tokenizer
    start = next(t for t in (tok.bos_token_id, tok.eos_token_id, 0) if t is not None)
    rng = random.Random(seed)
    length = seq_len if sampling == "plain" else min(seq_len, ENCYCLOPEDIC_LEN)
    sequences: list[list[int]] = []
    total = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while total < n_tokens:
            rows = min(batch_size, -(-(n_tokens - total) // length))
            if sampling == "plain":
                prompts = [[start]] * rows
            else:
                openers = [rng.choice(OPENERS) for _ in range(rows)]
                prompts = [
                    [start]
                    + tok(o.format(rng.choice(NAMES)) if "{}" in o else o, add_special_tokens=False)["input_ids"]
                    for o in openers
                ]
            batch = make_batch(prompts, lm.pad_id, side="left", device=lm.device)
            width = batch.input_ids.shape[1]
            new = max(length - width, 1)  # an opener longer than the length still gets a token
            out = generate_ids(
                lm,
                batch.input_ids,
                attention_mask=batch.attention_mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=lm.pad_id,
            )
            for prompt, row in zip(prompts, out.tolist()):
                chunk = row[width - len(prompt) :][: n_tokens - total]  # without the left padding
                sequences.append(chunk)
                total += len(chunk)
                if total >= n_tokens:
                    break
            if progress:
                progress(min(total, n_tokens), n_tokens)
    return sequences


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
    count and values all check out (`_read_cached`); any other is reported through `log` and
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
        stats, problem = _read_cached(path, layer, _key_dim(lm, layer), n_tokens)
        if stats is not None:
            result[layer] = stats
            if problem == UNCHECKED:
                unchecked.append(path.name)
                _stamp(path, stats, log)
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
        _save_cached(
            paths[layer],
            tensors,
            {"corpus": name, "layer": str(layer), "base": base_hash, **_checksum_metadata(tensors)},
            log,
        )
    return result


UNCHECKED = "no checksum"


def _key_dim(lm: LoadedModel, layer: int) -> int:
    """d_ff: the width of the down-projection's input at `layer` (C is d_ff × d_ff)."""
    shape = lm.weight(layer).shape  # (d_model, d_ff), or (d_ff, d_model) for Conv1D
    return int(shape[0] if lm.adapter.conv1d else shape[1])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """What a cache file states about its own contents, checked on every read (`_read_cached`)."""
    mom2 = tensors["mom2"]
    return {
        "sha256": _digest(tensors),
        "mom2_shape": json.dumps(list(mom2.shape)),
        "mom2_dtype": str(mom2.dtype),
        "tokens": str(int(tensors["tokens"].item())),
    }


def _read_cached(path: Path, layer: int, d_ff: int, n_tokens: int) -> tuple[KeyStats | None, str]:
    """A cache file's statistics if every check passes, else (None, what is wrong in a few words).

    Checks, in order: readable; the tensors' sha256 against the metadata's; mom2 float32 of
    shape (d_ff, d_ff) as the metadata states; a token count from 1 to `n_tokens`, the same as
    the metadata's; every value finite and the diagonal (each key coordinate's mean square)
    non-negative. A file an older romebatch wrote has no checksum: it passes every other check
    or none, and is returned with the problem UNCHECKED, for the caller to stamp (recomputing
    it would change C under every journal that was edited with it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if names != {"mom2", "tokens"}:
                return None, f"it holds {sorted(names)}, not mom2 and tokens"
            tensors = {name: handle.get_tensor(name) for name in names}
    except Exception as error:  # SafetensorError, OSError, a bad header: unreadable
        return None, f"unreadable: {(str(error).splitlines() or [type(error).__name__])[0]}"
    stamped = "sha256" in metadata
    if stamped and _digest(tensors) != metadata["sha256"]:
        return None, "its checksum does not match its contents"
    mom2, tokens = tensors["mom2"], tensors["tokens"]
    if mom2.dtype != torch.float32 or (stamped and metadata.get("mom2_dtype") != str(mom2.dtype)):
        return None, f"mom2 is {mom2.dtype}, not torch.float32"
    if tuple(mom2.shape) != (d_ff, d_ff) or (stamped and metadata.get("mom2_shape") != json.dumps([d_ff, d_ff])):
        return None, f"mom2 has shape {tuple(mom2.shape)}, not ({d_ff}, {d_ff}) for layer {layer}"
    if tokens.numel() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        return None, "its token count is not one whole number"
    count = int(tokens.item())
    if not 0 < count <= n_tokens or (stamped and metadata.get("tokens") != str(count)):
        return None, f"token count {count} is not between 1 and {n_tokens}"
    if not bool(torch.isfinite(mom2).all()):
        return None, "mom2 holds NaN or infinite values"
    if bool((mom2.diagonal() < 0).any()):
        return None, "mom2 has a negative diagonal entry"
    return KeyStats(layer, mom2, count), "" if stamped else UNCHECKED


def _stamp(path: Path, stats: KeyStats, log) -> None:
    """Record a checksum in a cache file an older romebatch wrote, keeping its other metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = {"mom2": stats.mom2.contiguous(), "tokens": torch.tensor([stats.tokens])}
    _save_cached(path, tensors, {**metadata, **_checksum_metadata(tensors)}, log)


def _save_cached(path: Path, tensors: dict, metadata: dict, log) -> None:
    """Cache one layer's statistics; a cache that cannot be written (full disk) costs a recompute next time, not this run."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file and rename: a crash never leaves a half-written cache entry.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except Exception as error:  # OSError, or safetensors' SafetensorError on a full disk
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log(
            f"Could not cache the key statistics in {path.parent} ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "continuing without the cache."
        )
