"""What a run reports: one row per fact, the run's totals and exit status, an integrity report,
and the stop request that SIGINT/SIGTERM set."""

from __future__ import annotations

import signal
import statistics
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from .applied_cache import held_when_applied
from .errors import EXIT_FACTS_FAILED, EXIT_STOPPED_ON_REGRESSION, escape_controls, one_line
from .repair_yield import PassReport

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """Library callers' default progress line: it names model folders and files, which a user chose."""
    print(escape_controls(message), file=sys.stderr, flush=True)


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
        return held_when_applied(self.p_new_after, self.p_true_after)


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
    # The repair passes this run planned and finished: what each mended against what its
    # repairs undid (romebatch/repair_yield.py).
    repair_passes: list[PassReport] = field(default_factory=list)

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
            "repair_passes": [p.to_dict() for p in self.repair_passes],
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
    # What of the base model was compared with the journal's record when it opened: "whole model"
    # (every weight and the tokenizer) or "down-projections" (a journal older than those hashes);
    # None when the file was too damaged to open it.
    base_checked: str | None = None

    def __post_init__(self):
        # Each problem is one printed line whatever produced it: SQLite's own messages
        # (integrity_check) and text read from a damaged file may hold newlines.
        self.problems = [one_line(p) for p in self.problems]

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
