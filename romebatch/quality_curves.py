"""`romebatch report`: where quality went over thousands of edits, from what the journal stores.

No model is loaded: every number is read from the edits on the head's path, in the order
they were made, grouped in windows of `every` edits (100 by default). Per window:

- ES: share of the window's edits whose new object beat the true one right after the
  edit (P(new) > P(true), the efficacy test), and their mean P(new) then;
- NS kept: 100 × (1 − mean neighbourhood drop) of the probes run after each edit
  (the share of each fact's neighbourhood prompts the edit left alone);
- probe regression: mean share of sampled probes that lost half their base probability;
- retention: mean share of sampled earlier edits that still held after each edit;
- repairs, warnings and rejections in the window, and the median update norm.

The three probe columns exist only for edits made with the regression checks on
(`apply` without `--no-probes`). PS (paraphrases) is not stored per edit: `romebatch
verify` scores it on the head, `romebatch compare` shows it prompt by prompt.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .plots import check_png_path, figure_text, save_figure


@dataclass
class Window:
    start: int  # first edit number on the path in this window (1-based)
    end: int  # last one
    edits: int
    es: float | None  # %
    p_new_after: float | None
    ns_kept: float | None  # %
    probe_regression: float | None  # %
    retention: float | None  # %
    repairs: int
    warned: int
    rejected: int
    update_norm: float | None  # median


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def windows(journal, every: int = 100) -> list[Window]:
    """The head's path in windows of `every` edits, oldest first."""
    if every < 1:
        raise UserError(f"--every {every}: give a number of edits, at least 1")
    rows = journal.db.execute("SELECT * FROM edits").fetchall()
    by_seq = {row["seq"]: dict(row) for row in rows}
    path = [by_seq[seq] for seq in journal.chain()]
    position = {edit["seq"]: n for n, edit in enumerate(path, 1)}
    seen: set[str] = set()
    for edit in path:  # a repair edits a fact already on the path (romebatch/repair.py)
        edit["repair"] = edit["fact_hash"] in seen
        seen.add(edit["fact_hash"])
    # A rejection belongs where it happened: the edit after the state it was computed on.
    rejected_at = [
        position.get(r["parent"], 0) + 1 for r in journal.rejections() if r["parent"] == 0 or r["parent"] in position
    ]
    result = []
    for start in range(0, len(path), every):
        part = path[start : start + every]
        first, last = start + 1, start + len(part)
        scored = [e for e in part if e["p_new_after"] is not None and e["p_true_after"] is not None]
        drops = _mean(e.get("neighborhood_drop") for e in part)
        result.append(
            Window(
                start=first,
                end=last,
                edits=len(part),
                es=100.0 * sum(e["p_new_after"] > e["p_true_after"] for e in scored) / len(scored) if scored else None,
                p_new_after=_mean(e["p_new_after"] for e in part),
                ns_kept=None if drops is None else 100.0 * (1.0 - drops),
                probe_regression=_pct(_mean(e.get("probe_regression") for e in part)),
                retention=_pct(_mean(e.get("retention") for e in part)),
                repairs=sum(e["repair"] for e in part),
                warned=sum(bool(e.get("warning")) for e in part),
                rejected=sum(first <= n <= last for n in rejected_at),
                update_norm=statistics.median(e["update_norm"] for e in part),
            )
        )
    return result


@dataclass
class RepairPass:
    """One repair pass on the path: it scored every fact edited so far and re-edited the lost ones."""

    at: int  # edits on the path before the pass began
    facts: int  # distinct facts on the path then
    lost: int  # facts it found no longer holding: its repairs, and repairs it had to reject
    held: float  # % of the facts still holding when it began (facts at the per-fact repair cap count as held)


def repair_passes(journal) -> list[RepairPass]:
    """The repair passes whose end is on the head's path, from the journal's pass marks."""
    marks = set(journal.get("repair_passes") or [])
    path = journal.lineage_facts()
    rejections = [(r["parent"], r["fact_hash"]) for r in journal.rejections()]
    result, seen, run = [], set(), []  # run: positions of the repairs since the last first edit
    for n, (seq, fact_hash) in enumerate(path, 1):
        if fact_hash in seen:
            run.append(n)
        else:
            run = []
        seen.add(fact_hash)
        if seq in marks:
            start = run[0] - 1 if run else n  # the pass began after edit `start`
            before = {h for _, h in path[:start]}
            states = {path[i - 1][0] for i in range(start, n)} | ({0} if start == 0 else set())
            # A refused repair: rejected on one of the pass's states, for a fact already edited.
            refused = sum(parent in states and h in before for parent, h in rejections)
            lost = len(run) + refused
            result.append(
                RepairPass(
                    at=start, facts=len(before), lost=lost, held=100.0 * (1 - lost / len(before)) if before else 100.0
                )
            )
            run = []
    return result


def curves(journal_dir, every: int = 100) -> dict:
    """The report for a journal directory: its meta and its windows (what `report --json` prints)."""
    from .journal import Journal

    with Journal(journal_dir) as journal:
        found = windows(journal, every)
        return {
            "journal": str(journal.directory),
            "model": journal.get("model"),
            "head": journal.head,
            "every": every,
            "edits": found[-1].end if found else 0,
            "windows": [asdict(w) for w in found],
            "repair_passes": [asdict(p) for p in repair_passes(journal)],
        }


SERIES = (
    ("es", "ES (when made)"),
    ("ns_kept", "NS kept"),
    ("retention", "retention"),
    ("probe_regression", "probe regression"),
)


def save_png(report: dict, path: str | Path) -> Path:
    """Two panels against the number of edits: the scores in %, and repairs / warnings / rejections.

    Drawn into a temporary file beside `path` and renamed into place: a failure leaves the
    old file (or none), never half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = check_png_path(path)
    found = report["windows"]
    x = [w["end"] for w in found]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    for key, label in SERIES:
        points = [(xi, w[key]) for xi, w in zip(x, found) if w[key] is not None]
        if points:
            top.plot(*zip(*points), marker="o", markersize=3, label=label)
    passes = report["repair_passes"]
    if passes:
        top.plot(
            [p["at"] for p in passes],
            [p["held"] for p in passes],
            marker="s",
            markersize=3,
            linestyle="--",
            label="facts still holding at each repair pass",
        )
    top.set_ylabel("%")
    top.set_ylim(-2, 102)
    top.grid(alpha=0.3)
    if top.get_legend_handles_labels()[0]:  # a journal without scores draws no curve
        top.legend(fontsize=8, loc="lower left")
    # The model name as stored, on one line, not read as mathtext ($...$).
    model = figure_text(report["model"])
    top.set_title(f"{model}: {report['edits']} edits on the head's path, windows of {report['every']}", fontsize=9)
    width = report["every"] * 0.28
    for offset, (key, label) in zip(
        (-width, 0, width), (("repairs", "repairs"), ("warned", "warnings"), ("rejected", "rejections"))
    ):
        bottom.bar([xi - report["every"] / 2 + offset for xi in x], [w[key] for w in found], width=width, label=label)
    bottom.set_xlabel("edits")
    bottom.set_ylabel("per window")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def render(console, report: dict) -> None:
    """A compact table, one row per window."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .report import literal

    def fmt(value, spec=".1f"):
        return "-" if value is None else format(value, spec)

    # A line of its own, not the table's title: a title wraps at the table's width.
    header = literal(
        f"journal {report['journal']} · {report['model']} · head {report['head']} · {report['edits']} edits on its path"
    )
    table = Table(box=box.SIMPLE_HEAD)
    # Short headers: the table fits 80 columns (the legend below says what each is).
    for column in ("edits", "ES%", "P(new)", "NS%", "probe%", "ret.%", "rep.", "warn", "rej.", "‖ΔW‖"):
        table.add_column(column, justify="right", no_wrap=True)
    for w in report["windows"]:
        table.add_row(
            f"{w['start']}-{w['end']}",
            fmt(w["es"]),
            fmt(w["p_new_after"], ".3f"),
            fmt(w["ns_kept"]),
            fmt(w["probe_regression"]),
            fmt(w["retention"]),
            str(w["repairs"]),
            str(w["warned"]),
            str(w["rejected"]),
            fmt(w["update_norm"], ".2f"),
        )
    if not report["windows"]:
        console.print(literal(f"journal {report['journal']}: no edits on the head's path"))
        return
    console.print(header)
    console.print(table)
    console.print(
        Text(
            "ES%: new object won right after the edit · P(new) after it · NS%: neighbourhood prompts "
            "left alone · probe%: sampled probes that lost half their probability · ret.%: sampled "
            "earlier edits still holding · repairs, warnings, rejections · median update norm"
        )
    )
    if report["repair_passes"]:
        console.print(
            Text(
                "repair passes (facts still holding when each began): "
                + ", ".join(f"{p['facts'] - p['lost']}/{p['facts']} at {p['at']}" for p in report["repair_passes"])
            )
        )
    if all(w["ns_kept"] is None for w in report["windows"]):
        console.print(
            Text("no probe scores stored (edits made with --no-probes): NS, probe regression and retention are empty")
        )
