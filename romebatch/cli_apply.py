"""`romebatch apply` (facts, or a bundle of edits made elsewhere) and `romebatch tune`.

Every option and input is checked before any model is loaded, so a typo fails in a second;
then one call to `romebatch.api` does the work (its preflight checks the facts against the
model's tokenizer), and the result is rendered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    DEFAULT_JOURNAL,
    Dtype,
    DtypeOpt,
    FormatOpt,
    JournalOpt,
    JsonOpt,
    OnRegression,
    ResultsOpt,
    RunEnded,
    console,
    emit_json,
    manifest_arg,
    say,
    value_of,
    with_loading,
)
from .cli_settings import CHECKS_PANEL, SETTINGS_PANEL, SetOpt, hparams_from, option_name, with_settings
from .hparams import REPAIR_EVERY, REPAIR_SPAN, check_repair_options

HparamsFileOpt = Annotated[
    Path | None, typer.Option("--hparams", help="YAML file of hyper-parameters.", rich_help_panel=SETTINGS_PANEL)
]


@with_settings
@with_loading
def apply(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="Facts: .csv, .yaml, .jsonl, or CounterFact / zsRE .json ('-': stdin, with --format unless "
            "its first line tells); or a .rbundle of edits made elsewhere."
        ),
    ],
    journal: JournalOpt = DEFAULT_JOURNAL,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    manifest_format: FormatOpt = None,
    limit: Annotated[int | None, typer.Option(help="Apply only the first N facts of the manifest.")] = None,
    results: ResultsOpt = None,
    module_template: Annotated[
        str | None, typer.Option(help="Down-projection path with {} for the layer, for an architecture not built in.")
    ] = None,
    repair_every: Annotated[
        int, typer.Option(help="Every N edits and at the end, edit again the facts that no longer hold (0: never).")
    ] = REPAIR_EVERY,
    repair_span: Annotated[
        int,
        typer.Option(
            help="A repair pass checks at most N facts, in rotation over the journal's path (0: all of them)."
        ),
    ] = REPAIR_SPAN,
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            "--dtype", help="float32, bfloat16 or float16; default: the journal's own, float32 for a new one."
        ),
    ] = None,
    retry_rejected: Annotated[
        bool,
        typer.Option(
            "--retry-rejected", help="Try again the facts an earlier run rejected (they are skipped otherwise)."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and list pending edits; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
    hparams: HparamsFileOpt = None,
    sets: SetOpt = None,
    on_regression: Annotated[
        OnRegression,
        typer.Option(
            help="After each edit: warn, skip (reject the edit) or stop when a regression check fails.",
            rich_help_panel=CHECKS_PANEL,
        ),
    ] = OnRegression.warn,
    no_probes: Annotated[
        bool, typer.Option("--no-probes", help="Skip the regression checks.", rich_help_panel=CHECKS_PANEL)
    ] = False,
    settings: dict | None = None,  # the ROME settings' options (romebatch/cli_settings.py)
    thresholds: dict | None = None,  # the regression thresholds' options
):
    """Apply a manifest's facts as sequential ROME edits, each committed to the journal.

    Re-running the same manifest resumes: facts already in the journal (by content hash)
    are skipped. Ctrl-C stops cleanly after the current edit.
    """
    from .bundle_file import SUFFIX
    from .errors import UserError, one_line

    if manifest.suffix == SUFFIX and manifest_format is None:
        return _apply_bundle(manifest, journal, loading or {}, dry_run, json_out)
    from .manifest import load_manifest
    from .report import check_results_path

    settings, thresholds = dict(settings or {}), dict(thresholds or {})
    check_results_path(results)
    layer = settings.get("layer")
    if layer is not None and layer != "auto":
        if not layer.isdigit() or len(layer) > 6:
            raise UserError(f"--layer {one_line(layer)!r}: give a layer number or 'auto'")
        layer = int(layer)
    settings["layer"] = layer if isinstance(layer, int) else None  # 'auto' is resolved by api.apply
    if limit is not None and limit < 0:
        raise UserError(f"--limit {limit}: give zero or more facts")
    check_repair_options(repair_every, repair_span)
    for name, value in thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{option_name(name)} {value}: give a share between 0 and 1")
    # Validates everything before any model is loaded; parsed once, and passed on as it is.
    loaded = load_manifest(manifest, limit=limit, format=value_of(manifest_format))
    hp = hparams_from(hparams, settings, sets)
    if dry_run:
        return _dry_run(manifest, loaded, journal, layer, retry_rejected, json_out)

    from . import api
    from .cli_progress import ApplyProgress
    from .probes import Thresholds
    from .report import render_apply, render_warnings

    checks = None if no_probes else Thresholds(**thresholds)
    screen = console()
    with ApplyProgress(screen, len(loaded.facts), json_out) as progress:
        result = api.apply(
            loaded,
            journal=journal,
            layer=layer,
            hparams=hp,
            dtype=value_of(dtype),
            module_template=module_template,
            results=results,
            checks=checks,
            on_regression=value_of(on_regression),
            repair_every=repair_every,
            repair_span=repair_span,
            on_edit=progress.on_edit,
            stats_progress=progress.on_stats,
            **(loading or {}),
            retry_rejected=retry_rejected,
            on_stage=progress.on_stage,
        )
        progress.done()
    if json_out:
        emit_json(result.summary())
    else:
        render_apply(screen, result)
        render_warnings(screen, result.results)
        if results:
            say(f"results table: {results}")
    code = result.exit_code()
    if code:
        raise RunEnded(code)


def _dry_run(manifest: Path, loaded, journal: Path, layer, retry_rejected: bool, json_out: bool) -> None:
    """`apply --dry-run`: what a run would do with each fact; nothing is loaded or written."""
    from .api import pending_facts, rerun_counts

    pending = pending_facts(loaded.facts, journal, retry_rejected=retry_rejected)
    again = rerun_counts(loaded.facts, journal)
    rows = [{"id": f.id, "subject": f.subject, "prompt": f.prompt, "target_new": f.target_new} for f in pending]
    if json_out:
        emit_json(
            {
                "manifest": loaded.path,
                "facts": len(loaded.facts),
                "pending": rows,
                "layer": layer,
                "already_applied": again["applied"],
                "rejected_earlier": again["rejected"],
                "retry_rejected": retry_rejected,
                "rolled_back": again["rolled_back"],
            }
        )
        return
    say(
        f"{loaded.path}: {len(loaded.facts)} valid facts ({loaded.duplicates_dropped} duplicates dropped), "
        f"{len(pending)} pending for journal {journal}" + (f" at layer {layer}" if layer is not None else "")
    )
    if any(again.values()):
        say(
            f"  {again['applied']} applied already (skipped); {again['rejected']} rejected earlier ("
            + ("retried: --retry-rejected" if retry_rejected else "skipped; --retry-rejected tries them again")
            + f"); {again['rolled_back']} rolled back (applied again)"
        )
    for row in rows[:50]:
        say(f"  {row['id']}: {row['prompt'].replace('{}', row['subject'])} -> {row['target_new']}")


def _apply_bundle(path: Path, journal: Path, loading: dict, dry_run: bool, json_out: bool) -> None:
    """`apply BUNDLE`: a bundle's edits are appended as they are, not recomputed (romebatch/bundle_file.py)."""
    from . import api
    from .errors import UserError

    if loading.get("device_map") is not None or loading.get("max_memory") is not None:
        # A bundle is verified by replaying it on the whole model in memory: refused, not ignored.
        raise UserError(f"{path}: --device-map and --max-memory are not used when applying a bundle; drop them")
    done = api.apply_bundle(
        path, journal=journal, model=loading.get("model"), device=loading.get("device", "cpu"), dry_run=dry_run, log=say
    )
    if json_out:
        emit_json(done.summary())
    elif done.already:
        say(f"{path}: journal {journal} is at its end state already; nothing to do")
    elif done.dry_run:
        say(
            f"{path}: {done.edits} edits verified against journal {journal}'s head {done.head}; nothing written (dry run)"
        )
    else:
        say(
            f"{path}: {done.edits} edits verified and appended to journal {journal} as edits {done.first}..{done.last}"
            + (" (renumbered)" if done.renumbered else "")
            + f", {done.rejections} rejections; head {done.head}"
        )


@with_loading
def tune(
    manifest: Annotated[
        Path, typer.Argument(help="Facts to tune on: .csv, .yaml, .jsonl, or CounterFact / zsRE .json ('-': stdin).")
    ],
    manifest_format: FormatOpt = None,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    sample: Annotated[int, typer.Option(help="Facts edited one at a time over the grid (a seeded sample).")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    clamps: Annotated[str, typer.Option(help="Comma-separated clamp factors to try.")] = "0.5,1,2,4",
    top_layers: Annotated[int, typer.Option(help="Layers taken from causal tracing (depth/4 is added).")] = 2,
    seq_edits: Annotated[int, typer.Option(help="Edits in the sequential check of the best settings.")] = 50,
    seq_top: Annotated[int, typer.Option(help="Settings that go through the sequential check.")] = 2,
    hparams: Annotated[Path | None, typer.Option(help="YAML file of the other hyper-parameters.")] = None,
    results: Annotated[
        Path | None, typer.Option(help="Results JSONL: every measurement is appended; re-running resumes from it.")
    ] = Path("romebatch-tune.jsonl"),
    no_save: Annotated[bool, typer.Option("--no-save", help="Print the table; save no preset.")] = False,
    dtype: DtypeOpt = Dtype.float32,
    json_out: JsonOpt = False,
    sets: SetOpt = None,
):
    """Measure the edit layer and clamp on your facts; save them as this model's preset for `apply`."""
    from . import tuning
    from .errors import UserError
    from .report import render_tune

    try:
        clamp_values = tuple(float(x) for x in clamps.split(","))
    except ValueError:
        raise UserError(f"--clamps {clamps!r}: give comma-separated numbers such as 0.5,1,2,4") from None
    result = tuning.tune(
        manifest_arg(manifest, manifest_format),
        sample=sample,
        seed=seed,
        clamps=clamp_values,
        top_layers=top_layers,
        seq_edits=seq_edits,
        seq_top=seq_top,
        hparams=hparams_from(hparams, sets=sets),
        results=results,
        save=not no_save,
        dtype=value_of(dtype),
        **(loading or {}),
    )
    if json_out:
        emit_json(result.summary())
    else:
        render_tune(console(), result)
