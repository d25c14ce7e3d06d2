"""`apply`'s live progress: one bar for the key statistics, one for the edits.

The edits' bar shows elapsed time, ETA, seconds per edit, the fact being edited, and the
probes' base answers and repair passes as stages of their own; warnings are counted on it
and the latest named. Per-edit lines go to the log: always without a terminal (logs), with
-v under the live bar.
"""

from __future__ import annotations

import logging

from .cli_options import LOG

STAGE_LABELS = {
    "editing": "editing",
    "repairing": "repair pass",
    "repair scoring": "repair pass (scoring)",
    "repair yield": "repair pass (scoring again)",
    "probes": "probes (base answers)",
}


class ApplyProgress:
    """The callbacks `api.apply` takes (`on_edit`, `on_stage`, `stats_progress`), drawn on `console`."""

    def __init__(self, console, total: int, json_out: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console, self.json_out = console, json_out
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=json_out or not console.is_terminal,
        )
        self.total = total
        self.stats_task = self.progress.add_task("", total=None, visible=False, label="key statistics (tokens)")
        self.task = self.progress.add_task("", total=total, label="editing")
        self.warned: list[tuple[str, str]] = []  # (fact id, warning) of the edits kept with a failed check
        self.timed: list[float] = []  # seconds of each edit made in this run

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def done(self) -> None:
        self.progress.update(self.task, completed=self.total)

    def on_stats(self, done, total) -> None:
        self.progress.update(self.stats_task, completed=done, total=total, visible=True)

    def status_line(self, first: str | None = None) -> str:
        from rich.markup import escape

        from .errors import one_line

        parts = [first] if first else []
        if self.timed:
            parts.append(f"{sum(self.timed) / len(self.timed):.1f} s/edit")
        if self.warned:
            parts.append(f"{len(self.warned)} warned, latest {self.warned[-1][0]}: {self.warned[-1][1]}")
        return escape(one_line(" · ".join(parts)))

    def on_stage(self, stage, fact_id) -> None:
        # Repairs and the probes' base answers are stages of their own on the bar's label.
        self.progress.update(
            self.task,
            label=STAGE_LABELS.get(stage, stage),
            description=self.status_line(f"now {fact_id}" if fact_id else None),
            refresh=True,
        )

    def on_edit(self, row) -> None:
        if row.warning:
            self.warned.append((row.fact_id, row.warning))
        if row.seconds is not None and row.status in ("applied", "repaired", "rejected"):
            self.timed.append(row.seconds)
        # A repair edits a fact the bar has counted already.
        self.progress.update(
            self.task,
            advance=row.status != "repaired",
            description=self.status_line(f"{row.fact_id}: {row.status}"),
            refresh=True,
        )  # drawn now: an edit takes seconds, a refresh microseconds
        if not self.json_out:
            # One line per edit: always without a terminal (logs), with -v under the live bar.
            line = (
                f"{row.fact_id}: {row.status}{' (warned)' if row.warning else ''} {row.subject} -> {row.target_new}"
                + (f" P(new) {row.p_new_before:.3f} -> {row.p_new_after:.3f}" if row.p_new_after is not None else "")
                + (f" ({row.reason})" if row.reason else "")
            )
            LOG.log(logging.DEBUG if self.console.is_terminal else logging.INFO, line)
