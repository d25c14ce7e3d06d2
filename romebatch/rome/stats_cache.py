"""The on-disk cache of key statistics: one safetensors file per layer, never trusted blindly.

A file records a sha256 of its tensors (with mom2's shape and dtype and the token count) in its
metadata, and a read checks that checksum, the shape (d_ff × d_ff for the layer), float32, a
token count from 1 to the requested number, and finite values. A file that fails any check is
named in one log line and recomputed (the new file replaces it). A file written before
checksums existed is kept when every other check passes, and stamped with a checksum:
recomputing it would change C under every journal edited with it. Writes are atomic, and a
cache that cannot be written costs a recompute next time, not the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ..model import LoadedModel

UNCHECKED = "no checksum"


def key_dim(lm: LoadedModel, layer: int) -> int:
    """d_ff: the width of the down-projection's input at `layer` (C is d_ff × d_ff)."""
    shape = lm.weight(layer).shape  # (d_model, d_ff), or (d_ff, d_model) for Conv1D
    return int(shape[0] if lm.adapter.conv1d else shape[1])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """What a cache file states about its own contents, checked on every read (`read_cached`)."""
    mom2 = tensors["mom2"]
    return {
        "sha256": _digest(tensors),
        "mom2_shape": json.dumps(list(mom2.shape)),
        "mom2_dtype": str(mom2.dtype),
        "tokens": str(int(tensors["tokens"].item())),
    }


def read_cached(path: Path, layer: int, d_ff: int, n_tokens: int) -> tuple[tuple[torch.Tensor, int] | None, str]:
    """A cache file's (mom2, token count) if every check passes, else (None, what is wrong in a few words).

    Checks, in order: readable; the tensors' sha256 against the metadata's; mom2 float32 of
    shape (d_ff, d_ff) as the metadata states; a token count from 1 to `n_tokens`, the same as
    the metadata's; every value finite and the diagonal (each key coordinate's mean square)
    non-negative. A file an older romebatch wrote has no checksum: it passes every other check
    or none, and is returned with the problem UNCHECKED, for the caller to stamp (recomputing
    it would change C under every journal that was edited with it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if names != {"mom2", "tokens"}:
                return None, f"it holds {sorted(names)}, not mom2 and tokens"
            tensors = {name: handle.get_tensor(name) for name in names}
    except Exception as error:  # SafetensorError, OSError, a bad header: unreadable
        return None, f"unreadable: {(str(error).splitlines() or [type(error).__name__])[0]}"
    stamped = "sha256" in metadata
    if stamped and _digest(tensors) != metadata["sha256"]:
        return None, "its checksum does not match its contents"
    mom2, tokens = tensors["mom2"], tensors["tokens"]
    if mom2.dtype != torch.float32 or (stamped and metadata.get("mom2_dtype") != str(mom2.dtype)):
        return None, f"mom2 is {mom2.dtype}, not torch.float32"
    if tuple(mom2.shape) != (d_ff, d_ff) or (stamped and metadata.get("mom2_shape") != json.dumps([d_ff, d_ff])):
        return None, f"mom2 has shape {tuple(mom2.shape)}, not ({d_ff}, {d_ff}) for layer {layer}"
    if tokens.numel() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        return None, "its token count is not one whole number"
    count = int(tokens.item())
    if not 0 < count <= n_tokens or (stamped and metadata.get("tokens") != str(count)):
        return None, f"token count {count} is not between 1 and {n_tokens}"
    if not bool(torch.isfinite(mom2).all()):
        return None, "mom2 holds NaN or infinite values"
    if bool((mom2.diagonal() < 0).any()):
        return None, "mom2 has a negative diagonal entry"
    return (mom2, count), "" if stamped else UNCHECKED


def stamp(path: Path, mom2: torch.Tensor, tokens: int, log) -> None:
    """Record a checksum in a cache file an older romebatch wrote, keeping its other metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = {"mom2": mom2.contiguous(), "tokens": torch.tensor([tokens])}
    save_cached(path, tensors, {**metadata, **checksum_metadata(tensors)}, log)


def save_cached(path: Path, tensors: dict, metadata: dict, log) -> None:
    """Cache one layer's statistics; a cache that cannot be written (full disk) costs a recompute next time, not this run."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file and rename: a crash never leaves a half-written cache entry.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except Exception as error:  # OSError, or safetensors' SafetensorError on a full disk
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log(
            f"Could not cache the key statistics in {path.parent} ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "continuing without the cache."
        )
