"""Export: a journal state written as a model folder that transformers loads, with its provenance.

The folder is staged beside the target and renamed into place, so a reader never sees a
half-written model; `romebatch.json` (the provenance) marks it as an export that `--force`
may replace.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import UserError, resource_problem
from .export_card import model_card, save_weights

if TYPE_CHECKING:
    from .editor import Editor

EXPORT_MARKER = "romebatch.json"  # every export's provenance; --force replaces only folders that have it


def check_export_target(outdir: Path, force: bool) -> None:
    """Refuse an export target that is not a new folder (or, with force, an earlier export)."""
    if outdir.is_symlink() and not outdir.exists():
        raise UserError(f"{outdir} is a symbolic link to nothing; remove it or choose another folder")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir} exists and is not a folder")
    if outdir.exists() and any(outdir.iterdir()):
        if not force:
            raise UserError(f"{outdir} exists and is not empty", hint="pass --force to replace an earlier export")
        if not (outdir / EXPORT_MARKER).is_file():
            raise UserError(
                f"{outdir} is not an earlier romebatch export (it has no {EXPORT_MARKER}); --force replaces only those",
                hint="choose another folder, or empty this one yourself",
            )
    if not outdir.parent.exists() and outdir.parent.is_symlink():
        raise UserError(f"{outdir.parent} is a symbolic link to nothing")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(editor: Editor, outdir: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
    """Write the head state as a model folder (safetensors, config, tokenizer, provenance, model card).

    `dtype` (float32, bfloat16, float16) casts the weights as they are written; the model
    in memory is not touched, so the journal's exact state stays what it is.
    """
    outdir = Path(outdir)
    check_export_target(outdir, force)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place: never a half-written model folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    trash = None
    try:
        written = save_weights(editor.lm.model, staging, dtype)
        editor.lm.tokenizer.save_pretrained(staging)
        record = provenance(editor)
        record["dtype"] = written
        (staging / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(record, outdir.name))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the model from its users
        if outdir.exists():
            # Move the old folder aside first: at every moment outdir is either the old
            # complete export or the new one, never a partial one.
            trash = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old.", dir=outdir.parent))
            os.replace(outdir, trash / "old")
        os.replace(staging, outdir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not outdir.exists():
            os.replace(trash / "old", outdir)  # put the earlier export back
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        what = resource_problem(error)
        if what is not None:
            raise UserError(
                f"could not write the export ({what}); {outdir} was not changed",
                hint="free some space and run export again",
            ) from None
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return outdir


def provenance(editor: Editor) -> dict:
    """What an export records of how it was made: the base model, the journal, its head and every edit."""
    path = editor.journal.lineage()
    return {
        "romebatch": __version__,
        "base_model": editor.journal.get("model"),
        "base_hash": editor.base_hash,
        "journal": str(editor.journal.directory.resolve()),
        "head": editor.head,
        "hparams": editor.hparams.to_dict(),
        "edits": [
            {
                "seq": r.seq,
                "fact_id": r.fact_id,
                "fact_hash": r.fact_hash,
                "subject": r.fact["subject"],
                "prompt": r.fact["prompt"],
                "target_new": r.fact["target_new"],
                "layer": r.layer,
                "weight": r.weight_name,
                "weight_hash_after": r.weight_hash_after,
            }
            for r in path
        ],
    }
