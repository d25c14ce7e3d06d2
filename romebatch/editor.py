"""The editor: a model, a journal, and the moves between the journal's states.

`Editor` is the Python API behind every command:

    from romebatch import Editor, load_manifest
    with Editor("romebatch.journal") as editor:           # embedded Gemma-3-270M by default
        result = editor.apply(load_manifest("examples/facts.csv").facts)
        with editor.at(0):                                # the base model, for a moment
            ...
        editor.rollback(steps=1)
        editor.export("edited-model")

Opening an editor loads the model, checks that it is the journal's base model, and
replays the journal to its head (checking the stored weight hashes), so the model in
memory is always exactly the journal's head state. The work is done elsewhere, one concern
a module: the apply loop in `pipeline`, repair passes in `repair`, the guards in `guards`,
the once-computed ingredients in `ingredients`, export in `model_export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import model_export
from .applied_cache import AppliedCache
from .errors import JournalDamagedError, UserError
from .hparams import HParams
from .ingredients import Ingredients
from .journal import Journal
from .journal_records import EditRecord
from .manifest import Fact
from .model import LoadedModel, load_model, weight_hash
from .opening import check_every_edit, check_record, edit_of, init_or_check
from .outcomes import ApplyResult, CheckReport, FactResult, Log, StopRequest, stderr_log, stop_on_signals
from .pipeline import edit_window, run
from .repair import MAX_EDITS_PER_FACT, REPAIR_PLAN, REPAIR_SPAN, run_pass
from .repair_yield import PassReport
from .rome import KeyStats, apply_edit
from .rome.corpus import check_corpus_file
from .rome.preserve import Preserver

# Defined in `outcomes`; imported from here by callers since before the split.
__all__ = ["ApplyResult", "CheckReport", "Editor", "FactResult", "StopRequest", "stop_on_signals"]


class Editor:
    """A model opened at a journal's head, with apply / rollback / export and `at(state)`."""

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
        log: Log = stderr_log,
        lm: LoadedModel | None = None,
        device_map: str | dict | None = None,  # accelerate's dispatch (romebatch/device_map.py)
        max_memory: str | dict | None = None,
    ):
        self.log = log
        # A writer creates a missing journal unless told not to: every command but `apply`
        # passes create=False, so a mistyped path fails instead of quietly starting an empty
        # journal and acting on the unedited base model.
        self.journal = Journal(journal, write=write, create=write if create is None else create)
        # Set when the head could not be replayed on an open with verify=False: the model is left
        # at the base, `rollback` (and `check`) still work, anything that needs the head raises it.
        self._damaged_head: JournalDamagedError | None = None
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
            self.hparams = init_or_check(self.journal, self.lm, self.base_hash, hparams, module_template, log)
            if self.hparams.stats_corpus is not None:  # refused now, not after the first edit's prefixes
                check_corpus_file(self.hparams.stats_corpus)
            # The base weight of every layer an edit ever changed in this process, kept before
            # the first change (replay, a new edit, a roll-forward): what `at(0)` swaps in.
            self._base_weights: dict[int, torch.Tensor] = {}
            self.ingredients = Ingredients(self)
            self._applied = AppliedCache(self.journal)  # what the guard and probes read, kept per head
            self.stats_progress: Callable[[int, int], None] | None = None  # (tokens done, total)
            # (stage, fact id or None) before each stage of a run: "probes" (the base answers),
            # "editing", "repair scoring", "repairing", "repair yield"; the CLI's progress bar shows it.
            self.on_stage: Callable[[str, str | None], None] | None = None
            try:
                self.replay(verify=verify)
            except JournalDamagedError as error:
                if verify:
                    raise
                # Never require a damaged head to replay: a rollback replays straight to its
                # target from the base, and `check` replays every edit itself.
                self._damaged_head = error
                self.replay(0, verify=False)
        except BaseException:
            # A journal this run created and never committed to is removed, not left empty.
            self.journal.discard_if_new()
            self.journal.close()
            raise

    # -- the state and the moves between states -----------------------------------------
    @property
    def head(self) -> int:
        return self.journal.head

    def _base(self, layer: int) -> torch.Tensor:
        """The base weight of `layer`, kept once it is first touched (rollback restores from it)."""
        if layer not in self._base_weights:
            self._base_weights[layer] = self.lm.weight(layer).detach().clone()
        return self._base_weights[layer]

    def sound_head(self) -> None:
        """Refuse, with the damage found on opening, anything that needs the head's state."""
        if self._damaged_head is not None:
            raise self._damaged_head

    def _restore(self) -> None:
        """Back to the head's state (the base, if the head is damaged), unverified."""
        self.replay(0 if self._damaged_head is not None else None, verify=False)

    def replay(self, head: int | None = None, verify: bool = True) -> list[EditRecord]:
        """Make the in-memory model exactly state `head` (default: the journal's head).

        Every record on the path is checked against the model first (layer, weight, vector
        shapes, finite values): a damaged one raises JournalDamagedError, the weights untouched.
        """
        if head is None:
            self.sound_head()
        path = self.journal.lineage(head)
        for record in path:
            check_record(self.lm, record, self.journal.directory)
        layers = {r.layer for r in path} | set(self._base_weights)
        for layer in layers:
            base = self._base(layer)
            with torch.no_grad():
                self.lm.weight(layer).copy_(base)
        for record in path:
            apply_edit(self.lm, edit_of(record))
        if verify:
            last = {r.layer: r for r in path}
            for layer, record in last.items():
                actual = weight_hash(self.lm.weight(layer))
                if actual != record.weight_hash_after:
                    raise JournalDamagedError(
                        f"journal {self.journal.directory}: replaying to edit {record.seq} gives weight "
                        f"{actual[:19]}…, but the journal recorded {record.weight_hash_after[:19]}…",
                        hint="run `romebatch check` to find the first bad edit",
                    )
        return path

    @contextmanager
    def at(self, state: int, verify: bool = False) -> Iterator[None]:
        """The model at `state` (0: the base model) inside the block; on leaving it, even by an
        exception, back where it was (the head, for any state but 0).

        State 0 swaps the kept base weights of the edited layers in, and the weights they
        replace back out: O(layers), no replay. Another state is replayed to (its hashes
        checked if `verify`), and the head replayed back to.
        """
        self.sound_head()
        if state != 0:
            try:
                self.replay(state, verify=verify)
                yield
            finally:
                self.replay(verify=False)
            return
        held = {}
        with torch.no_grad():
            for layer, base in self._base_weights.items():
                weight = self.lm.weight(layer)
                held[layer] = weight.detach().clone()
                weight.copy_(base)
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, kept in held.items():
                    self.lm.weight(layer).copy_(kept)

    def check(self) -> CheckReport:
        """Replay every edit (every branch) and compare each stored hash; the model ends at the head."""
        return check_every_edit(self)

    # -- what every edit reads, computed once (romebatch/ingredients.py) ------------------
    def prefixes(self) -> list[str]:
        return self.ingredients.prefixes()

    def stats(self, layer: int, progress=None) -> KeyStats | None:
        return self.ingredients.stats(layer, progress)

    def preserver(self, layer: int) -> Preserver | None:
        return self.ingredients.preserver(layer)

    def fluency_reference(self) -> float:
        return self.ingredients.fluency_reference()

    # -- apply and repair (romebatch/pipeline.py, romebatch/repair.py) -------------------
    def pending(self, facts: list[Fact]) -> list[Fact]:
        return pending_facts(facts, self.journal)

    # The apply loop is pipeline.run; bound here, `editor.apply(facts, ...)` calls it on this editor.
    apply = run

    def repair(
        self,
        window: list[int] | None = None,
        *,
        max_edits: int = MAX_EDITS_PER_FACT,
        on_edit: Callable[[FactResult], None] | None = None,
        stop: StopRequest | None = None,
        span: int | None = REPAIR_SPAN,
        on_pass: Callable[[PassReport], None] | None = None,
    ) -> list[FactResult]:
        """Edit again, on the current weights, every fact on the head's path that no longer holds.

        Later edits wear earlier ones down (romebatch/repair.py); each fact is edited at most
        `max_edits` times on a path. A repair is an ordinary edit (guards on, no probes), with
        status "repaired"; a pass a crash or Ctrl-C cut short is finished by the next run.
        A pass checks at most `span` facts, in rotation over the path (0 or None: all).
        A pass this call finishes, planned here or resumed, is logged and given to `on_pass` as
        a `PassReport`: what it repaired against what its repairs undid (romebatch/repair_yield.py).
        """
        self.sound_head()
        return run_pass(self, window or edit_window(self), max_edits, on_edit, stop, span, on_pass)

    def stage(self, name: str, fact_id: str | None = None) -> None:
        if self.on_stage is not None:
            self.on_stage(name, fact_id)

    # -- rollback ----------------------------------------------------------------------
    def rollback(
        self, *, to: int | None = None, steps: int | None = None, fact: str | None = None, base: bool = False
    ) -> int:
        """Move the head (exactly one of the selectors) and rebuild that state; returns the new head.

        The target is replayed straight from the base and verified: the old head need not
        replay (a journal whose head is damaged is opened with verify=False and rolled back).
        """
        target = rollback_target(self.journal, to=to, steps=steps, fact=fact, base=base)
        try:
            self.replay(target)  # verify the target state before committing to it
        except BaseException:
            self._restore()  # refused: the model stays at the head, like the journal
            raise
        # A repair pass cut short on the old path does not describe the new one.
        self.journal.move_head(target, {REPAIR_PLAN: None})
        self._damaged_head = None
        return target

    def prune(self) -> int:
        return self.journal.prune()

    # -- export (romebatch/model_export.py) -----------------------------------------------
    def export(self, outdir: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
        """Write the head state as a model folder (safetensors, config, tokenizer, provenance, model card).

        `dtype` (float32, bfloat16, float16) casts the weights as they are written; the model
        in memory is not touched, so the journal's exact state stays what it is.
        """
        self.sound_head()
        return model_export.export(self, outdir, force=force, dtype=dtype)

    def provenance(self) -> dict:
        self.sound_head()
        return model_export.provenance(self)

    def close(self) -> None:
        self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.journal.discard_if_new()  # a run that failed before its first commit leaves no journal
        self.close()


def pending_facts(facts: list[Fact], journal: Journal, retry_rejected: bool = False) -> list[Fact]:
    """Facts not yet applied in `journal`, nor rejected (unless `retry_rejected`)."""
    settled = journal.applied_hashes() if retry_rejected else journal.settled_hashes()
    return [f for f in facts if f.hash not in settled]


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


def rollback_target(journal: Journal, *, to=None, steps=None, fact=None, base=False) -> int:
    """The state a rollback selector names in `journal` (exactly one selector), read from the
    journal alone, so a selector naming no state is refused before any model is loaded."""
    check_rollback_selector(to=to, steps=steps, fact=fact, base=base)
    if base:
        return 0
    if to is not None:
        if to != 0:
            journal.edit(to)  # refuses an edit the journal does not hold
        return to
    path = journal.lineage()
    if steps is not None:
        if steps > len(path):
            raise UserError(f"--steps {steps}: the head is {len(path)} edit(s) from the base")
        return path[-steps - 1].seq if steps < len(path) else 0
    matches = [r for r in path if r.fact_id == fact]
    if not matches:
        raise UserError(f"--fact {fact}: no applied edit has that fact id")
    return matches[0].parent  # the state just before that fact was edited


def check_rollback_selector(*, to=None, steps=None, fact=None, base=False) -> None:
    """Exactly one way of naming the target state (checked before any model is loaded)."""
    chosen = [x is not None and x is not False for x in (to, steps, fact, base)]
    if sum(chosen) != 1:
        raise UserError("choose exactly one of --to N, --steps K, --fact ID, --base")
    for name, value in (("--to", to), ("--steps", steps)):
        # 1.0 or True would name edit 1 to SQLite, and be stored as the head: only ints name states.
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"{name} {value!r}: not a whole number")
    if (to is not None and to < 0) or (steps is not None and steps < 0):
        raise UserError("--to and --steps take zero or more")
