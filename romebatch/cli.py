"""The `romebatch` command: parses arguments, calls one library function, renders the result.

No algorithm lives here. People get rich output on stderr; scripts get `--json` on stdout.
Errors are one line (plus a hint) and exit code 2; ROMEBATCH_DEBUG=1 shows the traceback.
Heavy imports (torch, transformers) happen inside commands, so `--help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .hparams import HParams as _DefaultHParams

app = typer.Typer(
    name="romebatch",
    help="Apply thousands of ROME fact edits to a language model: journaled, checked, reversible.",
    no_args_is_help=True,
    add_completion=True,  # Typer's own: --install-completion / --show-completion
    pretty_exceptions_enable=False,
)

# Shared options: the same name and behaviour in every command.
JournalOpt = Annotated[Path, typer.Option("--journal", "-j", envvar="ROMEBATCH_JOURNAL", help="Journal directory.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="ROMEBATCH_MODEL",
        help="HF id (local cache), model folder or .gguf file; default: the journal's model, "
        "else the embedded Gemma-3-270M.",
    ),
]


# Enumerations are typer choices, so a typo is a usage error (exit 2) before anything loads.
class OnRegression(str, Enum):
    warn = "warn"
    skip = "skip"
    stop = "stop"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Mom2(str, Enum):
    second_moment = "second_moment"
    identity = "identity"


class Sampling(str, Enum):
    encyclopedic = "encyclopedic"
    plain = "plain"


class Preserve(str, Enum):
    none = "none"
    covariance = "covariance"
    nullspace = "nullspace"


class ManifestFormat(str, Enum):  # romebatch.manifest.FORMATS (a test keeps them equal)
    csv = "csv"
    yaml = "yaml"
    jsonl = "jsonl"
    json = "json"
    counterfact = "counterfact"
    counterfact_flat = "counterfact-flat"
    zsre = "zsre"


class RunEnded(Exception):
    """A command that finished its report but must exit non-zero (a signal, a stop, failed facts).

    Not typer.Exit: typer returns an interrupt as code 130 too, which main() reports as an abort.
    """

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _value(choice):
    return choice.value if isinstance(choice, Enum) else choice


DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights' dtype while editing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object as the last line of stdout.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model over devices, CPU and disk: auto, balanced, sequential, or a FILE.json "
        "of module: device (accelerate's dispatch; --device is then unused).",
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option("--max-memory", help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=60GiB'."),
]
FormatOpt = Annotated[
    ManifestFormat | None,
    typer.Option(
        "--format",
        metavar="<layout>",
        help="The manifest's layout: csv, yaml, jsonl, json, counterfact, counterfact-flat or zsre; "
        "default: from its suffix (.json: its first record), for '-' (stdin) from its first line.",
    ),
]
DEFAULT_JOURNAL = Path("romebatch.journal")
# The ROME settings' defaults, shown in --help (hparams.py imports no torch). A journal that
# exists keeps the settings it was made with.
_HP = _DefaultHParams()


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"romebatch {__version__}\n")
        raise typer.Exit()


# Messages for people (what the library is doing, one-line results) go through stdlib logging,
# so that -q and -v set one level; tables and reports are printed, --json goes to stdout.
_LOG = logging.getLogger("romebatch.cli")


class _ConsoleHandler(logging.Handler):
    def emit(self, record):
        from .errors import one_line

        # Every message carries user strings (ids, subjects, paths): one line each, controls
        # escaped, no markup, whoever logged it.
        _console().print(one_line(record.getMessage()), highlight=False, markup=False)


_LOG.addHandler(_ConsoleHandler())
_LOG.propagate = False
_LOG.setLevel(logging.INFO)  # -q and -v change it (_root)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print romebatch's version and exit.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress or status lines; tables, reports, errors and --json still print."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print every edit as it is made, above the progress bar.")
    ] = False,
):
    """Apply thousands of ROME fact edits to a language model: journaled, checked, reversible."""
    _LOG.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _say(message: str) -> None:
    from .errors import one_line

    # Messages carry user strings (ids, subjects, paths): one line each, controls escaped.
    _LOG.info(one_line(message))


def _check_device(device: str) -> None:
    from .errors import UserError

    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")


def _manifest(path: Path | None, layout: ManifestFormat | None):
    """A manifest named on the command line: '-' (stdin, read once) or one with --format is read
    here and passed on as a Manifest; a plain file is passed on as its path."""
    if path is None and layout is not None:
        from .errors import UserError

        raise UserError(f"--format {_value(layout)}: give the manifest it describes (--manifest or --facts)")
    if path is None or (str(path) != "-" and layout is None):
        return path
    from .manifest import load_manifest

    return load_manifest(path, format=_value(layout))


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def _hparams(hparams_file: Path | None, **flags):
    """None when the user set nothing (an existing journal then keeps its own hyper-parameters)."""
    from .hparams import HParams, load_hparams

    given = {k: v for k, v in flags.items() if v is not None}
    if hparams_file is None and not given:
        return None
    base = load_hparams(hparams_file) if hparams_file else HParams()
    return base.replace(**given)


@app.command()
def apply(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="Facts: .csv, .yaml, .jsonl, or CounterFact / zsRE .json ('-': stdin, with --format unless "
            "its first line tells); or a .rbundle of edits made elsewhere."
        ),
    ],
    journal: JournalOpt = DEFAULT_JOURNAL,
    model: ModelOpt = None,
    layer: Annotated[
        str | None,
        typer.Option(
            help="Layer to edit, or 'auto' (traced once per model, cached); default: the model's measured default "
            "(1 on Gemma-3-270M), else a quarter of its depth."
        ),
    ] = None,
    manifest_format: FormatOpt = None,
    limit: Annotated[int | None, typer.Option(help="Apply only the first N facts of the manifest.")] = None,
    results: Annotated[Path | None, typer.Option(help="Write the per-fact table (.parquet or .csv).")] = None,
    hparams: Annotated[Path | None, typer.Option(help="YAML file of hyper-parameters.")] = None,
    v_steps: Annotated[
        int | None, typer.Option(help="Max Adam steps for v*; default 20, 25 for Llama-style models (Gemma included).")
    ] = None,
    v_lr: Annotated[float | None, typer.Option(help=f"Adam learning rate for v*; default {_HP.v_lr:g}.")] = None,
    kl_factor: Annotated[
        float | None, typer.Option(help=f"Weight of the essence KL term; default {_HP.kl_factor:g}.")
    ] = None,
    mom2: Annotated[Mom2 | None, typer.Option(help="second_moment (default) or identity (C = I).")] = None,
    stats_corpus: Annotated[Path | None, typer.Option(help="Text or JSONL corpus for the key statistics.")] = None,
    stats_tokens: Annotated[
        int | None, typer.Option(help=f"Corpus tokens for the key statistics; default {_HP.stats_tokens:,}.")
    ] = None,
    stats_sampling: Annotated[
        Sampling | None,
        typer.Option(
            help="Without --stats-corpus, how the model's own text is sampled: encyclopedic (default) or plain."
        ),
    ] = None,
    module_template: Annotated[
        str | None, typer.Option(help="Down-projection path with {} for the layer, for an architecture not built in.")
    ] = None,
    on_regression: Annotated[
        OnRegression,
        typer.Option(help="After each edit: warn, skip (reject the edit) or stop when a regression check fails."),
    ] = OnRegression.warn,
    max_neighborhood_drop: Annotated[
        float, typer.Option(help="Share of the fact's neighbourhood prompts an edit may flip to its new object.")
    ] = 0.5,
    max_probe_regression: Annotated[
        float, typer.Option(help="Share of sampled probes that may lose half their probability.")
    ] = 0.2,
    min_retention: Annotated[float, typer.Option(help="Share of sampled earlier edits that must still hold.")] = 0.8,
    probe_budget: Annotated[float, typer.Option(help="Share of an edit's time the checks may take.")] = 0.25,
    no_probes: Annotated[bool, typer.Option("--no-probes", help="Skip the regression checks.")] = False,
    repair_every: Annotated[
        int, typer.Option(help="Every N edits and at the end, edit again the facts that no longer hold (0: never).")
    ] = 100,
    preserve: Annotated[
        Preserve | None,
        typer.Option(
            help=f"Keep earlier edits: none, covariance (their keys weigh in C) or nullspace (u orthogonal to them); "
            f"default {_HP.preserve}."
        ),
    ] = None,
    preserve_weight: Annotated[
        float | None, typer.Option(help=f"λ for --preserve covariance; default {_HP.preserve_weight:g}.")
    ] = None,
    spread_layers: Annotated[
        int | None,
        typer.Option(help=f"Spread edits round-robin over this many layers from --layer; default {_HP.spread_layers}."),
    ] = None,
    exact_protocol: Annotated[
        bool,
        typer.Option(
            "--exact-protocol",
            help="Optimise v* the plain way (all tokens, all layers, full logits): slower, same result.",
        ),
    ] = False,
    device: DeviceOpt = "cpu",
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
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Apply a manifest's facts as sequential ROME edits, each committed to the journal.

    Re-running the same manifest resumes: facts already in the journal (by content hash)
    are skipped. Ctrl-C stops cleanly after the current edit.
    """
    from .bundle_file import SUFFIX
    from .errors import UserError, one_line

    if manifest.suffix == SUFFIX and manifest_format is None:
        return _apply_bundle(manifest, journal, model, device, dry_run, json_out)
    from .manifest import load_manifest
    from .report import check_results_path

    # Every option and input is checked before any model is loaded: a typo fails in a second.
    _check_device(device)
    check_results_path(results)
    if layer is not None and layer != "auto":
        if not layer.isdigit() or len(layer) > 6:
            raise UserError(f"--layer {one_line(layer)!r}: give a layer number or 'auto'")
        layer = int(layer)
    if limit is not None and limit < 0:
        raise UserError(f"--limit {limit}: give zero or more facts")
    if repair_every < 0:
        raise UserError(f"--repair-every {repair_every}: give a number of edits, or 0 for no repairs")
    for name, value in (
        ("--max-neighborhood-drop", max_neighborhood_drop),
        ("--max-probe-regression", max_probe_regression),
        ("--min-retention", min_retention),
        ("--probe-budget", probe_budget),
    ):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name} {value}: give a share between 0 and 1")
    # Validates everything before any model is loaded; parsed once, and passed on as it is.
    loaded = load_manifest(manifest, limit=limit, format=_value(manifest_format))
    hp = _hparams(
        hparams,
        v_steps=v_steps,
        v_lr=v_lr,
        kl_factor=kl_factor,
        mom2=_value(mom2),
        stats_corpus=str(stats_corpus) if stats_corpus else None,
        stats_tokens=stats_tokens,
        stats_sampling=_value(stats_sampling),
        layer=layer if isinstance(layer, int) else None,
        exact_protocol=exact_protocol or None,
        preserve=_value(preserve),
        preserve_weight=preserve_weight,
        spread_layers=spread_layers,
    )
    if dry_run:
        from .api import pending_facts, rerun_counts

        pending = pending_facts(loaded.facts, journal, retry_rejected=retry_rejected)
        again = rerun_counts(loaded.facts, journal)
        rows = [{"id": f.id, "subject": f.subject, "prompt": f.prompt, "target_new": f.target_new} for f in pending]
        if json_out:
            _emit_json(
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
        else:
            _say(
                f"{loaded.path}: {len(loaded.facts)} valid facts ({loaded.duplicates_dropped} duplicates dropped), "
                f"{len(pending)} pending for journal {journal}" + (f" at layer {layer}" if layer is not None else "")
            )
            if any(again.values()):
                _say(
                    f"  {again['applied']} applied already (skipped); {again['rejected']} rejected earlier ("
                    + ("retried: --retry-rejected" if retry_rejected else "skipped; --retry-rejected tries them again")
                    + f"); {again['rolled_back']} rolled back (applied again)"
                )
            for row in rows[:50]:
                _say(f"  {row['id']}: {row['prompt'].replace('{}', row['subject'])} -> {row['target_new']}")
        return

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from . import api
    from .probes import Thresholds

    checks = (
        None
        if no_probes
        else Thresholds(
            max_neighborhood_drop=max_neighborhood_drop,
            max_probe_regression=max_probe_regression,
            min_retention=min_retention,
            probe_budget=probe_budget,
        )
    )
    from .report import render_apply

    console = _console()
    progress = Progress(
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
    stats_task = progress.add_task("", total=None, visible=False, label="key statistics (tokens)")
    task = progress.add_task("", total=len(loaded.facts), label="editing")

    def on_stats(done, total):
        progress.update(stats_task, completed=done, total=total, visible=True)

    warned = []  # (fact id, warning) of the edits kept with a failed regression check
    timed = []  # seconds of each edit made in this run

    def status_line(first: str | None = None) -> str:
        from rich.markup import escape

        parts = [first] if first else []
        if timed:
            parts.append(f"{sum(timed) / len(timed):.1f} s/edit")
        if warned:
            parts.append(f"{len(warned)} warned, latest {warned[-1][0]}: {warned[-1][1]}")
        from .errors import one_line

        return escape(one_line(" · ".join(parts)))

    def on_stage(stage, fact_id):
        # Repairs and the probes' base answers are stages of their own on the bar's label.
        progress.update(
            task,
            label={
                "editing": "editing",
                "repairing": "repair pass",
                "repair scoring": "repair pass (scoring)",
                "probes": "probes (base answers)",
            }.get(stage, stage),
            description=status_line(f"now {fact_id}" if fact_id else None),
            refresh=True,
        )

    def on_edit(row):
        if row.warning:
            warned.append((row.fact_id, row.warning))
        if row.seconds is not None and row.status in ("applied", "repaired", "rejected"):
            timed.append(row.seconds)
        # A repair edits a fact the bar has counted already.
        progress.update(
            task,
            advance=row.status != "repaired",
            description=status_line(f"{row.fact_id}: {row.status}"),
            refresh=True,
        )  # drawn now: an edit takes seconds, a refresh microseconds
        if not json_out:
            # One line per edit: always without a terminal (logs), with -v under the live bar.
            line = (
                f"{row.fact_id}: {row.status}{' (warned)' if row.warning else ''} {row.subject} -> {row.target_new}"
                + (f" P(new) {row.p_new_before:.3f} -> {row.p_new_after:.3f}" if row.p_new_after is not None else "")
                + (f" ({row.reason})" if row.reason else "")
            )
            _LOG.log(logging.DEBUG if console.is_terminal else logging.INFO, line)

    with progress:
        result = api.apply(
            loaded,
            journal=journal,
            model=model,
            layer=layer,
            limit=limit,
            hparams=hp,
            device=device,
            dtype=_value(dtype),
            module_template=module_template,
            results=results,
            checks=checks,
            on_regression=_value(on_regression),
            repair_every=repair_every,
            on_edit=on_edit,
            stats_progress=on_stats,
            log=_say,
            device_map=device_map,
            max_memory=max_memory,
            retry_rejected=retry_rejected,
            on_stage=on_stage,
        )
        progress.update(task, completed=len(loaded.facts))
    if json_out:
        _emit_json(result.summary())
    else:
        render_apply(console, result)
        from .report import render_warnings

        render_warnings(console, result.results)
        if results:
            _say(f"results table: {results}")
    code = result.exit_code()
    if code:
        raise RunEnded(code)


def _apply_bundle(path: Path, journal: Path, model, device: str, dry_run: bool, json_out: bool) -> None:
    """`apply BUNDLE`: a bundle's edits are appended as they are, not recomputed (romebatch/bundle_file.py)."""
    from . import api

    done = api.apply_bundle(path, journal=journal, model=model, device=device, dry_run=dry_run, log=_say)
    if json_out:
        _emit_json(done.summary())
    elif done.already:
        _say(f"{path}: journal {journal} is at its end state already; nothing to do")
    elif done.dry_run:
        _say(
            f"{path}: {done.edits} edits verified against journal {journal}'s head {done.head}; nothing written (dry run)"
        )
    else:
        _say(
            f"{path}: {done.edits} edits verified and appended to journal {journal} as edits {done.first}..{done.last}"
            + (" (renumbered)" if done.renumbered else "")
            + f", {done.rejections} rejections; head {done.head}"
        )


@app.command(name="bundle")
def bundle_(
    out: Annotated[Path, typer.Argument(help="The bundle file to write (.rbundle).")],
    journal: JournalOpt = DEFAULT_JOURNAL,
    first: Annotated[
        int | None, typer.Option("--from", help="First edit (seq on the head's path); default: the first.")
    ] = None,
    last: Annotated[
        int | None, typer.Option("--to", help="Last edit (seq on the head's path); default: the head.")
    ] = None,
    json_out: JsonOpt = False,
):
    """Write edits of the head's path as one hash-verified file; `romebatch apply OUT` appends them elsewhere."""
    from . import api

    info = api.bundle(journal, out, first=first, last=last)
    if json_out:
        _emit_json(info)
    else:
        _say(
            f"wrote {out}: edits {info['from']}..{info['to']} ({info['edits']} edits, {info['rejections']} rejections, "
            f"{info['bytes'] / 1e6:.2f} MB) of journal {journal}"
        )


@app.command()
def rollback(
    journal: JournalOpt = DEFAULT_JOURNAL,
    to: Annotated[int | None, typer.Option("--to", help="Make edit N the head (0 = base).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Undo the last K edits.")] = None,
    fact: Annotated[str | None, typer.Option("--fact", help="Go back to just before this fact's edit.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Go back to the unedited model.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Delete the rolled-back edits for good.")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Move the journal's head to another state, rebuilt by replay and checked byte for byte."""
    from . import api

    _check_device(device)
    head = api.rollback(
        journal,
        to=to,
        steps=steps,
        fact=fact,
        base=base or None,
        prune=prune,
        model=model,
        device=device,
        log=_say,
        device_map=device_map,
        max_memory=max_memory,
    )
    if json_out:
        _emit_json({"journal": str(journal), "head": head})
    else:
        _say(f"journal {journal}: head is now {head}" + (" (the base model)" if head == 0 else ""))


@app.command(name="log")
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
        _emit_json(data)
    else:
        render(_console(), data)


@app.command()
def export(
    outdir: Annotated[Path | None, typer.Argument(help="Folder to write the edited model to.")] = None,
    journal: JournalOpt = DEFAULT_JOURNAL,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty OUTDIR (or an existing adapter).")
    ] = False,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter", help="Instead, write the head's edits as a PEFT LoRA adapter folder (base + adapter = head)."
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", help="With --adapter: compress each module to this rank by truncated SVD (default: exact)."
        ),
    ] = None,
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            "--dtype", help="Write the weights as float32, bfloat16 or float16; default: as the journal holds them."
        ),
    ] = None,
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Write the head state as a normal model folder (safetensors, config, tokenizer, provenance, model card)."""
    from . import api

    if adapter is not None or rank is not None:
        from .errors import UserError

        if adapter is None or outdir is not None:
            raise UserError("give either OUTDIR (a full model) or --adapter DIR [--rank R] (a LoRA adapter)")
        report = api.export_adapter(
            adapter, journal=journal, rank=rank, model=model, device=device, force=force, log=_say
        )
        if json_out:
            _emit_json({"journal": str(journal), **report.summary()})
        else:
            _say(
                f"exported the journal's head as a LoRA adapter to {report.path}: {report.edits} edits, "
                f"{len(report.modules)} module(s), rank {report.rank}, {report.bytes / 1e6:.2f} MB"
                + ("" if report.exact else f", relative Frobenius error {report.relative_error:.3g}")
            )
        return
    if outdir is None:
        from .errors import UserError

        raise UserError("give OUTDIR, the folder to write the edited model to (or --adapter DIR)")
    _check_device(device)
    path = api.export(
        outdir,
        journal=journal,
        model=model,
        device=device,
        force=force,
        dtype=_value(dtype),
        log=_say,
        device_map=device_map,
        max_memory=max_memory,
    )
    if json_out:
        _emit_json({"journal": str(journal), "export": str(path)})
    else:
        _say(f"exported the journal's head to {path} (provenance in {path / 'romebatch.json'})")


@app.command()
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
    results: Annotated[Path | None, typer.Option(help="Write the per-fact table (.parquet or .csv).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Specificity regression of the journal's head against the base model. Exit 1 on regression."""
    from . import api
    from .report import check_results_path, render_verify
    from .specificity import VerifyThresholds

    _check_device(device)
    check_results_path(results)
    thresholds = VerifyThresholds(max_ns_drop=max_ns_drop, min_retention=min_retention, min_efficacy=min_efficacy)
    report = api.verify(
        journal,
        manifest=_manifest(manifest, manifest_format),
        thresholds=thresholds,
        results=results,
        model=model,
        device=device,
        log=_say,
        device_map=device_map,
        max_memory=max_memory,
    )
    if json_out:
        _emit_json(report.summary())
    else:
        render_verify(_console(), report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
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
    model: ModelOpt = None,
    journal: Annotated[
        Path,
        typer.Option(
            "--journal",
            "-j",
            envvar="ROMEBATCH_JOURNAL",
            help="Journal whose model to trace when --model is not given (if it exists).",
        ),
    ] = DEFAULT_JOURNAL,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Causal tracing (ROME §2): where a fact lives, and which layer to edit."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import api
    from .errors import UserError
    from .plots import render_trace, save_average_png, save_trace_png
    from .report import check_results_path

    _check_device(device)
    check_results_path(results)
    if out is not None and (out.suffix.lower() != ".png" or not out.parent.is_dir()):
        raise UserError(f"--out {out}: give a .png file name in an existing folder")
    if samples < 1 or window < 1 or not noise > 0 or (limit is not None and limit < 1):
        raise UserError("--samples, --window and --limit must be at least 1, and --noise positive")
    console = _console()
    if facts is None:
        result = api.trace(
            prompt,
            subject,
            answer,
            model=model,
            journal=journal,
            device=device,
            samples=samples,
            noise=noise,
            window=window,
            log=_say,
            device_map=device_map,
            max_memory=max_memory,
        )
        rows = result.to_rows()
        if out:
            save_trace_png(result, out)
        if json_out:
            _emit_json(
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
            render_trace(console, result)
    else:
        progress = Progress(
            TextColumn("[bold]tracing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=json_out or not console.is_terminal,
        )
        task = progress.add_task("", total=None)
        with progress:
            effect, layer, traced = api.trace(
                facts_file=_manifest(facts, manifest_format),
                limit=limit,
                model=model,
                journal=journal,
                device=device,
                samples=samples,
                noise=noise,
                window=window,
                log=_say,
                device_map=device_map,
                max_memory=max_memory,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        rows = [row for r in traced for row in r.to_rows()]
        if out:
            save_average_png(effect, layer, len(traced), out)
        if json_out:
            _emit_json({"facts": len(traced), "mlp_effect_by_layer": effect.tolist(), "recommended_layer": layer})
        else:
            for index, value in enumerate(effect):
                bar = "█" * max(0, int(round(40 * value / max(effect.max(), 1e-9))))
                _say(f"layer {index:>3}  {value:+.4f}  {bar}")
            _say(
                f"recommended edit layer: {layer} (MLP effect at the subject's last token, mean of "
                f"{len(traced)} facts; cached for `apply --layer auto`)"
            )
    if results:
        import polars as pl

        from .report import write_frame

        write_frame(pl.DataFrame(rows), results)
    if out and not json_out:
        _say(f"wrote {out}")


@app.command()
def check(
    journal: JournalOpt = DEFAULT_JOURNAL,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Verify the journal: base model identity and every edit's hashes, by replay. Exit 1 if damaged."""
    from . import api

    _check_device(device)
    report = api.check(journal, model=model, device=device, log=_say, device_map=device_map, max_memory=max_memory)
    if json_out:
        _emit_json(
            {
                "journal": report.journal,
                "ok": report.ok,
                "edits": report.edits,
                "head": report.head,
                "problems": report.problems,
                "last_good": report.last_good,
            }
        )
    else:
        for line in report.problems:
            _say(f"damaged: {line}")
        if report.ok:
            _say(f"journal {journal}: {report.edits} edit(s) verified by replay, head {report.head}")
        elif report.structural:
            _say(
                f"journal {journal}: {len(report.problems)} problem(s) in the file itself; restore it from a copy "
                f"(a rollback cannot repair the tables or meta)"
            )
        else:
            _say(
                f"journal {journal}: {len(report.problems)} problem(s); the last good state on the head's path is "
                f"{report.last_good}: `romebatch rollback --to {report.last_good} --journal {journal}`"
            )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def tune(
    manifest: Annotated[
        Path, typer.Argument(help="Facts to tune on: .csv, .yaml, .jsonl, or CounterFact / zsRE .json ('-': stdin).")
    ],
    manifest_format: FormatOpt = None,
    model: ModelOpt = None,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = Dtype.float32,
    json_out: JsonOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
):
    """Measure the edit layer and clamp on your facts; save them as this model's preset for `apply`."""
    from .errors import UserError
    from .report import render_tune
    from .tuning import tune as run_tune

    _check_device(device)
    try:
        clamp_values = tuple(float(x) for x in clamps.split(","))
    except ValueError:
        raise UserError(f"--clamps {clamps!r}: give comma-separated numbers such as 0.5,1,2,4") from None
    result = run_tune(
        _manifest(manifest, manifest_format),
        model=model,
        sample=sample,
        seed=seed,
        clamps=clamp_values,
        top_layers=top_layers,
        seq_edits=seq_edits,
        seq_top=seq_top,
        hparams=_hparams(hparams),
        results=results,
        save=not no_save,
        device=device,
        dtype=_value(dtype),
        device_map=device_map,
        max_memory=max_memory,
        log=_say,
    )
    if json_out:
        _emit_json(result.summary())
    else:
        render_tune(_console(), result)


@app.command()
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
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
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
        facts_file=_manifest(facts, manifest_format),
        fact_ids=fact or [],
        prompts=prompt or [],
        at=at,
        max_new_tokens=max_new_tokens,
        sample=sample,
        seed=seed,
        results=results,
        model=model,
        device=device,
        log=_say,
    )
    if json_out:
        _emit_json(report.summary())
    else:
        render_compare(_console(), report)
        if results:
            _say(f"comparison table: {results}")


@app.command(name="report")
def report_(
    journal: JournalOpt = DEFAULT_JOURNAL,
    out: Annotated[Path | None, typer.Option("--out", help="Draw the curves as a PNG.")] = None,
    every: Annotated[int, typer.Option(help="Edits per window (a row of the table, a point of the curves).")] = 100,
    json_out: JsonOpt = False,
):
    """ES, NS kept, retention, probe regression, repairs and warnings per window of edits, from the journal."""
    from . import api
    from .quality_curves import render

    data = api.curves(journal, every=every, out=out)
    if json_out:
        _emit_json(data)
    else:
        render(_console(), data)
        if out:
            _say(f"wrote {out}")


def main() -> None:
    """Entry point: known errors become one line and exit 2; ROMEBATCH_DEBUG=1 shows tracebacks."""
    from typer.exceptions import TyperException

    from .errors import EXIT_SIGINT, ManifestError, UserError, one_line, resource_problem

    try:
        code = app(standalone_mode=False)
    except ManifestError as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except UserError as error:
        if os.environ.get("ROMEBATCH_DEBUG") == "1":
            raise
        print(f"error: {one_line(error.message)}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        sys.exit(2)
    except TyperException as error:  # usage errors: typer's vendored click exceptions
        error.show()
        sys.exit(getattr(error, "exit_code", 2) or 2)
    except RunEnded as ended:
        sys.exit(ended.code)
    except KeyboardInterrupt:  # a second Ctrl-C: the edit in progress was abandoned
        code = EXIT_SIGINT
    except Exception as error:
        # A full disk or a read-only folder met outside the paths that report it themselves,
        # or a journal file damaged where a read met it before any check did.
        what = resource_problem(error)
        if what is None and isinstance(error, sqlite3.DatabaseError):
            what = f"the journal file is damaged or unreadable ({error}); run `romebatch check`"
        if what is None or os.environ.get("ROMEBATCH_DEBUG") == "1":
            raise
        print(f"error: {one_line(what)}", file=sys.stderr)
        print("hint: free some space (or fix the permissions) and run the same command again", file=sys.stderr)
        sys.exit(2)
    # With standalone_mode=False, typer returns the code of `raise typer.Exit(n)` and of an
    # interrupt (130) instead of exiting.
    if code == EXIT_SIGINT:
        print("aborted; the journal holds every committed edit", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
