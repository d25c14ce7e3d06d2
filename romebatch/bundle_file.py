"""Journal bundles: a range of the head's path as one hash-verified file, applied elsewhere without recomputing.

    romebatch bundle --journal J edits.rbundle [--from N] [--to M]   # edits N..M of J's head's path
    romebatch apply edits.rbundle --journal K                        # verify every hash, then append

Compute edits once (on a GPU box, say), ship a few MB, and apply them to every copy of the
same base model: applying replays each edit's Λ uᵀ with the one function that writes
weights (romebatch/rome/update.py) and compares the weight hash before and after every
edit with the one the bundle recorded, so a copy ends up byte for byte in the state the
source journal recorded, or the bundle is refused as a whole and nothing is written.

**The file** is a safetensors file (nothing is unpickled): the vector columns (Λ, u, k*, and any
other blob column) as one tensor per column, and, in the safetensors metadata, a JSON
document holding every other column of every edit, the rejections made on the range's
states, the journal's meta keys that say how its edits were made (model, hyper-parameters,
context prefixes, ...), the base model's hash and the weight hashes of the states it
starts from and ends at. The document carries the sha256 of every tensor, and the
metadata the sha256 of the document, so any flipped byte is refused before anything else
is read. Columns are read generically (`SELECT *`), so a column a later migration adds is
carried without a change here; only `status` (derived from the head's path) and
`row_hash` (a hash of the row's place in its journal) are left for the receiving journal
to derive.

**States** are named by what the journal records: the base model's hash (every
down-projection) plus, for each layer the path has edited, the hash of that layer's
weight after its last edit (`weight_hash_after`). Two states with the same name are the
same weights. A bundle applies onto a journal whose head has its starting state (a fresh
journal, for a bundle that starts at the base). Seq numbers are kept when they are free in
the receiving journal (above every seq it has used), else numbered on from its own.

This file holds the format and writes bundles; bundle_read.py reads and checks one,
bundle_apply.py applies them to a journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path

from .errors import JournalDamagedError, UserError, one_line
from .journal import Journal
from .journal_records import chunks, placeholders
from .journal_schema import REPAIR_MARKS, REPAIR_PLAN

MAGIC = "romebatch-bundle"
VERSION = 1
SUFFIX = ".rbundle"
DOC_KEY = "romebatch_bundle"
DIGEST_KEY = "romebatch_bundle_sha256"
# Columns a journal derives from a row's place in it, not part of the edit itself.
DERIVED_EDIT_COLUMNS = frozenset({"status", "row_hash"})
DERIVED_REJECTION_COLUMNS = frozenset({"id", "row_hash"})
# Meta keys about the journal itself (its head, layout and digests), not about its edits.
DERIVED_META = frozenset(
    {"head", "max_seq", "format", "edits_digest", "rejections_digest", "meta_digest", REPAIR_PLAN, REPAIR_MARKS}
)
# What applying reads from every edit row, with the type it must have.
REQUIRED = {
    "seq": int,
    "parent": int,
    "layer": int,
    "weight_name": str,
    "fact_hash": str,
    "fact_id": str,
    "weight_hash_before": str,
    "weight_hash_after": str,
    "lam": bytes,
    "u": bytes,
    "denominator": float,
    "update_norm": float,
}


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- writing
def _tables(rows: list[dict], exclude: frozenset, table: str, tensors: dict) -> dict:
    """Rows as {columns, rows, blobs}: scalars in the JSON, each blob column one tensor.

    A blob column's non-null values are concatenated into one tensor (float32 when every
    length allows it, as Λ, u and k* are, else bytes); `spans` says which [offset, count]
    of it is each row's (null for a row whose value is not a blob).
    """
    import numpy as np

    columns = [c for c in (rows[0].keys() if rows else []) if c not in exclude]
    blobs = {}
    for column in columns:
        values = [row[column] for row in rows]
        if not any(isinstance(v, bytes) for v in values):
            continue
        float32 = all(len(v) % 4 == 0 for v in values if isinstance(v, bytes))
        width = 4 if float32 else 1
        spans: list[list[int] | None] = []
        offset, parts = 0, []
        for value in values:
            if isinstance(value, bytes):
                spans.append([offset, len(value) // width])
                offset += len(value) // width
                parts.append(value)
            else:
                spans.append(None)
        data = b"".join(parts)
        tensors[f"{table}.{column}"] = np.frombuffer(data, dtype="<f4" if float32 else np.uint8).copy()
        blobs[column] = {"dtype": "F32" if float32 else "U8", "spans": spans}
    cells = [
        [None if column in blobs and isinstance(row[column], bytes) else row[column] for column in columns]
        for row in rows
    ]
    return {"columns": columns, "rows": cells, "blobs": blobs}


def state_name(hashes_after: dict[int, str]) -> dict[str, str]:
    """A state's weight hashes as the document stores them: {layer: hash after its last edit}."""
    return {str(layer): h for layer, h in sorted(hashes_after.items())}


def write_bundle(journal: str | Path, out: str | Path, *, first: int | None = None, last: int | None = None) -> dict:
    """Write edits `first`..`last` (seqs on the head's path; default: all of it) of `journal` to `out`.

    Needs no model: what the bundle stores is what the journal recorded, and the receiving
    side checks all of it against real weights. Returns a summary.
    """
    out = Path(out)
    if out.suffix != SUFFIX:
        raise UserError(f"{out}: a bundle's file name must end in {SUFFIX}")
    if out.exists():
        raise UserError(f"{out} exists", hint="choose another name: a bundle is never overwritten")
    if not out.parent.is_dir():  # a mistyped folder is refused, never created
        raise UserError(f"{out}: no folder {out.parent} to write it in")
    with Journal(journal) as j:
        if not j.initialised:
            raise UserError(f"journal {journal} is empty")
        chain = j.chain()
        if not chain:
            raise UserError(f"journal {journal}: no edits on the head's path to bundle")
        first = chain[0] if first is None else first
        last = chain[-1] if last is None else last
        for flag, seq in (("--from", first), ("--to", last)):
            if seq not in chain:
                raise UserError(
                    f"{flag} {seq}: not an edit on the head's path of journal {journal} "
                    f"({len(chain)} edits, {chain[0]}..{chain[-1]})"
                )
        i, k = chain.index(first), chain.index(last)
        if i > k:
            raise UserError(f"--from {first} comes after --to {last} on the head's path")
        seqs = chain[i : k + 1]
        start_seq = chain[i - 1] if i else 0
        after = {seq: (layer, h) for seq, layer, h in j.db.execute("SELECT seq, layer, weight_hash_after FROM edits")}
        start, end = {}, {}
        for position, seq in enumerate(chain[: k + 1]):
            layer, h = after[seq]
            end[layer] = h
            if position < i:
                start[layer] = h
        rows = _select(j.db, "edits", "seq", seqs)
        states = {start_seq, *seqs}
        rejections = [dict(r) for r in j.db.execute("SELECT * FROM rejections ORDER BY id") if r["parent"] in states]
        meta = {}
        for key, value in j.db.execute("SELECT key, value FROM meta ORDER BY key"):
            if key not in DERIVED_META:
                try:
                    meta[key] = json.loads(value)
                except (TypeError, ValueError, RecursionError, MemoryError):  # an edited or damaged journal
                    raise JournalDamagedError(
                        f"journal {journal}: meta key {one_line(repr(key))} is not JSON"
                    ) from None
        marks = [m for m in (j.get(REPAIR_MARKS) or []) if m in states]
        plan = j.get(REPAIR_PLAN)
        # A pass in progress describes the head's path: it travels only with a range ending at the head.
        if plan is None or last != j.head or plan.get("at") not in states:
            plan = None
        base_hash = j.get("base_hash")
    tensors: dict = {}
    doc = {
        "magic": MAGIC,
        "version": VERSION,
        "base_hash": base_hash,
        "start": {"seq": start_seq, "weights": state_name(start)},
        "end": {"seq": last, "weights": state_name(end)},
        "meta": meta,
        REPAIR_MARKS: marks,
        REPAIR_PLAN: plan,
        "edits": _tables(rows, DERIVED_EDIT_COLUMNS, "edits", tensors),
        "rejections": _tables(rejections, DERIVED_REJECTION_COLUMNS, "rejections", tensors),
    }
    doc["tensors"] = {name: sha256_of(t.tobytes()) for name, t in sorted(tensors.items())}
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"))
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        _save(tensors, {DOC_KEY: text, DIGEST_KEY: sha256_of(text.encode("ascii"))}, staging)
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain write would
        os.replace(staging, out)  # a bundle is whole or absent, never half-written
    except BaseException as error:
        Path(staging).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"could not write {out} ({error})", hint="free some space and run it again") from error
        raise
    return {
        "bundle": str(out),
        "edits": len(seqs),
        "from": first,
        "to": last,
        "start": start_seq,
        "rejections": len(rejections),
        "bytes": out.stat().st_size,
    }


def _save(tensors: dict, metadata: dict, path: str) -> None:
    """Write a safetensors file with its header in sorted order, so the same edits give the same bytes.

    safetensors' own writer orders the metadata keys at random; a bundle packed twice should
    not differ (it would show as a change in git). The layout is the format's own: an
    8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, the
    tensors' bytes in header order.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors):
        data = tensors[name].tobytes()
        dtype = {"float32": "F32", "uint8": "U8"}[str(tensors[name].dtype)]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the bundle


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _select(db: sqlite3.Connection, table: str, key: str, keys: list[int]) -> list[dict]:
    rows: dict[int, dict] = {}
    for part in chunks(keys):  # SQLite caps the parameters of one statement
        for row in db.execute(f"SELECT * FROM {table} WHERE {key} IN ({placeholders(part)})", part):
            rows[row[key]] = dict(row)
    return [rows[k] for k in keys]
