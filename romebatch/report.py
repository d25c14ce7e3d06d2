"""The results table (polars, one row per fact) and the rich terminal report.

The table's columns and dtypes are declared once in `RESULTS_SCHEMA`; the README's column
reference is checked against it by a test.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

# name -> (polars dtype name, description for the README)
RESULTS_SCHEMA: dict[str, tuple[str, str]] = {
    "fact_id": ("String", "the fact's id from the manifest"),
    "fact_hash": ("String", "content hash of (subject, prompt, target_new)"),
    "subject": ("String", "the subject"),
    "target_new": ("String", "the new object"),
    "target_true": ("String", "the true object, when the manifest gives it"),
    "status": ("String", "applied, repaired (edited again: it no longer held), already_applied, rejected or failed"),
    "reason": ("String", "why a fact was rejected, failed or skipped"),
    "seq": ("Int64", "the edit's sequence number in the journal"),
    "layer": ("Int64", "the edited layer"),
    "p_new_before": ("Float64", "P(target_new | prompt) before the edit (length-normalised)"),
    "p_true_before": ("Float64", "P(target_true | prompt) before the edit"),
    "p_new_after": ("Float64", "P(target_new | prompt) after the edit"),
    "p_true_after": ("Float64", "P(target_true | prompt) after the edit"),
    "success": ("Boolean", "p_new_after > p_true_after (efficacy)"),
    "update_norm": ("Float64", "Frobenius norm of the rank-one update"),
    "denominator": ("Float64", "uᵀk* of the update; tiny values flag a dangerous edit"),
    "v_steps": ("Int64", "Adam steps taken to find v*"),
    "neighborhood_drop": ("Float64", "share of the fact's neighbourhood prompts the edit flipped to its new object"),
    "probe_regression": ("Float64", "share of sampled probes that lost half their base probability"),
    "retention": ("Float64", "share of sampled earlier edits that still held after this edit"),
    "seconds": ("Float64", "wall time of the edit, probes included"),
    "warning": ("String", "the regression checks that failed on an edit kept by --on-regression warn"),
}


VERIFY_SCHEMA: dict[str, tuple[str, str]] = {
    "fact_id": ("String", "the fact's id"),
    "seq": ("Int64", "its edit's sequence number"),
    "subject": ("String", "the subject"),
    "target_new": ("String", "the new object"),
    "p_new_base": ("Float64", "P(target_new) on the base model"),
    "p_new_head": ("Float64", "P(target_new) at the journal's head"),
    "p_true_base": ("Float64", "P(target_true) on the base model"),
    "p_true_head": ("Float64", "P(target_true) at the head"),
    "efficacy": ("Float64", "1 if the new object beats the true one at the head"),
    "paraphrase": ("Float64", "share of paraphrases where it does"),
    "neighborhood_base": ("Float64", "share of neighbourhood prompts whose answer beats the new object, base"),
    "neighborhood_head": ("Float64", "the same at the head"),
    "neighborhood_drop": ("Float64", "neighborhood_base - neighborhood_head"),
    "held_when_applied": ("Boolean", "the edit took when it was applied"),
    "holds_now": ("Boolean", "it still holds at the head"),
}


def _frame(items, schema):
    import polars as pl

    rows = [{name: getattr(item, name) for name in schema} for item in items]
    dtypes = {name: getattr(pl, dtype) for name, (dtype, _) in schema.items()}
    return pl.DataFrame(rows, schema=dtypes, orient="row") if rows else pl.DataFrame(schema=dtypes)


def _write(frame, path: Path, metadata: dict | None = None) -> Path:
    if path.suffix == ".parquet":
        # Parquet carries key-value metadata: the run that made the table (a CSV cannot).
        import json

        frame.write_parquet(path, metadata={"romebatch": json.dumps(metadata, default=str)} if metadata else None)
    elif path.suffix == ".csv":
        frame.write_csv(path)
    else:
        raise UserError(f"--results {path}: use a .parquet or .csv file name")
    return path


def write_verify_results(rows, path: str | Path) -> Path:
    return _write(_frame(rows, VERIFY_SCHEMA), Path(path))


def results_frame(results):
    return _frame(results, RESULTS_SCHEMA)  # `success` is a property of FactResult


def write_results(results, path: str | Path, metadata: dict | None = None) -> Path:
    """The per-fact table; `metadata` (e.g. `ApplyResult.summary()`) goes into a Parquet file's metadata."""
    return _write(results_frame(results), Path(path), metadata)


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_apply(console, result) -> None:
    """The end-of-run report: counts, efficacy, the slowest and largest edits."""
    from rich.table import Table

    s = result.summary()
    console.print(
        f"[bold]{s['applied']} applied[/], " + (f"{s['repaired']} repaired, " if s["repaired"] else "")
        + f"{s['already_applied']} already in the journal, "
        f"{s['rejected']} rejected, {s['failed']} failed in {s['seconds']:.1f}s "
        f"(journal {s['journal']}, head {s['head']})" + ("  [yellow]interrupted[/]" if s["interrupted"] else ""))
    if s["applied"]:
        console.print(
            f"efficacy {_fmt(s['efficacy'], '.1f')}%  ·  median {_fmt(s['median_seconds_per_edit'], '.1f')}s per edit  ·  "
            f"update norm median {_fmt(s['median_update_norm'], '.3g')}, max {_fmt(s['max_update_norm'], '.3g')}")
    shown = [r for r in result.results if r.status != "already_applied"]
    if not shown:
        return
    table = Table(title="edits", show_lines=False)
    for column in ("id", "subject", "new", "status", "P(new) before → after", "P(true) after", "‖ΔW‖", "s"):
        table.add_column(column)
    for r in shown[:50]:
        style = {"applied": "green" if r.success else "yellow", "repaired": "cyan", "rejected": "red",
                 "failed": "red"}.get(r.status, "")
        table.add_row(r.fact_id, r.subject, r.target_new, f"[{style}]{r.status}[/]" if style else r.status,
                      f"{_fmt(r.p_new_before)} → {_fmt(r.p_new_after)}", _fmt(r.p_true_after),
                      _fmt(r.update_norm, ".3g"), _fmt(r.seconds, ".1f"))
    if len(shown) > 50:
        table.caption = f"first 50 of {len(shown)} rows; the full table is in --results"
    console.print(table)
    for r in shown:
        if r.reason and r.status in ("rejected", "failed"):
            console.print(f"[red]{r.status}[/] {r.fact_id}: {r.reason}")


def render_log(console, data: dict) -> None:
    from rich.table import Table

    console.print(f"journal {data['journal']} · model {data['model']} · head {data['head']}")
    table = Table()
    for column in ("seq", "parent", "status", "fact", "subject", "new", "layer", "‖ΔW‖", "P(new) after"):
        table.add_column(column)
    for e in data["edits"]:
        status = e["status"] + (" (repair)" if e.get("repair") else "") + (" (head)" if e["seq"] == data["head"] else "")
        table.add_row(str(e["seq"]), str(e["parent"]), status, e["fact_id"], e["subject"], e["target_new"],
                      str(e["layer"]), _fmt(e["update_norm"], ".3g"), _fmt(e["p_new_after"]))
    console.print(table)
    if data["rejections"]:
        console.print(f"{len(data['rejections'])} rejected fact(s):")
        for row in data["rejections"]:
            console.print(f"  {row['fact_id']}: {row['reason']}")


def render_verify(console, report) -> None:
    from rich.table import Table

    table = Table(title=f"verify: journal {report.journal}, head {report.head}, {len(report.rows)} applied fact(s)")
    for column in ("", "ES", "PS", "NS", "S"):
        table.add_column(column, justify="right")
    for name, scores in (("base", report.base), ("head", report.edited)):
        table.add_row(name, *(_fmt(scores.get(k), ".1f") for k in ("ES", "PS", "NS", "S")))
    console.print(table)
    console.print(f"retention of edits that took: {_fmt(report.retention, '.1f')}%")
    for row in report.worst:
        console.print(f"  worst: {row.fact_id} ({row.subject} -> {row.target_new}) broke "
                      f"{row.neighborhood_drop:.0%} of its neighbourhood")
    for problem in report.problems:
        console.print(f"[red]regression[/]: {problem}")
    if report.ok:
        console.print("[green]within thresholds[/]")


def damage(row) -> float:
    """How badly a warned edit failed its checks: its worst share (0..1) over the three probes."""
    worst = [row.neighborhood_drop or 0.0, row.probe_regression or 0.0]
    if row.retention is not None:
        worst.append(1.0 - row.retention)
    return max(worst)


def render_warnings(console, results, top: int = 10) -> None:
    """The warned edits of a run (kept by --on-regression warn), the most damaging first."""
    from rich.text import Text

    warned = [r for r in results if r.warning]
    if not warned:
        return
    console.print(Text(f"{len(warned)} edit(s) kept with a regression warning"
                       + (f"; the {top} most damaging:" if len(warned) > top else ":"), style="yellow"))
    for r in sorted(warned, key=damage, reverse=True)[:top]:
        console.print(Text("  warned ", style="yellow") + Text(f"{r.fact_id} (edit {r.seq}, damage {damage(r):.0%}): "
                                                              f"{r.warning}"))
