"""The commands that only look: `log`, `check`, `verify`, `trace`, `compare` and `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_options import (
    DEFAULT_JOURNAL,
    FormatOpt,
    JournalOpt,
    JsonOpt,
    ResultsOpt,
    console,
    emit_json,
    manifest_arg,
    say,
    with_loading,
)


def log_(
    journal: JournalOpt = DEFAULT_JOURNAL,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", help="Show the last N matching edits and rejections (0: all); default 20, all with --json."
        ),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only edits that are applied (on the head's path), rolled_back, repaired or warned; or rejected facts."
        ),
    ] = None,
    fact: Annotated[str | None, typer.Option("--fact", help="Only this fact id.")] = None,
    since: Annotated[int | None, typer.Option("--since", help="Only edits after edit N.")] = None,
    json_out: JsonOpt = False,
):
    """A summary of the journal, then its last edits and rejected facts (filters: --status, --fact, --since)."""
    from . import api
    from .logview import DEFAULT_LIMIT, render

    data = api.log(
        journal, status=status, fact=fact, since=since, limit=limit if limit is not None or json_out else DEFAULT_LIMIT
    )
    if json_out:
        emit_json(data)
    else:
        render(console(), data)


@with_loading
def verify(
    journal: JournalOpt = DEFAULT_JOURNAL,
    manifest: Annotated[
        Path | None, typer.Option(help="Score with this manifest's probes (applied facts only; '-': stdin).")
    ] = None,
    manifest_format: FormatOpt = None,
    max_ns_drop: Annotated[float, typer.Option(help="Points NS may fall below the base model's.")] = 5.0,
    min_retention: Annotated[
        float, typer.Option(help="Share (0..1) of the edits that took which must still hold, as in apply.")
    ] = 0.9,
    min_efficacy: Annotated[float, typer.Option(help="Share (0..1) of applied facts whose new object must win.")] = 0.0,
    results: ResultsOpt = None,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    json_out: JsonOpt = False,
):
    """Specificity regression of the journal's head against the base model. Exit 1 on regression."""
    from . import api
    from .report import check_results_path, render_verify
    from .specificity import VerifyThresholds

    check_results_path(results)
    thresholds = VerifyThresholds(max_ns_drop=max_ns_drop, min_retention=min_retention, min_efficacy=min_efficacy)
    report = api.verify(
        journal,
        manifest=manifest_arg(manifest, manifest_format),
        thresholds=thresholds,
        results=results,
        **(loading or {}),
    )
    if json_out:
        emit_json(report.summary())
    else:
        render_verify(console(), report)
    if not report.ok:
        raise typer.Exit(1)


@with_loading
def trace(
    prompt: Annotated[str | None, typer.Option(help="The prompt, subject included.")] = None,
    subject: Annotated[str | None, typer.Option(help="The subject whose embeddings are corrupted.")] = None,
    answer: Annotated[str | None, typer.Option(help="Answer to trace (default: the model's prediction).")] = None,
    facts: Annotated[
        Path | None,
        typer.Option(
            "--facts",
            help="Known-facts JSON (prompt, subject, attribute) or a manifest ('-': stdin): average over them.",
        ),
    ] = None,
    manifest_format: FormatOpt = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N facts of --facts.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the heatmaps (or the average) as a PNG.")] = None,
    results: Annotated[Path | None, typer.Option(help="Write the indirect effects (.parquet or .csv).")] = None,
    samples: Annotated[int, typer.Option(help="Noise samples per cell.")] = 10,
    noise: Annotated[float, typer.Option(help="Noise scale, in embedding standard deviations.")] = 3.0,
    window: Annotated[int, typer.Option(help="Layers restored together for MLP and attention.")] = 10,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    journal: Annotated[
        Path,
        typer.Option(
            "--journal",
            "-j",
            envvar="ROMEBATCH_JOURNAL",
            help="Journal whose model to trace when --model is not given (if it exists).",
        ),
    ] = DEFAULT_JOURNAL,
    json_out: JsonOpt = False,
):
    """Causal tracing (ROME §2): where a fact lives, and which layer to edit."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import api
    from .errors import UserError
    from .plots import check_png_path, render_trace, save_average_png, save_trace_png
    from .report import check_results_path

    check_results_path(results)
    if out is not None:
        check_png_path(out)
    if samples < 1 or window < 1 or not noise > 0 or (limit is not None and limit < 1):
        raise UserError("--samples, --window and --limit must be at least 1, and --noise positive")
    screen = console()
    settings: dict[str, Any] = {"journal": journal, "samples": samples, "noise": noise, "window": window}
    if facts is None:
        result = api.trace(prompt, subject, answer, **settings, **(loading or {}))
        rows = result.to_rows()
        if out:
            save_trace_png(result, out)
        if json_out:
            emit_json(
                {
                    "prompt": result.prompt,
                    "answer": result.answer,
                    "p_clean": result.p_clean,
                    "p_corrupt": result.p_corrupt,
                    "tokens": result.tokens,
                    "subject_tokens": list(result.subject_tokens),
                    "scores": {k: v.tolist() for k, v in result.scores.items()},
                }
            )
        else:
            render_trace(screen, result)
    else:
        progress = Progress(
            TextColumn("[bold]tracing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=screen,
            disable=json_out or not screen.is_terminal,
        )
        task = progress.add_task("", total=None)
        with progress:
            effect, layer, traced = api.trace(
                facts_file=manifest_arg(facts, manifest_format),
                limit=limit,
                **settings,
                **(loading or {}),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        rows = [row for r in traced for row in r.to_rows()]
        if out:
            save_average_png(effect, layer, len(traced), out)
        if json_out:
            emit_json({"facts": len(traced), "mlp_effect_by_layer": effect.tolist(), "recommended_layer": layer})
        else:
            for index, value in enumerate(effect):
                bar = "█" * max(0, int(round(40 * value / max(effect.max(), 1e-9))))
                say(f"layer {index:>3}  {value:+.4f}  {bar}")
            say(
                f"recommended edit layer: {layer} (MLP effect at the subject's last token, mean of "
                f"{len(traced)} facts; cached for `apply --layer auto`)"
            )
    if results:
        import polars as pl

        from .report import write_frame

        write_frame(pl.DataFrame(rows), results)
    if out and not json_out:
        say(f"wrote {out}")


@with_loading
def check(
    journal: JournalOpt = DEFAULT_JOURNAL,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    json_out: JsonOpt = False,
):
    """Verify the journal: base model identity and every edit's hashes, by replay. Exit 1 if damaged."""
    from . import api

    report = api.check(journal, **(loading or {}))
    if json_out:
        emit_json(
            {
                "journal": report.journal,
                "ok": report.ok,
                "edits": report.edits,
                "head": report.head,
                "problems": report.problems,
                "last_good": report.last_good,
                "base_checked": report.base_checked,
            }
        )
    else:
        for line in report.problems:
            say(f"damaged: {line}")
        if report.ok:
            say(f"journal {journal}: {report.edits} edit(s) verified by replay, head {report.head}")
            if report.base_checked == "down-projections":
                say(
                    "  base model matched on its down-projections only: the journal predates the whole-model "
                    "and tokenizer hashes"
                )
        elif report.structural:
            say(
                f"journal {journal}: {len(report.problems)} problem(s) in the file itself; restore it from a copy "
                f"(a rollback cannot repair the tables or meta)"
            )
        else:
            say(
                f"journal {journal}: {len(report.problems)} problem(s); the last good state on the head's path is "
                f"{report.last_good}: `romebatch rollback --to {report.last_good} --journal {journal}`; "
                f"check keeps reporting the damaged edits until `--prune` deletes the rolled-back ones "
                f"(every rolled-back edit, damaged or not)"
            )
    if not report.ok:
        raise typer.Exit(1)


@with_loading
def compare(
    journal: JournalOpt = DEFAULT_JOURNAL,
    facts: Annotated[
        Path | None, typer.Option("--facts", help="Compare this manifest's facts (edited or not; '-': stdin).")
    ] = None,
    manifest_format: FormatOpt = None,
    fact: Annotated[list[str] | None, typer.Option("--fact", help="A journal fact id to compare (repeatable).")] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="A free prompt to continue on both states (repeatable).")
    ] = None,
    at: Annotated[
        int | None,
        typer.Option("--at", help="The journal state to compare with the base model (edit N); default: the head."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per prompt.")] = 8,
    sample: Annotated[
        int, typer.Option(help="With no selector: how many of the state's edited facts to sample (seeded).")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seed of that sample.")] = 0,
    results: Annotated[Path | None, typer.Option(help="Write the comparison table (.parquet or .csv).")] = None,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    json_out: JsonOpt = False,
):
    """Base model vs a journal state, prompt by prompt: greedy continuation, P(new), P(true).

    Each fact brings its prompt, paraphrases and neighbourhood prompts. With no --facts,
    --fact or --prompt: a seeded sample of the facts edited on the state's path.
    """
    from . import api
    from .comparison import render_compare

    report = api.compare(
        journal,
        facts_file=manifest_arg(facts, manifest_format),
        fact_ids=fact or [],
        prompts=prompt or [],
        at=at,
        max_new_tokens=max_new_tokens,
        sample=sample,
        seed=seed,
        results=results,
        **(loading or {}),
    )
    if json_out:
        emit_json(report.summary())
    else:
        render_compare(console(), report)
        if results:
            say(f"comparison table: {results}")


def report_(
    journal: JournalOpt = DEFAULT_JOURNAL,
    out: Annotated[Path | None, typer.Option("--out", help="Draw the curves as a PNG.")] = None,
    every: Annotated[int, typer.Option(help="Edits per window (a row of the table, a point of the curves).")] = 100,
    json_out: JsonOpt = False,
):
    """ES, NS kept, retention, probe regression, repairs and warnings per window of edits, from the journal."""
    from . import api
    from .plots import check_png_path
    from .quality_curves import render

    if out is not None:
        check_png_path(out)  # before the journal is read: one line, exit 2, nothing written
    data = api.curves(journal, every=every, out=out)
    if json_out:
        emit_json(data)
    else:
        render(console(), data)
        if out:
            say(f"wrote {out}")
