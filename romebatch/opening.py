"""Opening a journal: what a new one records of its model, what an existing one checks, and the
full replay of every edit that `romebatch check` runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import __version__
from .errors import BaseModelMismatchError, JournalDamagedError, UserError
from .hparams import HParams, resolve
from .journal import Journal
from .journal_records import EditRecord
from .journal_schema import FORMAT as JOURNAL_FORMAT
from .journal_schema import IDENTITY_KEYS
from .model import LoadedModel, weight_hash
from .outcomes import CheckReport, Log
from .rome import RankOneEdit, apply_edit

if TYPE_CHECKING:
    from .editor import Editor


def init_or_check(
    journal: Journal, lm: LoadedModel, base_hash: str, hparams: HParams | None, module_template: str | None, log: Log
) -> HParams:
    """A new journal records the model and hparams; an existing one checks the model and keeps its own."""
    from .presets import describe, fill_defaults

    given, sources = fill_defaults(hparams or HParams(), lm)  # a `romebatch tune` preset, if any
    requested = resolve(given, lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    requested.validate(source="hparams")  # never record a value a later run would refuse
    if not journal.initialised:
        if not journal.write:
            raise UserError(f"journal {journal.directory} is empty")
        log(describe(requested, sources))
        journal.set_many(
            {
                "format": JOURNAL_FORMAT,
                "model": lm.spec,
                "module_template": module_template,
                "model_type": lm.config.model_type,
                "revision": lm.revision,
                "base_hash": base_hash,
                **identity(lm),
                "adapter": lm.adapter.family,
                "hparams": requested.to_dict(),
                "head": 0,
                "created_with": versions(),
                "dtype": model_dtype(lm),
            }
        )
        return requested
    stored_hash = journal.get("base_hash")
    stored_dtype = journal.get("dtype") or "float32"
    if stored_hash != base_hash and model_dtype(lm) != stored_dtype:
        raise BaseModelMismatchError(
            f"journal {journal.directory} was computed in {stored_dtype}, but the model was loaded in "
            f"{model_dtype(lm)}",
            hint="leave out --dtype: the journal's own dtype is the default",
        )
    stored_template = journal.get("module_template")
    if stored_hash != base_hash and module_template is not None and module_template != stored_template:
        raise BaseModelMismatchError(
            f"journal {journal.directory} was written with module template {stored_template!r}, "
            f"not {module_template!r}",
            hint="leave out --module-template: the journal's own is the default",
        )
    if stored_hash != base_hash:
        raise BaseModelMismatchError(
            f"journal {journal.directory} was written for model {journal.get('model')} ({stored_hash[:19]}…), "
            f"but {lm.spec} has different weights ({base_hash[:19]}…)",
            hint="open it with its own base model, or start a new journal with --journal",
        )
    mismatch = identity_mismatch({key: journal.get(key) for key in IDENTITY_KEYS}, lm)
    if mismatch is not None:
        raise BaseModelMismatchError(
            f"journal {journal.directory} was written for model {journal.get('model')}, but {lm.spec} has {mismatch}",
            hint="open it with its own base model, or start a new journal with --journal",
        )
    stored = HParams.from_record(journal.get("hparams"), source=f"journal {journal.directory}")
    if hparams is None:
        return stored
    # An edit is defined by these: changing one mid-journal would make edits incomparable.
    for key, value in requested.defining().items():
        if key != "layer" and stored.defining().get(key) != value:
            raise UserError(
                f"journal {journal.directory} was written with {key}={stored.defining().get(key)!r}, not {value!r}",
                hint="start a new journal with --journal to change it",
            )
    return requested


def identity(lm: LoadedModel) -> dict[str, str]:
    """What a new journal records of its base model beyond the down-projections."""
    return {"weights_hash": lm.weights_hash(), "tokenizer_hash": lm.tokenizer_hash()}


def identity_mismatch(stored: dict, lm: LoadedModel) -> str | None:
    """How `lm` differs from the recorded identity (None: it does not, or nothing was recorded)."""
    if stored.get("weights_hash") is not None and stored["weights_hash"] != lm.weights_hash():
        return (
            f"other weights ({lm.weights_hash()[:19]}…, recorded {str(stored['weights_hash'])[:19]}…); "
            "only the down-projections match"
        )
    if stored.get("tokenizer_hash") is not None and stored["tokenizer_hash"] != lm.tokenizer_hash():
        return f"another tokenizer ({lm.tokenizer_hash()[:19]}…, recorded {str(stored['tokenizer_hash'])[:19]}…)"
    return None


def record_problem(lm: LoadedModel, record: EditRecord) -> str | None:
    """What keeps `record` from being replayed on `lm` (None: nothing), checked before any weight
    is touched: a tampered row whose hashes were recomputed still names a real layer, the
    layer's own down-projection, vectors of its shape, and finite values, or it is damaged."""
    layer = record.layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < lm.n_layers:
        return f"field layer is {layer!r}, but the model has layers 0..{lm.n_layers - 1}"
    expected = lm.name("down_proj", layer)
    if record.weight_name != expected:
        return f"field weight_name is {record.weight_name!r}, but layer {layer}'s down-projection is {expected}"
    for name in ("lam", "u"):
        vector = getattr(record, name)
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            return f"field {name} is not a vector"
        if not np.isfinite(vector).all():
            return f"field {name} holds NaN or infinite values"
    made = (record.lam.shape[0], record.u.shape[0])[:: -1 if lm.adapter.conv1d else 1]
    shape = tuple(lm.weight(layer).shape)
    if made != shape:
        return f"its vectors make a {made} update of a {shape} weight"
    return None


def check_record(lm: LoadedModel, record: EditRecord, directory: object) -> None:
    """Raise JournalDamagedError naming the edit if `record` cannot be replayed on `lm`."""
    problem = record_problem(lm, record)
    if problem is not None:
        raise JournalDamagedError(
            f"journal {directory}: edit {record.seq} (fact {record.fact_id}) is damaged: {problem}",
            hint=f"run `romebatch check --journal {directory}` to find the last good state",
        )


def check_every_edit(editor: Editor) -> CheckReport:
    """`Editor.check`: replay every edit (every branch) and compare each stored hash; the model ends at the head."""
    problems: list[str] = []
    bad: set[int] = set()
    current = None  # the seq whose state the model holds, None before the first replay
    for record in editor.journal.edits():
        if record.parent in bad:
            bad.add(record.seq)
            problems.append(f"edit {record.seq} (fact {record.fact_id}): built on damaged edit {record.parent}")
            continue
        problem = record_problem(editor.lm, record)
        if problem is not None:
            bad.add(record.seq)
            problems.append(f"edit {record.seq} (fact {record.fact_id}): {problem}")
            continue
        if current != record.parent:
            editor.replay(record.parent, verify=False)
        weight = editor.lm.weight(record.layer)
        before = weight_hash(weight)
        if before != record.weight_hash_before:
            bad.add(record.seq)
            problems.append(
                f"edit {record.seq} (fact {record.fact_id}): was not computed on the state of edit {record.parent} "
                f"(weight before is {before[:19]}…, the edit recorded {record.weight_hash_before[:19]}…)"
            )
            current = record.parent
            continue
        apply_edit(editor.lm, edit_of(record))
        after = weight_hash(weight)
        current = record.seq
        if after != record.weight_hash_after:
            bad.add(record.seq)
            problems.append(
                f"edit {record.seq} (fact {record.fact_id}): its stored factors give weight {after[:19]}…, "
                f"but it recorded {record.weight_hash_after[:19]}… (a damaged vector or hash)"
            )
    path = [r.seq for r in editor.journal.lineage()]
    last_good = 0
    for seq in path:
        if seq in bad:
            break
        last_good = seq
    if not bad:
        editor._restore()
    return CheckReport(
        journal=str(editor.journal.directory),
        edits=len(editor.journal.edits()),
        head=editor.head,
        problems=problems,
        last_good=last_good if bad.intersection(path) else editor.head,
        base_checked="whole model" if all(editor.journal.get(k) for k in IDENTITY_KEYS) else "down-projections",
    )


def model_dtype(lm: LoadedModel) -> str:
    """ "float32", "bfloat16" or "float16": the dtype the model's weights are held in."""
    return str(next(lm.model.parameters()).dtype).removeprefix("torch.")


def versions() -> dict:
    import transformers

    return {"romebatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def edit_of(record: EditRecord) -> RankOneEdit:
    return RankOneEdit(
        record.layer, torch.from_numpy(record.lam), torch.from_numpy(record.u), record.denominator, record.update_norm
    )
