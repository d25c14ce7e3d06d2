"""Writing a folder the user names (a model export, a LoRA adapter) so that it is never half there.

The folder is staged beside its target and renamed into place; an earlier folder of the
same kind is moved aside first and put back if the swap fails. `check_target` refuses,
before any work, a target that is not a folder this tool may fill or replace.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError


def check_target(outdir: Path, *, force: bool, replaceable: Callable[[Path], bool], kind: str) -> None:
    """Refuse `outdir` unless it is new, empty, or (with force) an earlier `kind` that `replaceable` recognises."""
    if outdir.is_symlink() and not outdir.exists():
        # A dangling link or a loop: the rename would fail only after all the work.
        raise UserError(f"{outdir} is a symbolic link to nothing; remove it or choose another folder")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir} exists and is not a folder")
    if outdir.exists() and any(outdir.iterdir()):
        if not replaceable(outdir):
            raise UserError(
                f"{outdir} is not empty and is not an earlier {kind}; refusing to replace it",
                hint="choose another folder, or empty this one yourself",
            )
        if not force:
            raise UserError(f"{outdir} holds an earlier {kind} already", hint="pass --force to replace it")
    parent = outdir.parent
    if parent.is_symlink() and not parent.exists():
        raise UserError(f"{parent} is a symbolic link to nothing")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{parent} is not a folder")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_folder(outdir: Path) -> Path:
    """A new folder beside `outdir` (same file system, so the final rename is atomic), readable as a
    plain folder is (mkdtemp's 0700 would hide the result from its other users)."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    os.chmod(staging, 0o777 & ~umask())
    return staging


def publish(staging: Path, outdir: Path) -> None:
    """Rename `staging` to `outdir`, replacing an earlier folder there: at every moment `outdir` is
    the old complete folder or the new one. On failure `staging` is removed and the old one kept."""
    trash = None
    try:
        if outdir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old.", dir=outdir.parent))
            os.replace(outdir, trash / "old")
        os.replace(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not outdir.exists():
            os.replace(trash / "old", outdir)  # put the earlier folder back
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
