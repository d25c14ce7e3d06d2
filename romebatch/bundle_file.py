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
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BaseModelMismatchError, UserError, one_line
from .journal import DB_NAME, Journal
from .journal_records import blob_vector, chunks, placeholders
from .journal_schema import migrate

MAGIC = "romebatch-bundle"
VERSION = 1
SUFFIX = ".rbundle"
DOC_KEY = "romebatch_bundle"
DIGEST_KEY = "romebatch_bundle_sha256"
# Meta keys of repair passes (romebatch/editor.py): they name seqs, so they are mapped, not copied.
REPAIR_PLAN = "repair_plan"
REPAIR_MARKS = "repair_passes"
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


def _sha256(data: bytes) -> str:
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
        spans, offset, parts = [], 0, []
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
                meta[key] = json.loads(value)
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
    doc["tensors"] = {name: _sha256(t.tobytes()) for name, t in sorted(tensors.items())}
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        _save(tensors, {DOC_KEY: text, DIGEST_KEY: _sha256(text.encode("ascii"))}, staging)
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


# ----------------------------------------------------------------------------- reading
@dataclass
class Bundle:
    path: Path
    doc: dict
    edits: list[dict]  # column -> value (blobs as bytes), oldest first
    rejections: list[dict]

    @property
    def base_hash(self) -> str:
        return self.doc["base_hash"]

    @property
    def meta(self) -> dict:
        return self.doc["meta"]

    @property
    def start(self) -> dict:
        return self.doc["start"]

    @property
    def end(self) -> dict:
        return self.doc["end"]


def read_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle: its checksums first, then the shape of everything applying reads."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such bundle file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a malformed file
        raise UserError(f"{path}: not a romebatch bundle, or damaged ({one_line(str(error))})") from None
    text = metadata.get(DOC_KEY)
    if not isinstance(text, str) or DIGEST_KEY not in metadata:
        raise UserError(f"{path}: not a romebatch bundle (no {DOC_KEY} document)")
    if _sha256(text.encode("utf-8")) != metadata[DIGEST_KEY]:
        raise UserError(f"{path}: damaged: its document does not match its checksum", hint="copy the bundle again")
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise UserError(f"{path}: damaged: its document is not JSON ({error})") from None
    where = f"{path}"
    _expect(isinstance(doc, dict) and doc.get("magic") == MAGIC, where, "not a romebatch bundle")
    _expect(
        doc.get("version") == VERSION,
        where,
        f"bundle version {doc.get('version')!r}; this romebatch reads version {VERSION} (a newer romebatch wrote it?)",
    )
    listed = doc.get("tensors")
    _expect(
        isinstance(listed, dict) and set(listed) == set(tensors), where, "damaged: its tensors are not the listed ones"
    )
    for name, tensor in tensors.items():
        if _sha256(tensor.tobytes()) != listed[name]:
            raise UserError(f"{path}: damaged: tensor {name} does not match its checksum", hint="copy the bundle again")
    _expect(isinstance(doc.get("base_hash"), str), where, "field base_hash: not a hash")
    for side in ("start", "end"):
        state = doc.get(side)
        _expect(
            isinstance(state, dict)
            and _is_int(state.get("seq"))
            and isinstance(state.get("weights"), dict)
            and all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in state["weights"].items()),
            where,
            f"field {side}: not a state",
        )
    _expect(
        isinstance(doc.get("meta"), dict)
        and isinstance(doc["meta"].get("hparams"), dict)
        and isinstance(doc["meta"].get("model"), str),
        where,
        "field meta: no model and hyper-parameters",
    )
    _expect(
        isinstance(doc.get(REPAIR_MARKS), list) and all(_is_int(m) for m in doc[REPAIR_MARKS]),
        where,
        f"field {REPAIR_MARKS}: not a list of seqs",
    )
    _expect(
        doc.get(REPAIR_PLAN) is None or (isinstance(doc[REPAIR_PLAN], dict) and _is_int(doc[REPAIR_PLAN].get("at"))),
        where,
        f"field {REPAIR_PLAN}: not a repair plan",
    )
    edits = _rows(doc.get("edits"), tensors, "edits", where)
    rejections = _rows(doc.get("rejections"), tensors, "rejections", where)
    _expect(bool(edits), where, "holds no edits")
    for index, row in enumerate(edits):
        for column, kind in REQUIRED.items():
            value = row.get(column)
            ok = (
                _is_int(value)
                if kind is int
                else isinstance(value, (int, float))
                if kind is float
                else isinstance(value, kind)
            )
            _expect(
                ok and not isinstance(value, bool),
                where,
                f"edit {index + 1}: field {column!r}: missing or not {kind.__name__}",
            )
    for index, row in enumerate(rejections):
        _expect(_is_int(row.get("parent")), where, f"rejection {index + 1}: field 'parent': not a seq")
    return Bundle(path, doc, edits, rejections)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise UserError(f"{where}: {what}")


def _rows(table, tensors: dict, name: str, where: str) -> list[dict]:
    _expect(
        isinstance(table, dict)
        and isinstance(table.get("columns"), list)
        and isinstance(table.get("rows"), list)
        and isinstance(table.get("blobs"), dict),
        where,
        f"field {name}: not a table",
    )
    columns = table["columns"]
    _expect(
        all(isinstance(c, str) and c.isidentifier() for c in columns) and len(set(columns)) == len(columns),
        where,
        f"field {name}: bad column names",
    )
    scalars = (str, int, float, type(None))
    rows = []
    for index, cells in enumerate(table["rows"]):
        _expect(
            isinstance(cells, list) and len(cells) == len(columns) and all(isinstance(c, scalars) for c in cells),
            where,
            f"{name} row {index + 1}: not a row of scalars",
        )
        rows.append(dict(zip(columns, cells)))
    for column, blob in table["blobs"].items():
        _expect(
            column in columns
            and isinstance(blob, dict)
            and blob.get("dtype") in ("F32", "U8")
            and isinstance(blob.get("spans"), list)
            and len(blob["spans"]) == len(rows),
            where,
            f"field {name}: column {column!r}: bad blob index",
        )
        data = tensors.get(f"{name}.{column}")
        _expect(
            data is not None
            and data.ndim == 1
            and str(data.dtype) == ("float32" if blob["dtype"] == "F32" else "uint8"),
            where,
            f"field {name}: column {column!r}: no tensor of its type",
        )
        raw = data.tobytes()
        width = 4 if blob["dtype"] == "F32" else 1
        for row, span in zip(rows, blob["spans"]):
            if span is None:
                continue
            _expect(
                isinstance(span, list)
                and len(span) == 2
                and all(_is_int(s) and s >= 0 for s in span)
                and span[0] + span[1] <= data.shape[0],
                where,
                f"field {name}: column {column!r}: bad span",
            )
            row[column] = raw[span[0] * width : (span[0] + span[1]) * width]
    return rows


# ----------------------------------------------------------------------------- applying
@dataclass
class BundleApplied:
    bundle: str
    edits: int  # appended (0 when the journal already had the bundle's end state)
    rejections: int
    first: int | None  # seqs the edits got in the journal
    last: int | None
    head: int
    renumbered: bool = False
    already: bool = False
    dry_run: bool = False

    def summary(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Target:
    """Where the bundles go, as they are applied one after another."""

    journal: Journal | None  # None until a fresh journal is created by the first commit
    head: int
    touched: set[int] = field(default_factory=set)  # layers edited on the head's path
    hparams: dict | None = None
    marks: list[int] = field(default_factory=list)


def _defining(hparams: dict, where: str) -> dict:
    from .hparams import HParams

    # Journals written before these options existed made plain edits with plainly sampled C.
    hp = HParams.from_dict({"preserve": "none", "stats_sampling": "plain", **hparams}, source=where)
    return {k: v for k, v in hp.defining().items() if k != "layer"}


def apply_bundles(
    paths,
    journal: str | Path,
    *,
    model: str | None = None,
    device: str = "cpu",
    dry_run: bool = False,
    lm=None,
    log=None,
) -> list[BundleApplied]:
    """Append the edits of each bundle, in order, to `journal`, each verified whole before it is written.

    Every bundle is read and checked (checksums, base model) before the journal is opened;
    then each one's edits are replayed on the journal's head state in memory, every weight
    hash compared, and only if all of them match are they written, in one transaction.
    A refused bundle raises UserError and writes nothing (bundles before it stay applied).
    `dry_run` verifies and writes nothing at all. A model given as `lm` must be at its base
    weights, and is left at them.
    """
    import torch

    from .editor import Editor
    from .model import load_model, weight_hash
    from .rome import RankOneEdit, apply_edit

    kwargs = {"log": log} if log else {}
    bundles = [read_bundle(p) for p in paths]
    journal = Path(journal)
    stored = _peek(journal)
    # A caller's model (at its base weights, or the base check below refuses) is given back as it came.
    given = None if lm is None else {layer: lm.weight(layer).detach().clone() for layer in range(lm.n_layers)}
    if lm is None:
        spec = model or stored.get("model") or bundles[0].meta.get("model")
        template = stored.get("module_template") or bundles[0].meta.get("module_template")
        lm = load_model(spec, device=device, module_template=template, **kwargs)
    base_hash = lm.base_hash()
    for b in bundles:
        if b.base_hash != base_hash:
            raise BaseModelMismatchError(
                f"{b.path}: made on base model {b.meta.get('model')} ({b.base_hash[:19]}…), but {lm.spec} has "
                f"different weights ({base_hash[:19]}…); nothing was written",
                hint="apply it to a journal of the model it was made on (--model)",
            )
    editor, target = None, _Target(None, 0)
    try:
        if stored.get("base_hash"):
            editor = Editor(journal, lm=lm, write=not dry_run, **kwargs)
            target = _Target(
                None if dry_run else editor.journal,
                editor.head,
                {r.layer for r in editor.journal.path()},
                editor.journal.get("hparams"),
                list(editor.journal.get(REPAIR_MARKS) or []),
            )
            columns = {"edits": editor.journal.columns("edits"), "rejections": editor.journal.columns("rejections")}
        else:
            columns = _fresh_columns()
        results = []
        for b in bundles:
            where = str(b.path)
            if target.hparams is None:
                target.hparams = b.meta.get("hparams")
            if b.meta.get("hparams") is not None and target.hparams is not None:
                ours, theirs = _defining(target.hparams, f"journal {journal}"), _defining(b.meta["hparams"], where)
                for key in sorted(set(ours) | set(theirs)):
                    if ours.get(key) != theirs.get(key):
                        raise UserError(
                            f"{where}: its edits were made with {key}={theirs.get(key)!r}, journal "
                            f"{journal} with {ours.get(key)!r}; nothing was written"
                        )
            for table, cols in columns.items():
                rows = b.edits if table == "edits" else b.rejections
                extra = sorted({c for row in rows for c in row} - set(cols) - {"seq", "parent"})
                if extra:
                    raise UserError(
                        f"{where}: carries column {table}.{extra[0]}, which journal {journal} does not have "
                        f"(a newer romebatch made it?); nothing was written"
                    )
            state = {str(layer): weight_hash(lm.weight(layer)) for layer in sorted(target.touched)}
            if state == b.end["weights"] and state != b.start["weights"]:
                results.append(BundleApplied(where, 0, 0, None, None, target.head, already=True, dry_run=dry_run))
                continue
            if state != b.start["weights"]:
                raise UserError(
                    f"{where}: starts from the state of its edit {b.start['seq']}, but journal {journal}'s head "
                    f"({target.head}) is another state; nothing was written",
                    hint="apply the bundles before it first, or roll the journal back to that state",
                )
            layers = {row["layer"] for row in b.edits}
            bad = sorted(layer for layer in layers if not 0 <= layer < lm.n_layers)
            if bad:
                raise UserError(f"{where}: edits layer {bad[0]}, but {lm.spec} has layers 0..{lm.n_layers - 1}")
            kept = {layer: lm.weight(layer).detach().clone() for layer in layers | target.touched}
            try:
                for index, row in enumerate(b.edits):
                    layer, name = row["layer"], f"{where}: edit {index + 1} (seq {row['seq']}, fact {row['fact_id']})"
                    if row["weight_name"] != lm.name("down_proj", layer):
                        raise UserError(
                            f"{name}: edits {row['weight_name']}, but layer {layer}'s down-projection "
                            f"is {lm.name('down_proj', layer)}; nothing was written"
                        )
                    weight = lm.weight(layer)
                    if weight_hash(weight) != row["weight_hash_before"]:
                        raise UserError(
                            f"{name}: was computed on other weights than the ones it applies to "
                            f"(weight before {weight_hash(weight)[:19]}…, recorded "
                            f"{row['weight_hash_before'][:19]}…); nothing was written"
                        )
                    lam, u = blob_vector(row["lam"]), blob_vector(row["u"])
                    shape = (lam.shape[0], u.shape[0])[:: -1 if lm.adapter.conv1d else 1]
                    if tuple(weight.shape) != shape:
                        raise UserError(
                            f"{name}: its factors make a {shape} update of a {tuple(weight.shape)} "
                            f"weight; nothing was written"
                        )
                    apply_edit(
                        lm,
                        RankOneEdit(
                            layer,
                            torch.from_numpy(lam),
                            torch.from_numpy(u),
                            float(row["denominator"]),
                            float(row["update_norm"]),
                        ),
                    )
                    if weight_hash(weight) != row["weight_hash_after"]:
                        raise UserError(
                            f"{name}: its factors give weight {weight_hash(weight)[:19]}…, but it "
                            f"recorded {row['weight_hash_after'][:19]}…; nothing was written"
                        )
                end = {str(layer): weight_hash(lm.weight(layer)) for layer in sorted(layers | target.touched)}
                if end != b.end["weights"]:
                    raise UserError(
                        f"{where}: its edits end in another state than the one it recorded; nothing was written"
                    )
            except BaseException:
                with torch.no_grad():
                    for layer, weight in kept.items():
                        lm.weight(layer).copy_(weight)  # the model stays at the journal's head
                raise
            if dry_run:
                results.append(
                    BundleApplied(where, len(b.edits), len(b.rejections), None, None, target.head, dry_run=True)
                )
                target.touched |= layers
                continue
            fresh = target.journal is None
            if fresh:
                target.journal = Journal(journal, write=True, create=True)
                if target.journal.initialised:
                    raise UserError(f"journal {journal} was created by another process meanwhile; nothing was written")
            results.append(_commit(b, target, fresh, lm.spec if model else None))
            target.touched |= layers
        return results
    finally:
        if editor is not None:
            editor.close()
        elif target.journal is not None:
            target.journal.close()
        if given is not None:
            with torch.no_grad():
                for layer, weight in given.items():
                    lm.weight(layer).copy_(weight)


def _commit(b: Bundle, target: _Target, fresh: bool, model_spec: str | None) -> BundleApplied:
    """Number the bundle's rows for the target journal and append them in one transaction."""
    j = target.journal
    next_seq = j.next_seq()
    original = [row["seq"] for row in b.edits]
    keep = original[0] >= next_seq and all(a < b_ for a, b_ in zip(original, original[1:]))
    seqs = original if keep else list(range(next_seq, next_seq + len(original)))
    mapping = {b.start["seq"]: target.head, **dict(zip(original, seqs))}
    has_status = "status" in j.columns("edits")
    edits, parent = [], target.head
    for row, seq in zip(b.edits, seqs):
        values = {c: v for c, v in row.items() if c not in ("seq", "parent")}
        values = {"seq": seq, "parent": parent, **values}
        if has_status:
            values["status"] = "applied"  # on the head's path, as every appended edit is
        edits.append(values)
        parent = seq
    # The same rejection can be in two bundles (at the state where one ends and the next begins).
    have = {(r["fact_hash"], r["parent"], r["reason"], r["created_at"]) for r in j.rejections()}
    rejections = []
    for row in b.rejections:
        values = {**row, "parent": mapping.get(row["parent"], target.head)}
        if (values.get("fact_hash"), values["parent"], values.get("reason"), values.get("created_at")) not in have:
            rejections.append(values)
    meta = {}
    if fresh:  # the journal is made by the bundle: it records how its edits were made
        meta = {k: v for k, v in b.meta.items() if k not in DERIVED_META}
        meta["base_hash"] = b.base_hash
        if j.get("format") is None:  # what Editor writes in a new journal; a migration may have set it already
            meta["format"] = 1
        if model_spec is not None:
            meta["model"] = model_spec
    marks = target.marks + [mapping[m] for m in b.doc[REPAIR_MARKS] if m in mapping and mapping[m] not in target.marks]
    meta[REPAIR_MARKS] = marks
    plan = b.doc[REPAIR_PLAN]
    if plan is not None and plan["at"] in mapping:
        meta[REPAIR_PLAN] = {**plan, "at": mapping[plan["at"]]}
    j.append_rows(edits, rejections, meta, parent=target.head)
    target.head, target.marks = seqs[-1], marks
    return BundleApplied(str(b.path), len(edits), len(rejections), seqs[0], seqs[-1], seqs[-1], renumbered=not keep)


def _peek(journal: Path) -> dict:
    """The model spec and base hash of an existing, initialised journal ({} otherwise)."""
    if not (journal / DB_NAME).exists():
        return {}
    with Journal(journal) as j:
        return {"model": j.get("model"), "module_template": j.get("module_template"), "base_hash": j.get("base_hash")}


def _fresh_columns() -> dict[str, list[str]]:
    """The columns a journal created now has: the migrations run on an in-memory database."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(db)
        return {
            table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in ("edits", "rejections")
        }
    finally:
        db.close()
