"""Export: a journal state written as a model folder that transformers loads, with its provenance.

The folder is staged beside the target and renamed into place, so a reader never sees a
half-written model; `romebatch.json` (the provenance) marks it as an export that `--force`
may replace.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import UserError, resource_problem
from .export_card import model_card, save_weights
from .publish import check_target, publish, staging_folder

if TYPE_CHECKING:
    from .editor import Editor

EXPORT_MARKER = "romebatch.json"  # every export's provenance; --force replaces only folders that have it


def is_export_folder(folder: Path) -> bool:
    """An earlier romebatch export: what `export --force` may replace."""
    return (folder / EXPORT_MARKER).is_file()


def check_export_target(outdir: Path, force: bool) -> None:
    """Refuse an export target that is not a new folder (or, with force, an earlier export)."""
    check_target(outdir, force=force, replaceable=is_export_folder, kind=f"romebatch export (with {EXPORT_MARKER})")


def export(editor: Editor, outdir: str | Path, *, force: bool = False, dtype: str | None = None) -> Path:
    """Write the head state as a model folder (safetensors, config, tokenizer, provenance, model card).

    `dtype` (float32, bfloat16, float16) casts the weights as they are written; the model
    in memory is not touched, so the journal's exact state stays what it is.
    """
    outdir = Path(outdir)
    check_export_target(outdir, force)
    staging = staging_folder(outdir)
    try:
        written = save_weights(editor.lm.model, staging, dtype)
        editor.lm.tokenizer.save_pretrained(staging)
        record = provenance(editor)
        record["dtype"] = written
        (staging / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(record, outdir.name))
        publish(staging, outdir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        what = resource_problem(error)
        if what is not None:
            raise UserError(
                f"could not write the export ({what}); {outdir} was not changed",
                hint="free some space and run export again",
            ) from None
        raise
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
