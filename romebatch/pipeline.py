"""The apply loop: each pending fact through compute → guards → probes → commit, with repair passes.

`run` is `Editor.apply`; `apply_one` is one fact's pipeline, with one way out for a refused
edit (the weights restored in memory, the refusal journaled) and one for a committed one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .errors import JournalWriteError, UserError
from .guards import collapse_refusal, max_weight_norm, norm_refusal
from .hparams import REPAIR_EVERY, REPAIR_SPAN, check_repair_options
from .journal_records import EditRecord
from .manifest import Fact
from .model import weight_hash
from .outcomes import ApplyResult, FactResult, StopRequest
from .probes import RegressionProbes, Thresholds
from .repair import REPAIR_PLAN, edits_since_pass, pending_plan
from .rome import apply_edit, compute_edit
from .scores import answer_nll

if TYPE_CHECKING:
    from .editor import Editor


class Refused(Exception):
    """A guard or a regression probe refused the edit: its message is the reason journaled."""


def run(
    editor: Editor,
    facts: list[Fact],
    *,
    layer: int | None = None,
    on_edit: Callable[[FactResult], None] | None = None,
    stop: StopRequest | None = None,
    checks: Thresholds | None = Thresholds(),
    on_regression: str = "warn",
    repair_every: int | None = REPAIR_EVERY,
    retry_rejected: bool = False,
    repair_span: int | None = REPAIR_SPAN,
) -> ApplyResult:
    """`Editor.apply`: apply each fact not yet in the journal as a sequential ROME edit, committing each.

    `checks` runs the regression probes after every edit (None: off); a failed check
    warns, rejects the edit (`on_regression="skip"`) or ends the run (`"stop"`),
    in the last two cases without committing the offending edit.
    `repair_every` N runs a repair pass (`repair`) after every N edits this run applies
    and once more at its end, if it applied any (None or 0: never); the default is the
    one `romebatch.apply` and the CLI use (`hparams.REPAIR_EVERY`). A pass checks at most
    `repair_span` facts, in rotation over the path (None or 0: all; `hparams.REPAIR_SPAN`).
    Facts rejected in an earlier run are skipped unless `retry_rejected` (new thresholds,
    say); facts whose edit was rolled back are applied again.
    """
    from .editor import refuse_damaged

    if on_regression not in ("warn", "skip", "stop"):
        raise UserError(f"--on-regression {on_regression!r}: choose warn, skip or stop")
    check_repair_options(repair_every, repair_span)
    journal = editor.journal
    refuse_damaged(journal)
    editor.sound_head()
    started = time.perf_counter()
    stop = stop if stop is not None else StopRequest()
    window = edit_window(editor, layer)
    result = ApplyResult(journal=str(journal.directory), head=editor.head, run=run_info(editor))
    done = journal.applied_hashes()
    rejected = set() if retry_rejected else journal.rejected_hashes()
    todo = []
    for fact in facts:
        if fact.hash in done or fact.hash in rejected:
            status = "already_applied" if fact.hash in done else "rejected"
            reason = "in the journal already" if fact.hash in done else "rejected in an earlier run"
            result.results.append(
                FactResult(fact.id, fact.hash, fact.subject, fact.target_new, fact.target_true, status, reason=reason)
            )
        else:
            todo.append(fact)
    probes = None
    if todo:
        editor.prefixes()
        for each in window:
            editor.stats(each)
        if editor.hparams.guard_nll_rise:
            editor.fluency_reference()
        if checks is not None:
            probes = RegressionProbes(editor.lm, todo, checks)
            editor.stage("probes")
            with editor.at(0):  # the base answers are the reference
                probes.capture_base()

    def repair() -> list[FactResult]:
        return editor.repair(window, on_edit=on_edit, stop=stop, span=repair_span, on_pass=result.repair_passes.append)

    since_repair = edits_since_pass(journal) if repair_every else 0
    if repair_every and (pending_plan(journal) is not None or since_repair >= repair_every):
        # A pass an interrupted run began (or was due to begin): finish it before going on,
        # so a resumed run ends where an uninterrupted one would have.
        result.results += repair()
        since_repair = edits_since_pass(journal)
    for fact in todo:
        if stop:
            result.interrupted = True
            break
        editor.stage("editing", fact.id)
        row = apply_one(editor, fact, next_layer(editor, window), probes, on_regression)
        result.results.append(row)
        if on_edit:
            on_edit(row)
        if row.status == "rejected" and on_regression == "stop" and row.reason.startswith("regression"):
            result.interrupted = result.stopped_on_regression = True
            break
        since_repair += row.status == "applied"
        if repair_every and since_repair >= repair_every:
            result.results += repair()
            since_repair = 0
    if repair_every and since_repair and not result.interrupted and not stop:
        result.results += repair()
    result.interrupted = result.interrupted or bool(stop and journal.get(REPAIR_PLAN))
    result.stop_signal = stop.signal if stop else None
    result.head = editor.head
    result.run["head"] = editor.head
    result.seconds = time.perf_counter() - started
    return result


def run_info(editor: Editor) -> dict:
    """The model, its base hash, dtype, hyper-parameters, versions and the date of a run."""
    from datetime import datetime, timezone

    from .opening import model_dtype, versions

    return {
        "model": editor.journal.get("model"),
        "base_hash": editor.base_hash,
        "dtype": model_dtype(editor.lm),
        "revision": editor.lm.revision,
        "hparams": editor.hparams.to_dict(),
        "versions": versions(),
        "journal": str(editor.journal.directory),
        "head": editor.head,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def edit_window(editor: Editor, layer: int | None = None) -> list[int]:
    """The layers a run edits: `layer` (default: the hparams') and the next spread_layers - 1."""
    layer = editor.hparams.layer if layer is None else layer
    assert layer is not None  # an Editor's hparams are resolved (opening.init_or_check): layer is set
    spread = editor.hparams.spread_layers
    if not 0 <= layer <= editor.lm.n_layers - spread:
        raise UserError(
            f"--layer {layer}"
            + (f" with --spread-layers {spread}" if spread > 1 else "")
            + f": this model has layers 0..{editor.lm.n_layers - 1}"
        )
    return list(range(layer, layer + spread))


def next_layer(editor: Editor, window: list[int]) -> int:
    # Round-robin over the window by position on the path: a resumed or rolled-back
    # run puts its next edit where an uninterrupted one would have.
    return window[len(editor.journal.chain()) % len(window)] if len(window) > 1 else window[0]


def apply_one(
    editor: Editor,
    fact: Fact,
    layer: int,
    probes: RegressionProbes | None = None,
    on_regression: str = "warn",
    meta: dict | None = None,
) -> FactResult:
    """Compute, check and commit one edit; `meta` keys are journaled with its outcome."""
    redo = editor.journal.child(editor.head, fact.hash)
    if redo is not None and redo.layer == layer:
        # This exact edit was made on this exact state before and rolled back: moving the
        # head forward to it gives the same bytes as recomputing, without the cost.
        return roll_forward(editor, fact, redo, meta)
    lm, hp = editor.lm, editor.hparams
    row = FactResult(fact.id, fact.hash, fact.subject, fact.target_new, fact.target_true, "failed", layer=layer)
    clock = time.perf_counter
    t0 = clock()
    row.p_new_before, row.p_true_before = probabilities(editor, fact)
    scored = clock()
    weight = lm.weight(layer)
    base = editor._base(layer)
    before = weight.detach().clone()
    hash_before = weight_hash(weight)
    timings: dict = {}
    try:
        preserver = editor.preserver(layer)
        edit, k_star, value = compute_edit(
            lm,
            layer,
            fact.prompt,
            fact.subject,
            fact.target_new,
            editor.prefixes(),
            editor.stats(layer),
            hp,
            timings,
            preserver,
            max_weight_norm(base, hp),
            target_true=fact.target_true,
        )
    except (ValueError, RuntimeError) as error:  # e.g. a subject no token covers
        row.reason = f"could not compute the edit: {error}"
        return row
    row.update_norm, row.denominator, row.v_steps = edit.norm, edit.denominator, value.steps
    computed = applied = guarded = rescored = clock()
    outcome = None
    try:
        refuse(norm_refusal(edit, weight, hp, editor._applied))
        apply_edit(lm, edit)
        applied = clock()
        if hp.guard_nll_rise:
            refuse(collapse_refusal(lm, editor.prefixes(), editor.fluency_reference(), hp.guard_nll_rise))
        guarded = clock()
        row.p_new_after, row.p_true_after = probabilities(editor, fact)
        rescored = clock()
        if probes is not None:
            # Retention asks whether edits that took still hold, so only those are sampled;
            # the list is kept in memory, not re-read per edit (romebatch/applied_cache.py).
            outcome = probes.check(fact, editor._applied.earlier(), clock() - t0)
            row.neighborhood_drop, row.probe_regression, row.retention = (
                outcome.neighborhood_drop,
                outcome.probe_regression,
                outcome.retention,
            )
            if not outcome.ok:
                reason = "regression: " + "; ".join(outcome.problems)
                refuse(reason if on_regression != "warn" else None)
                row.reason = row.warning = reason
    except Refused as refused:
        with torch.no_grad():
            weight.copy_(before)  # undo in memory: exact, nothing was committed
        if probes is not None and outcome is not None:
            probes.applied.discard(fact.hash)
        row.status, row.reason = "rejected", str(refused)
        editor.journal.record_rejection(fact, layer, row.reason, edit.norm, edit.denominator, meta)
        row.seconds = clock() - t0
        return row
    row.seconds = clock() - t0
    record = EditRecord(
        seq=0,
        parent=editor.head,
        fact_id=fact.id,
        fact_hash=fact.hash,
        fact_json=json.dumps(fact.to_dict()),
        layer=layer,
        weight_name=lm.name("down_proj", layer),
        lam=edit.lam.numpy(),
        u=edit.u.numpy(),
        update_norm=edit.norm,
        denominator=edit.denominator,
        weight_hash_before=hash_before,
        weight_hash_after=weight_hash(weight),
        v_steps=value.steps,
        v_loss=value.loss,
        p_new_before=row.p_new_before,
        p_true_before=row.p_true_before,
        p_new_after=row.p_new_after,
        p_true_after=row.p_true_after,
        seconds_total=row.seconds,
        **timings,
        neighborhood_drop=row.neighborhood_drop,
        probe_regression=row.probe_regression,
        retention=row.retention,
        seconds_probes=outcome.seconds if outcome else None,
        k_star=k_star.float().cpu().numpy(),
        warning=row.warning or None,
    )
    committing = clock()
    commit(editor, fact, record, row, weight, before, probes, meta)
    if preserver is not None:
        assert record.k_star is not None  # set from k_star just above
        preserver.add(torch.from_numpy(record.k_star.copy()))  # the stored float32 key, as a rebuild reads it
        editor.ingredients.preservers[layer] = (editor.head, preserver)
    done = clock()
    row.timings = {
        "key": timings["seconds_key"],
        "value": timings["seconds_value"],
        "update": (computed - scored) - timings["seconds_key"] - timings["seconds_value"] + (applied - computed),
        "scoring": (scored - t0) + (rescored - guarded),
        "guard": guarded - applied,
        "probes": outcome.seconds if outcome else 0.0,
        "commit": done - committing,
        "total": done - t0,
    }
    return row


def refuse(reason: str | None) -> None:
    if reason:
        raise Refused(reason)


def commit(editor: Editor, fact: Fact, record: EditRecord, row: FactResult, weight, before, probes, meta) -> None:
    """Journal the edit (one transaction); if that fails, the model does not keep it either."""
    try:
        row.seq = editor.journal.commit_edit(record, meta)
        editor._applied.committed(
            record.parent,
            row.seq,
            {
                "update_norm": record.update_norm,
                "fact_json": record.fact_json,
                "p_new_after": record.p_new_after,
                "p_true_after": record.p_true_after,
            },
        )
    except BaseException as error:
        with torch.no_grad():
            weight.copy_(before)  # nothing committed: the model must not keep the edit either
        if probes is not None:
            probes.applied.discard(fact.hash)
        if isinstance(error, (sqlite3.Error, OSError, JournalWriteError)):  # e.g. the disk is full
            raise UserError(
                f"could not commit the edit of fact {fact.id} to journal {editor.journal.directory} ({error}); "
                f"nothing of it was written, the journal is at edit {editor.head}",
                hint="free some space and run the same command again: it resumes",
            ) from error
        raise
    row.status = "applied"


def roll_forward(editor: Editor, fact: Fact, record: EditRecord, meta: dict | None = None) -> FactResult:
    from .opening import check_record, edit_of

    check_record(editor.lm, record, editor.journal.directory)
    t0 = time.perf_counter()
    editor._base(record.layer)  # kept before the layer is first changed: the base to go back to
    apply_edit(editor.lm, edit_of(record))
    if weight_hash(editor.lm.weight(record.layer)) != record.weight_hash_after:
        editor.replay(verify=False)
        raise UserError(
            f"journal {editor.journal.directory}: edit {record.seq} does not reproduce its stored hash",
            hint="run `romebatch check` to find the damage",
        )
    editor.journal.move_head(record.seq, meta)
    return FactResult(
        fact.id,
        fact.hash,
        fact.subject,
        fact.target_new,
        fact.target_true,
        "applied",
        reason=f"restored rolled-back edit {record.seq}",
        seq=record.seq,
        layer=record.layer,
        p_new_before=record.p_new_before,
        p_true_before=record.p_true_before,
        p_new_after=record.p_new_after,
        p_true_after=record.p_true_after,
        update_norm=record.update_norm,
        denominator=record.denominator,
        v_steps=record.v_steps,
        seconds=time.perf_counter() - t0,
        warning=record.warning or "",
    )


def probabilities(editor: Editor, fact: Fact) -> tuple[float, float | None]:
    pairs = [(fact.text, fact.target_new)] + ([(fact.text, fact.target_true)] if fact.target_true else [])
    nll = answer_nll(editor.lm, pairs)
    p = [float(torch.tensor(-x).exp()) for x in nll]
    return p[0], (p[1] if len(p) > 1 else None)
