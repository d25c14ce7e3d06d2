"""Benchmark journals kept in git as bundles, not as SQLite files (romebatch/bundle_file.py).

    python benchmarks/bundles.py pack benchmarks/runs/seq-default-s5-journal      # bundle edits not yet bundled
    python benchmarks/bundles.py restore benchmarks/runs/seq-default-s5-journal   # rebuild journal.sqlite from them

A run's journal, `benchmarks/runs/<run>-journal/journal.sqlite`, is not tracked: every
resumed run rewrote all 40 MB of it. Its bundles are: `benchmarks/runs/<run>-bundles/
NNNNN-MMMMM.rbundle` holds edits NNNNN..MMMMM of the head's path (at most CHUNK of them,
so each file stays under 2 MB) and is never rewritten: `pack` only adds bundles for the
edits after the last one, so the repository grows by the new edits alone.

`restore` applies the bundles the journal does not have yet (all of them to a missing
journal) with `romebatch apply`'s verification: every edit replayed on the base model and
every recorded weight hash compared. Seq numbers are kept, so checkpoints, repair-pass
marks and `--at` depths mean the same in the rebuilt journal. benchmarks/sequential.py
restores a run's journal before resuming it and packs it after each checkpoint, for the
runs that have a bundles folder.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.bundle_apply import apply_bundles  # noqa: E402
from romebatch.bundle_file import SUFFIX, write_bundle  # noqa: E402
from romebatch.bundle_read import read_bundle  # noqa: E402
from romebatch.journal import DB_NAME, Journal  # noqa: E402

# Edits per bundle: an edit of Gemma-3-270M is ~19.3 kB (Λ, u and k*: 640 + 2 x 2048 float32)
# plus its row, so 90 of them are ~1.75 MB.
CHUNK = 90


def bundles_dir(journal: Path) -> Path:
    name = journal.name[: -len("-journal")] if journal.name.endswith("-journal") else journal.name
    return journal.with_name(f"{name}-bundles")


def bundle_paths(journal: Path) -> list[Path]:
    """The run's bundles in path order (their names start with the first seq, zero-padded)."""
    folder = bundles_dir(journal)
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def pack(journal: Path, chunk: int = CHUNK, log=print) -> list[Path]:
    """Write bundles for the edits of the head's path after the last bundle; returns the new files."""
    existing = bundle_paths(journal)
    with Journal(journal) as j:
        chain = j.chain()
    done = read_bundle(existing[-1]).end["seq"] if existing else 0
    if done and done not in chain:
        raise SystemExit(
            f"{journal}: its head's path no longer holds edit {done}, where its bundles end; "
            f"restore the journal from them or move the bundles away"
        )
    todo = chain[chain.index(done) + 1 :] if done else chain
    folder = bundles_dir(journal)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for begin in range(0, len(todo), chunk):
        part = todo[begin : begin + chunk]
        out = folder / f"{part[0]:05d}-{part[-1]:05d}{SUFFIX}"
        info = write_bundle(journal, out, first=part[0], last=part[-1])
        log(
            f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: {info['edits']} edits, "
            f"{info['bytes'] / 1e6:.2f} MB"
        )
        written.append(out)
    return written


def restore(journal: Path, lm=None, model: str | None = None, log=print) -> int:
    """Apply the run's bundles that the journal lacks (all, if it is missing); returns the edits added."""
    paths = bundle_paths(journal)
    if not paths:
        return 0
    if (journal / DB_NAME).exists():
        with Journal(journal) as j:
            have = {0, *j.chain()}
        paths = [p for p in paths if read_bundle(p).end["seq"] not in have]
    if not paths:
        return 0
    log(f"{journal}: rebuilding from {len(paths)} bundle(s), every edit verified by replay...")
    done = apply_bundles(paths, journal, model=model, lm=lm, log=log)
    added = sum(d.edits for d in done)
    log(f"{journal}: {added} edits restored, head {done[-1].head}")
    return added


@contextmanager
def kept(journal: Path, lm, start: bool = False):
    """A run whose journal lives as bundles: rebuilt from them (every edit verified by replay)
    before it resumes, and its new edits packed after it, also when it stops or fails (a
    session's machine does not outlive it). `start`: begin bundles for a run that has none."""
    restore(journal, lm)
    try:
        yield
    finally:
        if (journal / DB_NAME).exists() and (start or bundle_paths(journal)):
            pack(journal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["pack", "restore"])
    ap.add_argument("journals", type=Path, nargs="+")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="edits per bundle (pack)")
    ap.add_argument("--model", help="base model (restore; default: the one the bundles name)")
    args = ap.parse_args()
    lm = None
    for journal in args.journals:
        if args.command == "pack":
            pack(journal, args.chunk)
        else:
            if lm is None and bundle_paths(journal):
                from romebatch.model import load_model

                lm = load_model(args.model or read_bundle(bundle_paths(journal)[0]).meta["model"])
            restore(journal, lm)


if __name__ == "__main__":
    main()
