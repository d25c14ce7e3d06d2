"""Reading a bundle (romebatch/bundle_file.py): its checksums first, then the shape of everything applying reads.

Nothing in a bundle is trusted before it is checked here: a flipped byte, a missing field or
a field of the wrong type is a one-line UserError, and applying (bundle_apply.py) reads only
what this has checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .audit import edit_row_problems
from .bundle_file import DIGEST_KEY, DOC_KEY, MAGIC, REQUIRED, VERSION, sha256_of
from .errors import UserError, one_line
from .files import open_regular_file
from .journal_schema import IDENTITY_KEYS, REPAIR_MARKS, REPAIR_PLAN
from .manifest.reading import value_problem
from .manifest.validation import short_repr


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
    if not path.exists():
        raise UserError(f"{path}: no such bundle file")
    # A regular file, or the usual one-line refusal ("is a FIFO, not a regular file", ...); any
    # size: its checksums, not a size cap, are what make it trusted.
    open_regular_file(str(path), encoding=None, limit=2**63 - 1).close()
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a malformed file
        raise UserError(f"{path}: not a romebatch bundle, or damaged ({one_line(str(error))})") from None
    text = metadata.get(DOC_KEY)
    if not isinstance(text, str) or DIGEST_KEY not in metadata:
        raise UserError(f"{path}: not a romebatch bundle (no {DOC_KEY} document)")
    if sha256_of(text.encode("utf-8")) != metadata[DIGEST_KEY]:
        raise UserError(f"{path}: damaged: its document does not match its checksum", hint="copy the bundle again")
    try:
        doc = json.loads(text)
    except ValueError as error:  # a syntax error, or a number of thousands of digits
        raise UserError(f"{path}: damaged: its document is not JSON ({value_problem(error)})") from None
    except (RecursionError, MemoryError):  # '[' * 100000: no bundle nests like that
        raise UserError(f"{path}: damaged: its document is not JSON (nested too deeply)") from None
    where = f"{path}"
    _expect(isinstance(doc, dict) and doc.get("magic") == MAGIC, where, "not a romebatch bundle")
    _expect(
        doc.get("version") == VERSION,
        where,
        f"bundle version {short_repr(doc.get('version'))}; this romebatch reads version {VERSION} "
        "(a newer romebatch wrote it?)",
    )
    listed = doc.get("tensors")
    _expect(
        isinstance(listed, dict) and set(listed) == set(tensors), where, "damaged: its tensors are not the listed ones"
    )
    for name, tensor in tensors.items():
        if sha256_of(tensor.tobytes()) != listed[name]:
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
                else (isinstance(value, float) or _is_int(value))
                if kind is float
                else isinstance(value, kind)
            )
            _expect(
                ok and not isinstance(value, bool),
                where,
                f"edit {index + 1}: field {column!r}: missing or not {kind.__name__}",
            )
    # The checks `romebatch check` makes of a journal's rows, made before any row is appended:
    # a bundle cannot bring in what the journal would then call damaged.
    for index, problem in edit_row_problems(edits):
        raise UserError(f"{path}: edit {index + 1} (seq {edits[index]['seq']}): {problem}; nothing was written")
    for index, row in enumerate(rejections):
        _expect(_is_int(row.get("parent")), where, f"rejection {index + 1}: field 'parent': not a seq")
    _check_meta(doc["meta"], where)
    return Bundle(path, doc, edits, rejections)


# The settings every journal has recorded since the first romebatch (later ones may be missing
# from an old bundle: HParams.from_record reads them as RECORDED_BEFORE says).
_RECORDED_ALWAYS = ("layer", "v_lr", "v_steps", "v_loss_stop", "kl_factor", "clamp_norm_factor", "prefixes", "seed")
_DTYPES = ("float32", "bfloat16", "float16")  # model.DTYPES, without importing torch


def _check_meta(meta: dict, where: str) -> None:
    """How the bundle's edits were made, checked as a journal's own meta is on opening, and named
    as the bundle's (a fresh journal takes these keys as they are)."""
    from .hparams import HParams

    dtype = meta.get("dtype")
    _expect(
        dtype is None or dtype in _DTYPES,
        where,
        f"field meta.dtype: {short_repr(dtype)} is not one of {', '.join(_DTYPES)}",
    )
    template = meta.get("module_template")
    _expect(template is None or isinstance(template, str), where, "field meta.module_template: not text")
    base = meta.get("base_hash")
    _expect(base is None or isinstance(base, str), where, "field meta.base_hash: not a hash")
    for key in IDENTITY_KEYS:
        _expect(meta.get(key) is None or isinstance(meta[key], str), where, f"field meta.{key}: not a hash")
    missing = [key for key in _RECORDED_ALWAYS if key not in meta["hparams"]]
    _expect(not missing, where, f"field meta.hparams: no {missing[0] if missing else ''} (damaged or not a journal's)")
    hp = HParams.from_record(meta["hparams"], source=f"{where}: meta.hparams")
    _expect(hp.layer is not None, where, "field meta.hparams: layer is not set")


def _is_int(value) -> bool:
    """An int SQLite can store (a seq, a layer, an offset): 64 bits, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


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
    scalars = (str, float, bool, type(None))  # and ints SQLite can store (_is_int)
    rows = []
    for index, cells in enumerate(table["rows"]):
        _expect(
            isinstance(cells, list)
            and len(cells) == len(columns)
            and all(isinstance(c, scalars) or _is_int(c) for c in cells),
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
        assert data is not None  # _expect raised otherwise
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
