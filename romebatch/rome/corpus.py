"""The text the key statistics C are estimated from: a user's corpus file, or text sampled
from the model itself (seeded), and the id that names it in the statistics cache key.

The paper uses 100,000 Wikipedia samples; offline, the default is the model's own text.
How it is sampled matters for many edits. Each edit leaks into every other key in proportion
to √(uᵀCu), which u = C⁻¹k* minimises only for keys distributed like C; text sampled from
the start token is web prose with few relation phrases (" is a native speaker of"), so its C
under-weights exactly the keys of neighbourhood prompts, and edits leak into them twice as
much as C predicts (benchmarks/RESULTS.md). "encyclopedic" sampling starts every sequence
with a short encyclopedic opener instead.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..lm import generate_ids, make_batch
from ..model import LoadedModel

Progress = Callable[[int, int], None]  # (done, total) in tokens


def read_corpus(path: str | Path) -> list[str]:
    """Texts from a plain-text file (one text per blank-line-separated paragraph) or JSONL ("text")."""
    path = Path(path)
    with _open_corpus(path, encoding="utf-8") as handle:
        try:
            raw = handle.read()
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


def _open_corpus(path: str | Path, encoding: str | None = None):
    """The corpus file opened (as bytes, or text in `encoding`), or UserError naming --stats-corpus:
    the one check `read_corpus`, the cache key's digest and the Editor's early refusal share."""
    from ..files import open_regular_file

    try:
        return open_regular_file(str(path), encoding=encoding)
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
