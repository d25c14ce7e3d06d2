"""Applying bundles (romebatch/bundle_file.py) to a journal without recomputing them.

Every edit's Λ uᵀ is replayed with the one function that writes weights, and the weight
hash before and after every edit is compared with the one the bundle recorded; only if
all of them match are the rows appended, in one transaction.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from .bundle_file import DERIVED_META
from .bundle_read import Bundle, read_bundle
from .errors import BaseModelMismatchError, UserError
from .journal import DB_NAME, Journal
from .journal_records import blob_vector
from .journal_schema import REPAIR_CURSOR, REPAIR_MARKS, REPAIR_PLAN, migrate


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

    hp = HParams.from_record(hparams, source=where)
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
    from .opening import identity, identity_mismatch
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
    # Taken now, at the base weights: a fresh journal records it when a bundle from an older
    # journal carries none (as Editor records it in a journal it creates).
    base_identity = identity(lm)
    for b in bundles:
        if b.base_hash != base_hash:
            raise BaseModelMismatchError(
                f"{b.path}: made on base model {b.meta.get('model')} ({b.base_hash[:19]}…), but {lm.spec} has "
                f"different weights ({base_hash[:19]}…); nothing was written",
                hint="apply it to a journal of the model it was made on (--model)",
            )
        mismatch = identity_mismatch(b.meta, lm)
        if mismatch is not None:
            raise BaseModelMismatchError(
                f"{b.path}: made on base model {b.meta.get('model')}, but {lm.spec} has {mismatch}; nothing was written",
                hint="apply it to a journal of the model it was made on (--model)",
            )
    editor, target = None, _Target(None, 0)
    try:
        if stored.get("base_hash"):
            editor = Editor(journal, lm=lm, write=not dry_run, **kwargs)
            target = _Target(
                None if dry_run else editor.journal,
                editor.head,
                {r.layer for r in editor.journal.lineage()},
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
            results.append(_commit(b, target, fresh, lm.spec if model else None, base_identity))
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


def _commit(b: Bundle, target: _Target, fresh: bool, model_spec: str | None, base_identity: dict) -> BundleApplied:
    """Number the bundle's rows for the target journal and append them in one transaction."""
    j = target.journal
    assert j is not None  # the caller creates a fresh journal before its first commit
    next_seq = j.next_seq()
    original = [row["seq"] for row in b.edits]
    keep = original[0] >= next_seq and all(a < b_ for a, b_ in zip(original, original[1:]))
    seqs = original if keep else list(range(next_seq, next_seq + len(original)))
    mapping = {b.start["seq"]: target.head, **dict(zip(original, seqs))}
    edits, parent = [], target.head
    for row, seq in zip(b.edits, seqs):
        values = {c: v for c, v in row.items() if c not in ("seq", "parent")}
        values = {"seq": seq, "parent": parent, **values}
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
        for key, value in base_identity.items():  # equal to the bundle's where it has them (checked)
            meta.setdefault(key, value)
        if j.get("format") is None:  # what Editor writes in a new journal; a migration may have set it already
            meta["format"] = 1
        if model_spec is not None:
            meta["model"] = model_spec
    marks = target.marks + [mapping[m] for m in b.doc[REPAIR_MARKS] if m in mapping and mapping[m] not in target.marks]
    meta[REPAIR_MARKS] = marks
    if REPAIR_CURSOR in b.meta:
        # Where the next bounded repair pass starts its rotation, as of the bundle's packing:
        # the latest bundle's, so a journal rebuilt from many bundles goes on where its
        # source would have, not from the rotation's start (a fact hash, valid on any path).
        meta[REPAIR_CURSOR] = b.meta[REPAIR_CURSOR]
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
