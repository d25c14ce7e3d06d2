"""The results table (polars, one row per fact) and the rich terminal report.

The table's columns and dtypes are declared once in `RESULTS_SCHEMA`; the README's column
reference is checked against it by a test.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError, escape_controls, one_line

RESULT_SUFFIXES = (".parquet", ".csv")
# A cell a spreadsheet would run as a formula (CSV injection): such cells get a leading
# apostrophe, which spreadsheets show as text and strip from the value.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe(value) -> str:
    """A user string as rich prints it literally inside markup: control characters escaped, markup escaped."""
    from rich.markup import escape

    return escape(one_line(str(value)))


def literal(value, style: str = ""):
    """A user string as a rich `Text`: never parsed as markup, its controls escaped (`escape_controls`)."""
    from rich.text import Text

    return Text(escape_controls(value), style=style)


def check_results_path(path: str | Path | None, option: str = "--results") -> None:
    """Refuse a results file name before any work is done, not after the whole run."""
    if path is None:
        return
    path = Path(path)
    if path.suffix not in RESULT_SUFFIXES:
        raise UserError(f"{option} {one_line(str(path))}: use a .parquet or .csv file name")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{option} {one_line(str(path))}: folder {one_line(str(parent))} does not exist")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {one_line(str(path))}: exists and is not a file")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} {one_line(str(path))}: folder {one_line(str(parent))} is not writable")


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
    check_results_path(path)
    # Written beside the target and renamed into place: a full disk leaves the old file (or none).
    staging = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix == ".parquet":
            # Parquet carries key-value metadata: the run that made the table (a CSV cannot).
            import json

            frame.write_parquet(
                staging, metadata={"romebatch": json.dumps(metadata, default=str)} if metadata else None
            )
        else:
            csv_safe(frame).write_csv(staging)
        os.replace(staging, path)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise UserError(
            f"could not write {one_line(str(path))} ({error.strerror or error})",
            hint="free some space; the journal holds every result, so nothing is lost",
        ) from None
    return path


def csv_safe(frame):
    """String cells that a spreadsheet would evaluate, made inert (see _FORMULA_STARTS)."""
    import polars as pl

    columns = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    if not columns:
        return frame
    return frame.with_columns(
        pl.when(_starts_with_any(c)).then(pl.lit("'") + pl.col(c)).otherwise(pl.col(c)).alias(c) for c in columns
    )


def _starts_with_any(column: str):
    import polars as pl

    expression = pl.lit(False)
    for start in _FORMULA_STARTS:
        expression = expression | pl.col(column).str.starts_with(start)
    return expression


def write_frame(frame, path: str | Path) -> Path:
    """Any table (trace effects, say) written the way the results tables are."""
    return _write(frame, Path(path))


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
        f"[bold]{s['applied']} applied[/], "
        + (f"{s['repaired']} repaired, " if s["repaired"] else "")
        + f"{s['already_applied']} already in the journal, "
        f"{s['rejected']} rejected, {s['failed']} failed in {s['seconds']:.1f}s "
        f"(journal {safe(s['journal'])}, head {s['head']})" + ("  [yellow]interrupted[/]" if s["interrupted"] else "")
    )
    if s["applied"]:
        console.print(
            f"efficacy {_fmt(s['efficacy'], '.1f')}%  ·  median {_fmt(s['median_seconds_per_edit'], '.1f')}s per edit  ·  "
            f"update norm median {_fmt(s['median_update_norm'], '.3g')}, max {_fmt(s['max_update_norm'], '.3g')}"
        )
    passes = result.repair_passes
    if passes:
        last = passes[-1]
        console.print(
            f"{len(passes)} repair pass{'es' if len(passes) > 1 else ''}, {sum(p.repaired for p in passes)} repaired; "
            f"the last (edit {last.head}): {last.details()}",
            style="yellow" if last.saturated else None,
            markup=False,
        )
    shown = [r for r in result.results if r.status != "already_applied"]
    if not shown:
        return
    table = Table(title="edits", show_lines=False)
    for column in ("id", "subject", "new", "status", "P(new) before → after", "P(true) after", "‖ΔW‖", "s"):
        table.add_column(column)
    for r in shown[:50]:
        style = {
            "applied": "green" if r.success else "yellow",
            "repaired": "cyan",
            "rejected": "red",
            "failed": "red",
        }.get(r.status, "")
        table.add_row(
            safe(r.fact_id),
            safe(r.subject),
            safe(r.target_new),
            f"[{style}]{r.status}[/]" if style else r.status,
            f"{_fmt(r.p_new_before)} → {_fmt(r.p_new_after)}",
            _fmt(r.p_true_after),
            _fmt(r.update_norm, ".3g"),
            _fmt(r.seconds, ".1f"),
        )
    if len(shown) > 50:
        table.caption = f"first 50 of {len(shown)} rows; the full table is in --results"
    console.print(table)
    for r in shown:
        if r.reason and r.status in ("rejected", "failed"):
            console.print(f"[red]{r.status}[/] {safe(r.fact_id)}: {safe(r.reason)}")


def render_verify(console, report) -> None:
    from rich.table import Table

    table = Table(
        title=f"verify: journal {safe(report.journal)}, head {report.head}, {len(report.rows)} applied fact(s)"
    )
    for column in ("", "ES", "PS", "NS", "S"):
        table.add_column(column, justify="right")
    for name, scores in (("base", report.base), ("head", report.edited)):
        table.add_row(name, *(_fmt(scores.get(k), ".1f") for k in ("ES", "PS", "NS", "S")))
    console.print(table)
    console.print(f"retention of edits that took: {_fmt(report.retention, '.1f')}%")
    for row in report.worst:
        console.print(
            f"  worst: {safe(row.fact_id)} ({safe(row.subject)} -> {safe(row.target_new)}) broke "
            f"{row.neighborhood_drop:.0%} of its neighbourhood"
        )
    for problem in report.problems:
        console.print(f"[red]regression[/]: {safe(problem)}")
    if report.ok:
        console.print("[green]within thresholds[/]")


def render_tune(console, result) -> None:
    """`romebatch tune`: the grid beside the unedited row, the sequential check, the choice and the preset."""
    from rich.table import Table

    u = result.unedited
    table = Table(title=f"tune: {safe(result.model)} ({u['n']} facts, each edited alone and rolled back)")
    for column in ("setting", "ES", "PS", "NS", "S", "NS within tol.", "seq. NS loss", "seq. ES", ""):
        table.add_column(column)
    table.add_row(
        "unedited",
        _fmt(u["ES"], ".1f"),
        _fmt(u["PS"], ".1f"),
        _fmt(u["NS"], ".1f"),
        _fmt(u["S"], ".1f"),
        "",
        "",
        "",
        "",
    )
    for row in result.table():
        table.add_row(
            row["setting"],
            _fmt(row["ES"], ".1f"),
            _fmt(row["PS"], ".1f"),
            _fmt(row["NS"], ".1f"),
            _fmt(row["S"], ".1f"),
            "yes" if row["eligible"] else "no",
            _fmt(row["seq_ns_loss"], ".1f"),
            _fmt(row["seq_ES"], ".1f"),
            "[bold green]chosen[/]" if row["chosen"] else "",
        )
    console.print(table)
    console.print(f"rule: {safe(result.rule)}", highlight=False)
    console.print(
        f"chosen: layer {result.chosen.layer}, clamp_norm_factor {result.chosen.clamp:g} "
        f"({result.seconds / 60:.1f} min)",
        highlight=False,
    )
    if result.preset_path:
        console.print(
            f"saved as this model's preset in {safe(result.preset_path)}; `romebatch apply` on "
            "this model now uses it unless a flag or --hparams says otherwise",
            highlight=False,
        )


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
    console.print(
        Text(
            f"{len(warned)} edit(s) kept with a regression warning"
            + (f"; the {top} most damaging:" if len(warned) > top else ":"),
            style="yellow",
        )
    )
    for r in sorted(warned, key=damage, reverse=True)[:top]:
        console.print(
            Text("  warned ", style="yellow")
            + literal(f"{r.fact_id} (edit {r.seq}, damage {damage(r):.0%}): {r.warning}")
        )
