"""The edit pipeline: a model, a journal, and the operations that move between states.

`Editor` is the Python API behind every command:

    from romebatch import Editor, load_manifest
    with Editor("romebatch.journal") as editor:           # embedded Gemma-3-270M by default
        result = editor.apply(load_manifest("examples/facts.csv").facts)
        editor.rollback(steps=1)
        editor.export("edited-model")

Opening an editor loads the model, checks that it is the journal's base model, and
replays the journal to its head (checking the stored weight hashes), so the model in
memory is always exactly the journal's head state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .applied_cache import AppliedCache
from .errors import (
    EXIT_FACTS_FAILED,
    EXIT_STOPPED_ON_REGRESSION,
    BaseModelMismatchError,
    JournalDamagedError,
    JournalWriteError,
    UserError,
    resource_problem,
)
from .fluency import text_nll
from .hparams import HParams, resolve
from .journal import Journal
from .journal_records import EditRecord
from .journal_schema import FORMAT as JOURNAL_FORMAT
from .manifest import Fact, fact_from_dict
from .model import LoadedModel, load_model, weight_hash
from .probes import RegressionProbes, Thresholds
from .repair import MAX_EDITS_PER_FACT, Standing, to_repair
from .rome import KeyStats, RankOneEdit, apply_edit, compute_edit, load_or_compute_stats, sample_prefixes
from .rome.preserve import Preserver
from .scores import answer_nll

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class FactResult:
    """What happened to one fact in a run: one row of the results table."""

    fact_id: str
    fact_hash: str
    subject: str
    target_new: str
    target_true: str | None
    status: str  # applied | repaired | already_applied | rejected | failed
    reason: str = ""
    seq: int | None = None
    layer: int | None = None
    p_new_before: float | None = None
    p_true_before: float | None = None
    p_new_after: float | None = None
    p_true_after: float | None = None
    update_norm: float | None = None
    denominator: float | None = None
    v_steps: int | None = None
    seconds: float | None = None
    neighborhood_drop: float | None = None
    probe_regression: float | None = None
    retention: float | None = None
    warning: str = ""  # the regression checks that failed on an edit kept by --on-regression warn
    # Seconds per phase (key, value, update, scoring, probes, commit): benchmarks/speed.py.
    timings: dict = field(default_factory=dict)

    @property
    def success(self) -> bool | None:
        if self.p_new_after is None or self.p_true_after is None:
            return None
        return self.p_new_after > self.p_true_after


@dataclass
class ApplyResult:
    journal: str
    head: int
    results: list[FactResult] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    stopped_on_regression: bool = False  # --on-regression stop ended the run
    stop_signal: int | None = None  # SIGINT or SIGTERM asked the run to stop
    # What made the run (model, its hash, dtype, hparams, versions, date), as
    # lm-evaluation-harness results record it: `summary()["run"]` and the results table's metadata.
    run: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def exit_code(self) -> int:
        """The CLI's exit status for this run (romebatch/errors.py, docs/cli.md)."""
        if self.stop_signal is not None:
            return 128 + int(self.stop_signal)
        if self.stopped_on_regression:
            return EXIT_STOPPED_ON_REGRESSION
        if self.count("failed"):
            return EXIT_FACTS_FAILED
        return 0

    def summary(self) -> dict:
        done = [r for r in self.results if r.status == "applied"]
        scored = [r.success for r in done if r.success is not None]
        secs = [r.seconds for r in done if r.seconds is not None]
        norms = [r.update_norm for r in done if r.update_norm is not None]
        return {
            "journal": self.journal,
            "head": self.head,
            "facts": len(self.results),
            "applied": len(done),
            "already_applied": self.count("already_applied"),
            "repaired": self.count("repaired"),
            "rejected": self.count("rejected"),
            "failed": self.count("failed"),
            "efficacy": 100.0 * sum(scored) / len(scored) if scored else None,
            "seconds": round(self.seconds, 2),
            "median_seconds_per_edit": statistics.median(secs) if secs else None,
            "median_update_norm": statistics.median(norms) if norms else None,
            "max_update_norm": max(norms) if norms else None,
            "interrupted": self.interrupted,
            "stopped_on_regression": self.stopped_on_regression,
            "exit_code": self.exit_code(),
            "warned": sum(bool(r.warning) for r in self.results if r.status == "applied"),
            "run": self.run,
        }


@dataclass
class CheckReport:
    journal: str
    edits: int
    head: int
    problems: list[str]
    last_good: int  # the last edit on the head's path before the first damaged one
    structural: bool = False  # the file itself is damaged: found without replay, no state to go back to

    @property
    def ok(self) -> bool:
        return not self.problems


class StopRequest:
    """Set by SIGINT/SIGTERM: the run stops cleanly after the edit in progress."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None  # the first signal that asked to stop

    def __bool__(self):
        return self.requested


@contextmanager
def stop_on_signals(stop: StopRequest, log: Log):
    """First Ctrl-C (or SIGTERM) asks to stop after the current edit; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if stop.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.requested = True
        stop.signal = signum
        log("Stopping after the current edit (press Ctrl-C again to abort it; nothing committed is lost).")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Editor:
    """A model opened at a journal's head, with apply / rollback / export."""

    def __init__(
        self,
        journal: str | Path = "romebatch.journal",
        *,
        model: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,  # None: the dtype the journal was computed in (float32 for a new one)
        module_template: str | None = None,
        hparams: HParams | None = None,
        write: bool = True,
        create: bool | None = None,
        verify: bool = True,
        log: Log = _stderr,
        lm: LoadedModel | None = None,
        device_map: str | dict | None = None,  # accelerate's dispatch (romebatch/device_map.py)
        max_memory: str | dict | None = None,
    ):
        self.log = log
        # A writer creates a missing journal unless told not to: every command but `apply`
        # passes create=False, so a mistyped path fails instead of quietly starting an empty
        # journal and acting on the unedited base model.
        self.journal = Journal(journal, write=write, create=write if create is None else create)
        try:
            stored_spec = self.journal.get("model")
            dtype = dtype or self.journal.get("dtype") or "float32"
            self.lm = lm or load_model(
                model or stored_spec,
                device=device,
                dtype=dtype,
                module_template=module_template or self.journal.get("module_template"),
                log=log,
                device_map=device_map,
                max_memory=max_memory,
            )
            self.base_hash = self.lm.base_hash()
            self.hparams = self._init_or_check(hparams, model, module_template)
            self._base_weights: dict[int, torch.Tensor] = {}
            self._stats: dict[int, KeyStats] = {}
            # layer -> (the head its state is for, the method's running state): rebuilt from the
            # path's keys whenever the head has moved (rollback, replay to another state).
            self._preservers: dict[int, tuple[int, Preserver]] = {}
            self._fluency_reference: float | None = None
            self._prefixes: list[str] | None = self.journal.get("prefixes")
            self._applied = AppliedCache(self.journal)  # what the guard and probes read, kept per head
            self.stats_progress: Callable[[int, int], None] | None = None  # (tokens done, total)
            # (stage, fact id or None) before each stage of a run: "probes" (the base answers),
            # "editing", "repair scoring", "repairing"; the CLI's progress bar shows it.
            self.on_stage: Callable[[str, str | None], None] | None = None
            self.replay(verify=verify)
        except BaseException:
            self.journal.close()
            raise

    # -- opening -----------------------------------------------------------------------
    def _init_or_check(self, hparams: HParams | None, model: str | None, module_template: str | None) -> HParams:
        lm, journal = self.lm, self.journal
        from .presets import describe, fill_defaults

        given, sources = fill_defaults(hparams or HParams(), lm)  # a `romebatch tune` preset, if any
        requested = resolve(given, lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
        if not journal.initialised:
            if not journal.write:
                raise UserError(f"journal {journal.directory} is empty")
            self.log(describe(requested, sources))
            journal.set_many(
                {
                    "format": JOURNAL_FORMAT,
                    "model": lm.spec,
                    "module_template": module_template,
                    "model_type": lm.config.model_type,
                    "revision": lm.revision,
                    "base_hash": self.base_hash,
                    "adapter": lm.adapter.family,
                    "hparams": requested.to_dict(),
                    "head": 0,
                    "created_with": _versions(),
                    "dtype": model_dtype(lm),
                }
            )
            return requested
        stored_hash = journal.get("base_hash")
        stored_dtype = journal.get("dtype") or "float32"
        if stored_hash != self.base_hash and model_dtype(lm) != stored_dtype:
            raise BaseModelMismatchError(
                f"journal {journal.directory} was computed in {stored_dtype}, but the model was loaded in "
                f"{model_dtype(lm)}",
                hint="leave out --dtype: the journal's own dtype is the default",
            )
        if stored_hash != self.base_hash:
            raise BaseModelMismatchError(
                f"journal {journal.directory} was written for model {journal.get('model')} ({stored_hash[:19]}…), "
                f"but {lm.spec} has different weights ({self.base_hash[:19]}…)",
                hint="open it with its own base model, or start a new journal with --journal",
            )
        # Journals written before sequential-stability methods and encyclopedic sampling
        # existed made plain edits with C from plainly sampled text.
        stored = HParams.from_dict(
            {"preserve": "none", "stats_sampling": "plain", **journal.get("hparams")},
            source=f"journal {journal.directory}",
        )
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

    @property
    def head(self) -> int:
        return self.journal.head

    def _base(self, layer: int) -> torch.Tensor:
        """The base weight of `layer`, kept once it is first touched (rollback restores from it)."""
        if layer not in self._base_weights:
            self._base_weights[layer] = self.lm.weight(layer).detach().clone()
        return self._base_weights[layer]

    def replay(self, head: int | None = None, verify: bool = True) -> list[EditRecord]:
        """Make the in-memory model exactly state `head` (default: the journal's head)."""
        path = self.journal.lineage(head)
        layers = {r.layer for r in path} | set(self._base_weights)
        for layer in layers:
            base = self._base(layer)
            with torch.no_grad():
                self.lm.weight(layer).copy_(base)
        for record in path:
            apply_edit(self.lm, _edit_of(record))
        if verify:
            last = {r.layer: r for r in path}
            for layer, record in last.items():
                actual = weight_hash(self.lm.weight(layer))
                if actual != record.weight_hash_after:
                    raise UserError(
                        f"journal {self.journal.directory}: replaying to edit {record.seq} gives weight "
                        f"{actual[:19]}…, but the journal recorded {record.weight_hash_after[:19]}…",
                        hint="run `romebatch check` to find the first bad edit",
                    )
        return path

    def check(self) -> CheckReport:
        """Replay every edit (every branch) and compare each stored hash; the model ends at the head."""
        problems: list[str] = []
        bad: set[int] = set()
        current = None  # the seq whose state the model holds, None before the first replay
        for record in self.journal.edits():
            if record.parent in bad:
                bad.add(record.seq)
                problems.append(f"edit {record.seq} (fact {record.fact_id}): built on damaged edit {record.parent}")
                continue
            if current != record.parent:
                self.replay(record.parent, verify=False)
            weight = self.lm.weight(record.layer)
            before = weight_hash(weight)
            if before != record.weight_hash_before:
                bad.add(record.seq)
                problems.append(
                    f"edit {record.seq} (fact {record.fact_id}): was not computed on the state of edit {record.parent} "
                    f"(weight before is {before[:19]}…, the edit recorded {record.weight_hash_before[:19]}…)"
                )
                current = record.parent
                continue
            apply_edit(self.lm, _edit_of(record))
            after = weight_hash(weight)
            current = record.seq
            if after != record.weight_hash_after:
                bad.add(record.seq)
                problems.append(
                    f"edit {record.seq} (fact {record.fact_id}): its stored factors give weight {after[:19]}…, "
                    f"but it recorded {record.weight_hash_after[:19]}… (a damaged vector or hash)"
                )
        path = [r.seq for r in self.journal.lineage()]
        last_good = 0
        for seq in path:
            if seq in bad:
                break
            last_good = seq
        if not bad:
            self.replay(verify=False)
        return CheckReport(
            journal=str(self.journal.directory),
            edits=len(self.journal.edits()),
            head=self.head,
            problems=problems,
            last_good=last_good if bad.intersection(path) else self.head,
        )

    # -- ingredients, computed once per journal ------------------------------------------
    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            hp = self.hparams
            self.log(f"Sampling {sum(c for _, c in hp.prefixes)} context prefixes from the model (seed {hp.seed})...")
            self._prefixes = sample_prefixes(self.lm, hp.prefixes, hp.prefix_top_k, hp.seed)
            self.journal.set_many({"prefixes": self._prefixes})
        return self._prefixes

    def stats(self, layer: int, progress=None) -> KeyStats | None:
        hp = self.hparams
        if hp.mom2 == "identity":
            return None
        if layer not in self._stats:
            # Statistics are of the base model: compute them with the base weights in place.
            path = self.journal.lineage()
            touched = {r.layer for r in path}
            if touched:
                self.replay(0, verify=False)
            try:
                stats = load_or_compute_stats(
                    self.lm,
                    [layer],
                    self.base_hash,
                    n_tokens=hp.stats_tokens,
                    seq_len=hp.stats_seq_len,
                    seed=hp.seed,
                    corpus=hp.stats_corpus,
                    sampling=hp.stats_sampling,
                    log=self.log,
                    progress=progress or self.stats_progress,
                )
            finally:
                if touched:
                    self.replay(verify=False)
            self._stats[layer] = stats[layer].factor(hp.ridge)
        return self._stats[layer]

    def preserver(self, layer: int) -> Preserver | None:
        """The sequential-stability method's state for `layer` at the current head."""
        hp = self.hparams
        if hp.preserve == "none" and not hp.preserve_top_k:
            return None
        cached = self._preservers.get(layer)
        if cached is None or cached[0] != self.head:
            stats = self.stats(layer)
            shape = self.lm.weight(layer).shape  # (d_model, d_ff), or (d_ff, d_model) for Conv1D
            d_ff = shape[0] if self.lm.adapter.conv1d else shape[1]
            preserver = (
                cached[1]
                if cached
                else Preserver(
                    hp.preserve, stats.cholesky if stats else None, d_ff, hp.preserve_weight, hp.preserve_top_k
                )
            )
            keys = []
            for record in self.journal.lineage():
                if record.layer != layer:
                    continue
                if record.k_star is None:
                    raise UserError(
                        f"journal {self.journal.directory}: edit {record.seq} has no stored key, which "
                        f"--preserve {hp.preserve} needs",
                        hint="start a new journal with --journal",
                    )
                keys.append(torch.from_numpy(record.k_star.copy()))
            preserver.rebuild(keys)
            self._preservers[layer] = (self.head, preserver)
        return self._preservers[layer][1]

    # -- apply -------------------------------------------------------------------------
    def pending(self, facts: list[Fact]) -> list[Fact]:
        settled = self.journal.settled_hashes()
        return [f for f in facts if f.hash not in settled]

    def apply(
        self,
        facts: list[Fact],
        *,
        layer: int | None = None,
        on_edit: Callable[[FactResult], None] | None = None,
        stop: StopRequest | None = None,
        checks: Thresholds | None = Thresholds(),
        on_regression: str = "warn",
        repair_every: int | None = None,
        retry_rejected: bool = False,
    ) -> ApplyResult:
        """Apply each fact not yet in the journal as a sequential ROME edit, committing each.

        `checks` runs the regression probes after every edit (None: off); a failed check
        warns, rejects the edit (`on_regression="skip"`) or ends the run (`"stop"`),
        in the last two cases without committing the offending edit.
        `repair_every` N runs a repair pass (`repair`) after every N edits this run applies
        and once more at its end, if it applied any (None or 0: never).
        Facts rejected in an earlier run are skipped unless `retry_rejected` (new thresholds,
        say); facts whose edit was rolled back are applied again.
        """
        if on_regression not in ("warn", "skip", "stop"):
            raise UserError(f"--on-regression {on_regression!r}: choose warn, skip or stop")
        if repair_every is not None and repair_every < 0:
            raise UserError(f"--repair-every {repair_every}: give a number of edits, or 0 for no repairs")
        refuse_damaged(self.journal)
        started = time.perf_counter()
        stop = stop if stop is not None else StopRequest()
        layer = self.hparams.layer if layer is None else layer
        spread = self.hparams.spread_layers
        if not 0 <= layer <= self.lm.n_layers - spread:
            raise UserError(
                f"--layer {layer}"
                + (f" with --spread-layers {spread}" if spread > 1 else "")
                + f": this model has layers 0..{self.lm.n_layers - 1}"
            )
        window = list(range(layer, layer + spread))
        result = ApplyResult(journal=str(self.journal.directory), head=self.head, run=self.run_info())
        done = self.journal.applied_hashes()
        rejected = set() if retry_rejected else self.journal.rejected_hashes()
        todo = []
        for fact in facts:
            if fact.hash in done or fact.hash in rejected:
                status = "already_applied" if fact.hash in done else "rejected"
                result.results.append(
                    FactResult(
                        fact.id,
                        fact.hash,
                        fact.subject,
                        fact.target_new,
                        fact.target_true,
                        status,
                        reason="in the journal already" if fact.hash in done else "rejected in an earlier run",
                    )
                )
            else:
                todo.append(fact)
        probes = None
        if todo:
            self.prefixes()
            for each in window:
                self.stats(each)
            if self.hparams.guard_nll_rise:
                self.fluency_reference()
            if checks is not None:
                probes = RegressionProbes(self.lm, todo, checks)
                self._stage("probes")
                self.replay(0, verify=False)  # the base answers are the reference
                try:
                    probes.capture_base()
                finally:
                    self.replay(verify=False)
        since_repair = self._edits_since_repair() if repair_every else 0
        if repair_every and (self._pending_plan() is not None or since_repair >= repair_every):
            # A pass an interrupted run began (or was due to begin): finish it before going on,
            # so a resumed run ends where an uninterrupted one would have.
            result.results += self.repair(window, on_edit=on_edit, stop=stop)
            since_repair = self._edits_since_repair()
        for fact in todo:
            if stop:
                result.interrupted = True
                break
            self._stage("editing", fact.id)
            row = self._apply_one(fact, self._next_layer(window), probes, on_regression)
            result.results.append(row)
            if on_edit:
                on_edit(row)
            if row.status == "rejected" and on_regression == "stop" and row.reason.startswith("regression"):
                result.interrupted = result.stopped_on_regression = True
                break
            since_repair += row.status == "applied"
            if repair_every and since_repair >= repair_every:
                result.results += self.repair(window, on_edit=on_edit, stop=stop)
                since_repair = 0
        if repair_every and since_repair and not result.interrupted and not stop:
            result.results += self.repair(window, on_edit=on_edit, stop=stop)
        result.interrupted = result.interrupted or bool(stop and self.journal.get(REPAIR_PLAN))
        result.stop_signal = stop.signal if stop else None
        result.head = self.head
        result.run["head"] = self.head
        result.seconds = time.perf_counter() - started
        return result

    def run_info(self) -> dict:
        """The model, its base hash, dtype, hyper-parameters, versions and the date of a run."""
        from datetime import datetime, timezone

        return {
            "model": self.journal.get("model"),
            "base_hash": self.base_hash,
            "dtype": model_dtype(self.lm),
            "revision": self.lm.revision,
            "hparams": self.hparams.to_dict(),
            "versions": _versions(),
            "journal": str(self.journal.directory),
            "head": self.head,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _stage(self, name: str, fact_id: str | None = None) -> None:
        if self.on_stage is not None:
            self.on_stage(name, fact_id)

    def _next_layer(self, window: list[int]) -> int:
        # Round-robin over the window by position on the path: a resumed or rolled-back
        # run puts its next edit where an uninterrupted one would have.
        return window[len(self.journal.chain()) % len(window)] if len(window) > 1 else window[0]

    def repair(
        self,
        window: list[int] | None = None,
        *,
        max_edits: int = MAX_EDITS_PER_FACT,
        on_edit: Callable[[FactResult], None] | None = None,
        stop: StopRequest | None = None,
    ) -> list[FactResult]:
        """Edit again, on the current weights, every fact on the head's path that no longer holds.

        Later edits wear earlier ones down (romebatch/repair.py); each fact is edited at most
        `max_edits` times on a path. A repair is an ordinary edit (guards on, no probes):
        its row has status "repaired" when it was committed. The pass's plan (which facts,
        from which state) is journaled before its first repair, so a pass that a crash or
        Ctrl-C cut short is finished, not planned afresh, by the next `repair` or `apply`.
        """
        window = window or list(range(self.hparams.layer, self.hparams.layer + self.hparams.spread_layers))
        plan = self._pending_plan()
        if plan is None:
            on_path = {0, *self.journal.chain()}
            rejected: dict[str, int] = {}
            for rejection in self.journal.rejections():
                if rejection["parent"] in on_path:
                    rejected[rejection["fact_hash"]] = rejected.get(rejection["fact_hash"], 0) + 1
            self._stage("repair scoring")
            lost = to_repair(self.lm, self.journal.lineage(), rejected, max_edits)
            plan = [{"fact": s.fact.to_dict(), "was": _why_lost(s)} for s in lost]
            self.journal.set_many({REPAIR_PLAN: {"at": self.head, "facts": plan, "done": 0}})
        rows = []
        for index in range(self.journal.get(REPAIR_PLAN)["done"], len(plan)):
            if stop:
                return rows  # the plan stays journaled: the next run finishes it
            entry = plan[index]
            fact = fact_from_dict(entry["fact"])
            # The plan's progress is written in the same transaction as the repair (or its
            # rejection), so a crash can neither lose a repair nor make one twice.
            progress = {REPAIR_PLAN: {**self.journal.get(REPAIR_PLAN), "done": index + 1}}
            self._stage("repairing", fact.id)
            row = self._apply_one(fact, self._next_layer(window), meta=progress)
            if row.status == "failed":
                self.journal.set_many(progress)  # nothing was written; a retry would fail alike
            if row.status == "applied":
                row.status = "repaired"
            row.reason = f"repair: no longer held ({entry['was']})" + (f"; {row.reason}" if row.reason else "")
            rows.append(row)
            if on_edit:
                on_edit(row)
        self._end_repair_pass()
        return rows

    def _pending_plan(self) -> list[dict] | None:
        """The journaled plan of a pass that was cut short, if the head is still inside it."""
        plan = self.journal.get(REPAIR_PLAN)
        if plan is None:
            return None
        chain = self.journal.chain()
        at = plan["at"]
        if (at == 0 or at in chain) and len(chain) - (chain.index(at) + 1 if at else 0) <= plan["done"]:
            return plan["facts"]
        # Rolled back past it, or edited elsewhere since: the pass no longer describes this path.
        self.journal.set_many({REPAIR_PLAN: None})
        return None

    def _end_repair_pass(self) -> None:
        marks = self.journal.get(REPAIR_MARKS) or []
        self.journal.set_many({REPAIR_MARKS: marks + [self.head], REPAIR_PLAN: None})

    def _edits_since_repair(self) -> int:
        """First edits of a fact on the head's path since the last repair pass ended on it."""
        marks = set(self.journal.get(REPAIR_MARKS) or [])
        seen, since = set(), 0
        for seq, fact_hash in self.journal.lineage_facts():
            if fact_hash not in seen:
                seen.add(fact_hash)
                since += 1
            if seq in marks:
                since = 0
        return since

    def _apply_one(
        self,
        fact: Fact,
        layer: int,
        probes: RegressionProbes | None = None,
        on_regression: str = "warn",
        meta: dict | None = None,
    ) -> FactResult:
        """Compute, check and commit one edit; `meta` keys are journaled with its outcome."""
        redo = self.journal.child(self.head, fact.hash)
        if redo is not None and redo.layer == layer:
            # This exact edit was made on this exact state before and rolled back: moving the
            # head forward to it gives the same bytes as recomputing, without the cost.
            return self._roll_forward(fact, redo, meta)
        hp = self.hparams
        row = FactResult(fact.id, fact.hash, fact.subject, fact.target_new, fact.target_true, "failed", layer=layer)
        t0 = time.perf_counter()
        row.p_new_before, row.p_true_before = self._probabilities(fact)
        scored = time.perf_counter()
        weight = self.lm.weight(layer)
        self._base(layer)
        before = weight.detach().clone()
        hash_before = weight_hash(weight)
        timings: dict = {}
        try:
            preserver = self.preserver(layer)
            edit, k_star, value = compute_edit(
                self.lm,
                layer,
                fact.prompt,
                fact.subject,
                fact.target_new,
                self.prefixes(),
                self.stats(layer),
                hp,
                timings,
                preserver,
                self._max_weight_norm(layer),
            )
        except (ValueError, RuntimeError) as error:  # e.g. a subject no token covers
            row.reason = f"could not compute the edit: {error}"
            return row
        row.update_norm, row.denominator, row.v_steps = edit.norm, edit.denominator, value.steps
        computed = time.perf_counter()
        refusal = self._guard(edit, weight)
        if refusal:
            row.status, row.reason = "rejected", refusal
            self.journal.record_rejection(fact, layer, refusal, edit.norm, edit.denominator, meta)
            row.seconds = time.perf_counter() - t0
            return row
        apply_edit(self.lm, edit)
        applied = time.perf_counter()
        collapse = self._collapse(fact)
        if collapse:
            with torch.no_grad():
                weight.copy_(before)  # undo in memory: exact, nothing was committed
            row.status, row.reason = "rejected", collapse
            self.journal.record_rejection(fact, layer, collapse, edit.norm, edit.denominator, meta)
            row.seconds = time.perf_counter() - t0
            return row
        guarded = time.perf_counter()
        row.p_new_after, row.p_true_after = self._probabilities(fact)
        rescored = time.perf_counter()
        outcome = None
        if probes is not None:
            # Retention asks whether edits that took still hold, so only those are sampled;
            # the list is kept in memory, not re-read per edit (romebatch/applied_cache.py).
            outcome = probes.check(fact, self._applied.earlier(), time.perf_counter() - t0)
            row.neighborhood_drop, row.probe_regression, row.retention = (
                outcome.neighborhood_drop,
                outcome.probe_regression,
                outcome.retention,
            )
            if not outcome.ok:
                reason = "regression: " + "; ".join(outcome.problems)
                if on_regression == "warn":
                    row.reason = row.warning = reason
                else:
                    with torch.no_grad():
                        weight.copy_(before)  # undo in memory: exact, nothing was committed
                    probes.applied.discard(fact.hash)
                    row.status, row.reason = "rejected", reason
                    self.journal.record_rejection(fact, layer, reason, edit.norm, edit.denominator, meta)
                    row.seconds = time.perf_counter() - t0
                    return row
        row.seconds = time.perf_counter() - t0
        record = EditRecord(
            seq=0,
            parent=self.head,
            status="applied",
            fact_id=fact.id,
            fact_hash=fact.hash,
            fact_json=json.dumps(fact.to_dict()),
            layer=layer,
            weight_name=self.lm.name("down_proj", layer),
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
        committing = time.perf_counter()
        try:
            row.seq = self.journal.commit_edit(record, meta)
            self._applied.committed(
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
                    f"could not commit the edit of fact {fact.id} to journal {self.journal.directory} ({error}); "
                    f"nothing of it was written, the journal is at edit {self.head}",
                    hint="free some space and run the same command again: it resumes",
                ) from error
            raise
        row.status = "applied"
        if preserver is not None:
            preserver.add(torch.from_numpy(record.k_star.copy()))  # the stored float32 key, as a rebuild reads it
            self._preservers[layer] = (self.head, preserver)
        done = time.perf_counter()
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

    def _roll_forward(self, fact: Fact, record: EditRecord, meta: dict | None = None) -> FactResult:
        t0 = time.perf_counter()
        apply_edit(self.lm, _edit_of(record))
        if weight_hash(self.lm.weight(record.layer)) != record.weight_hash_after:
            self.replay(verify=False)
            raise UserError(
                f"journal {self.journal.directory}: edit {record.seq} does not reproduce its stored hash",
                hint="run `romebatch check` to find the damage",
            )
        self.journal.move_head(record.seq, meta)
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

    def _own_text_nll(self) -> float:
        """Mean token NLL of every 4th context prefix, text the base model sampled itself.

        Five texts (~40 tokens) show a collapse as clearly as twenty, at a quarter of the
        cost: each token's logits span the whole vocabulary.
        """
        return text_nll(self.lm, [p.strip() for p in self.prefixes()[::4]])

    def fluency_reference(self) -> float:
        """The base model's NLL of its own sampled text, which the collapse guard compares against."""
        if self._fluency_reference is None:
            touched = bool(self.journal.chain())
            if touched:
                self.replay(0, verify=False)
            try:
                self._fluency_reference = self._own_text_nll()
            finally:
                if touched:
                    self.replay(verify=False)
        return self._fluency_reference

    def _collapse(self, fact: Fact) -> str | None:
        """Refuse an applied edit after which the model no longer reads fluent text (a disabling edit).

        The probe is one batched forward pass over texts the base model sampled as context
        prefixes: an ordinary edit moves their NLL by hundredths of a nat, a disabling edit
        by several nats.
        """
        limit = self.hparams.guard_nll_rise
        if not limit:
            return None
        reference = self.fluency_reference()
        now = self._own_text_nll()
        if not now <= reference + limit:  # NaN counts as a collapse
            return (
                f"collapse: the base model's own sampled text now costs {now:.2f} nats/token "
                f"(base {reference:.2f}, at most +{limit:g} allowed)"
            )
        return None

    def _max_weight_norm(self, layer: int) -> float | None:
        """The bound on ‖W‖_F that `norm_growth_max` sets, from the layer's base weight (None: off)."""
        growth = self.hparams.norm_growth_max
        return (1 + growth) * float(self._base(layer).double().norm()) if growth else None

    def _guard(self, edit: RankOneEdit, weight: torch.Tensor) -> str | None:
        """Refuse an edit whose update is absurd: the signature of a disabling edit."""
        hp = self.hparams
        values = torch.cat([edit.lam, edit.u])
        if not torch.isfinite(values).all() or not edit.denominator > 0:
            return f"non-finite update or non-positive denominator ({edit.denominator:.3g})"
        weight_norm = float(weight.detach().float().norm())
        if edit.norm > hp.guard_max_relative * weight_norm:
            return (
                f"update norm {edit.norm:.3g} exceeds {hp.guard_max_relative:g} x the weight's norm {weight_norm:.3g}"
            )
        if len(self._applied.norms()) >= hp.guard_min_edits:
            typical = self._applied.median_norm()
            if edit.norm > hp.guard_factor * typical:
                return f"update norm {edit.norm:.3g} is over {hp.guard_factor:g} x the run's median {typical:.3g}"
        return None

    def _probabilities(self, fact: Fact) -> tuple[float, float | None]:
        pairs = [(fact.text, fact.target_new)] + ([(fact.text, fact.target_true)] if fact.target_true else [])
        nll = answer_nll(self.lm, pairs)
        p = [float(torch.tensor(-x).exp()) for x in nll]
        return p[0], (p[1] if len(p) > 1 else None)

    # -- rollback ----------------------------------------------------------------------
    def rollback(
        self, *, to: int | None = None, steps: int | None = None, fact: str | None = None, base: bool = False
    ) -> int:
        """Move the head (exactly one of the selectors) and rebuild that state; returns the new head."""
        check_rollback_selector(to=to, steps=steps, fact=fact, base=base)
        path = self.journal.lineage()
        if base:
            target = 0
        elif to is not None:
            if to != 0:
                self.journal.edit(to)
            target = to
        elif steps is not None:
            if steps < 0 or steps > len(path):
                raise UserError(f"--steps {steps}: the head is {len(path)} edit(s) from the base")
            target = path[-steps - 1].seq if steps < len(path) else 0
        else:
            matches = [r for r in path if r.fact_id == fact]
            if not matches:
                raise UserError(f"--fact {fact}: no applied edit has that fact id")
            target = matches[0].parent  # the state just before that fact was edited
        try:
            self.replay(target)  # verify the target state before committing to it
        except BaseException:
            self.replay(verify=False)  # refused: the model stays at the head, like the journal
            raise
        # A repair pass cut short on the old path does not describe the new one.
        self.journal.move_head(target, {REPAIR_PLAN: None})
        return target

    def prune(self) -> int:
        return self.journal.prune()

    # -- export ------------------------------------------------------------------------
    def export(self, outdir: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
        """Write the head state as a model folder (safetensors, config, tokenizer, provenance, model card).

        `dtype` (float32, bfloat16, float16) casts the weights as they are written; the model
        in memory is not touched, so the journal's exact state stays what it is.
        """
        from .export_card import model_card, save_weights

        outdir = Path(outdir)
        check_export_target(outdir, force)
        outdir.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed into place: never a half-written model folder.
        staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
        trash = None
        try:
            written = save_weights(self.lm.model, staging, dtype)
            self.lm.tokenizer.save_pretrained(staging)
            provenance = self.provenance()
            provenance["dtype"] = written
            (staging / EXPORT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
            (staging / "README.md").write_text(model_card(provenance, outdir.name))
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the model from its users
            if outdir.exists():
                # Move the old folder aside first: at every moment outdir is either the old
                # complete export or the new one, never a partial one.
                trash = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old.", dir=outdir.parent))
                os.replace(outdir, trash / "old")
            os.replace(staging, outdir)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if trash is not None and (trash / "old").exists() and not outdir.exists():
                os.replace(trash / "old", outdir)  # put the earlier export back
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            what = resource_problem(error)
            if what is not None:
                raise UserError(
                    f"could not write the export ({what}); {outdir} was not changed",
                    hint="free some space and run export again",
                ) from None
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return outdir

    def provenance(self) -> dict:
        path = self.journal.lineage()
        return {
            "romebatch": __version__,
            "base_model": self.journal.get("model"),
            "base_hash": self.base_hash,
            "journal": str(self.journal.directory.resolve()),
            "head": self.head,
            "hparams": self.hparams.to_dict(),
            "edits": [
                {
                    "seq": r.seq,
                    "fact_id": r.fact_id,
                    "fact_hash": r.fact_hash,
                    "subject": r.fact["subject"],
                    "prompt": r.fact["prompt"],
                    "target_new": r.fact["target_new"],
                    "layer": r.layer,
                    "weight": r.weight_name,
                    "weight_hash_after": r.weight_hash_after,
                }
                for r in path
            ],
        }

    def close(self) -> None:
        self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Journal meta keys of repair passes: the plan of the pass in progress ({"at": head it began
# on, "facts": [...], "done": entries tried}) and the heads at which passes ended.
REPAIR_PLAN = "repair_plan"
REPAIR_MARKS = "repair_passes"


EXPORT_MARKER = "romebatch.json"  # every export's provenance; --force replaces only folders that have it


def check_export_target(outdir: Path, force: bool) -> None:
    """Refuse an export target that is not a new folder (or, with force, an earlier export)."""
    if outdir.is_symlink() and not outdir.exists():
        raise UserError(f"{outdir} is a symbolic link to nothing; remove it or choose another folder")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir} exists and is not a folder")
    if outdir.exists() and any(outdir.iterdir()):
        if not force:
            raise UserError(f"{outdir} exists and is not empty", hint="pass --force to replace an earlier export")
        if not (outdir / EXPORT_MARKER).is_file():
            raise UserError(
                f"{outdir} is not an earlier romebatch export (it has no {EXPORT_MARKER}); --force replaces only those",
                hint="choose another folder, or empty this one yourself",
            )
    if not outdir.parent.exists() and outdir.parent.is_symlink():
        raise UserError(f"{outdir.parent} is a symbolic link to nothing")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_damaged(journal: Journal) -> None:
    """Open nothing on a journal whose file is damaged (a tampered fact_hash would make a
    resumed run apply an applied fact again): `romebatch check` names every problem."""
    from .audit import audit

    problems = audit(journal.db)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise JournalDamagedError(
            f"journal {journal.directory} is damaged: {problems[0]}{more}",
            hint=f"run `romebatch check --journal {journal.directory}` to see every problem",
        )


def check_rollback_selector(*, to=None, steps=None, fact=None, base=False) -> None:
    """Exactly one way of naming the target state (checked before any model is loaded)."""
    chosen = [x is not None and x is not False for x in (to, steps, fact, base)]
    if sum(chosen) != 1:
        raise UserError("choose exactly one of --to N, --steps K, --fact ID, --base")
    if (to is not None and to < 0) or (steps is not None and steps < 0):
        raise UserError("--to and --steps take zero or more")


def _why_lost(standing: Standing) -> str:
    if standing.p_true is not None:
        return f"P(new) {standing.p_new:.3g} <= P(true) {standing.p_true:.3g}"
    return (
        f"P(new) {standing.p_new:.3g}, under half its {standing.record.p_new_after:.3g} "
        f"after edit {standing.record.seq}"
    )


def _edit_of(record: EditRecord) -> RankOneEdit:
    return RankOneEdit(
        record.layer, torch.from_numpy(record.lam), torch.from_numpy(record.u), record.denominator, record.update_norm
    )


def model_dtype(lm: LoadedModel) -> str:
    """ "float32", "bfloat16" or "float16": the dtype the model's weights are held in."""
    return str(next(lm.model.parameters()).dtype).removeprefix("torch.")


def _versions() -> dict:
    import transformers

    return {"romebatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
