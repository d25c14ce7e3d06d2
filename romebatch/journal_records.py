"""A journal edit as Python sees it, and the float32 blobs its vectors are stored as."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import JournalDamagedError

# SQLite caps the parameters of one statement (SQLITE_MAX_VARIABLE_NUMBER, as low as 999 in
# older builds): every `IN (...)` list is sent in chunks of at most this many.
IN_CHUNK = 500


def chunks(values: Sequence, size: int | None = None) -> Iterator[list]:
    """`values` in consecutive lists of at most `size` (default IN_CHUNK), for `IN (...)` lists."""
    size = size or IN_CHUNK
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def placeholders(values: Sequence) -> str:
    """'?,?,?' for one chunk of an `IN (...)` list."""
    return ",".join("?" * len(values))


def vector_blob(values) -> bytes:
    return np.ascontiguousarray(np.asarray(values, dtype="<f4")).tobytes()


def blob_vector(blob: bytes) -> np.ndarray:
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) % 4:
        raise ValueError("not a float32 vector")
    return np.frombuffer(blob, dtype="<f4").copy()


@dataclass
class EditRecord:
    seq: int
    parent: int
    fact_id: str
    fact_hash: str
    fact_json: str
    layer: int
    weight_name: str
    lam: np.ndarray
    u: np.ndarray
    update_norm: float
    denominator: float
    weight_hash_before: str
    weight_hash_after: str
    v_steps: int | None = None
    v_loss: float | None = None
    p_new_before: float | None = None
    p_true_before: float | None = None
    p_new_after: float | None = None
    p_true_after: float | None = None
    seconds_key: float | None = None
    seconds_value: float | None = None
    seconds_total: float | None = None
    created_at: str = ""
    neighborhood_drop: float | None = None
    probe_regression: float | None = None
    retention: float | None = None
    seconds_probes: float | None = None
    k_star: np.ndarray | None = None  # float32 (d_ff,); None in journals written before m003
    row_hash: str | None = None  # romebatch/integrity.py; set by commit_edit
    warning: str | None = None  # the failed regression checks of a kept edit (m005)

    @property
    def fact(self) -> dict:
        try:
            fact = json.loads(self.fact_json)
        except (TypeError, ValueError, RecursionError):
            fact = None
        if not isinstance(fact, dict) or not all(
            isinstance(fact.get(k), str) for k in ("subject", "prompt", "target_new")
        ):
            raise JournalDamagedError(
                f"journal edit {self.seq}: field fact_json is not a valid fact",
                hint="run `romebatch check` to see all the damage",
            )
        return fact


EDIT_COLUMNS = [f for f in EditRecord.__dataclass_fields__]


def record_from_row(row: sqlite3.Row, where: object = "journal") -> EditRecord:
    values = dict(row)
    values.pop("status", None)  # stored by journals before m006, which a reader opens unmigrated
    for column in ("lam", "u", "k_star"):
        if values.get(column) is None and column == "k_star":
            continue
        try:
            values[column] = blob_vector(values[column])
        except ValueError:
            raise JournalDamagedError(
                f"{where}: edit {values.get('seq')}: column {column} is not a float32 vector",
                hint="run `romebatch check` to see all the damage",
            ) from None
    return EditRecord(**values)
