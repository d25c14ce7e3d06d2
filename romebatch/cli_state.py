"""`romebatch bundle`, `rollback` and `export`: the commands that move or write out journal states."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    DEFAULT_JOURNAL,
    Dtype,
    JournalOpt,
    JsonOpt,
    emit_json,
    say,
    value_of,
    with_loading,
)


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
        emit_json(info)
    else:
        say(
            f"wrote {out}: edits {info['from']}..{info['to']} ({info['edits']} edits, {info['rejections']} rejections, "
            f"{info['bytes'] / 1e6:.2f} MB) of journal {journal}"
        )


@with_loading
def rollback(
    journal: JournalOpt = DEFAULT_JOURNAL,
    to: Annotated[int | None, typer.Option("--to", help="Make edit N the head (0 = base).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Undo the last K edits.")] = None,
    fact: Annotated[str | None, typer.Option("--fact", help="Go back to just before this fact's edit.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Go back to the unedited model.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Delete the rolled-back edits for good.")] = False,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
    json_out: JsonOpt = False,
):
    """Move the journal's head to another state, rebuilt by replay and checked byte for byte."""
    from . import api

    head = api.rollback(
        journal,
        to=to,
        steps=steps,
        fact=fact,
        base=base,
        prune=prune,
        **(loading or {}),
    )
    if json_out:
        emit_json({"journal": str(journal), "head": head})
    else:
        say(f"journal {journal}: head is now {head}" + (" (the base model)" if head == 0 else ""))


@with_loading
def export(
    outdir: Annotated[Path | None, typer.Argument(help="Folder to write the edited model to.")] = None,
    journal: JournalOpt = DEFAULT_JOURNAL,
    loading: dict | None = None,  # --model, --device, --device-map, --max-memory (with_loading)
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
):
    """Write the head state as a normal model folder (safetensors, config, tokenizer, provenance, model card)."""
    from . import api

    if adapter is not None or rank is not None:
        from .errors import UserError

        if adapter is None or outdir is not None:
            raise UserError("give either OUTDIR (a full model) or --adapter DIR [--rank R] (a LoRA adapter)")
        report = api.export_adapter(adapter, journal=journal, rank=rank, force=force, **(loading or {}))
        if json_out:
            emit_json({"journal": str(journal), **report.summary()})
        else:
            say(
                f"exported the journal's head as a LoRA adapter to {report.path}: {report.edits} edits, "
                f"{len(report.modules)} module(s), rank {report.rank}, {report.bytes / 1e6:.2f} MB"
                + ("" if report.exact else f", relative Frobenius error {report.relative_error:.3g}")
            )
        return
    if outdir is None:
        from .errors import UserError

        raise UserError("give OUTDIR, the folder to write the edited model to (or --adapter DIR)")
    path = api.export(outdir, journal=journal, force=force, dtype=value_of(dtype), **(loading or {}))
    if json_out:
        emit_json({"journal": str(journal), "export": str(path)})
    else:
        say(f"exported the journal's head to {path} (provenance in {path / 'romebatch.json'})")
