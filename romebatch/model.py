"""Loading models: what romebatch edits, as one object.

- **loading**: a Hugging Face id from the local cache (offline), a local folder, a `.gguf`
  file, or nothing: the embedded Gemma-3-270M, converted once to a safetensors cache
  (model_sources.py); the folder is checked before and after transformers reads it
  (model_folder.py).
- **`LoadedModel`**: the model, its tokenizer and its architecture's adapter
  (romebatch/adapters.py, where module paths live), and the hashes that identify its weights
  and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from .adapters import Adapter, adapter_for
from .errors import UserError
from .home import romebatch_home
from .model_folder import (
    check_loading_info,
    check_tokenizer,
    check_weights,
    checked_config,
    load_errors,
    quiet_transformers,
    refuse_remote_code,
    require_tokenizer_files,
)
from .model_sources import cached_hub_snapshot, embedded_model_folder, gguf_to_safetensors
from .outcomes import stderr_log

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
    _tokenizer_hash: str | None = field(default=None, repr=False)
    _weights_hash: str | None = field(default=None, repr=False)

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

    def weights_hash(self) -> str:
        """Hash of every parameter's dtype, shape and bytes, in the model's order, ties once.

        What a journal records of its base beyond the down-projections. Unlike full_hash (the
        caches' key) it leaves out parameter names and buffers, which a transformers release
        may rename or stop saving without changing a single weight. Computed once per loaded
        model, while its weights are the base ones (a journal's opening, before replay).
        """
        if self._weights_hash is None:
            from .device_map import resident

            digest = hashlib.sha256()
            for name, parameter in self.model.named_parameters():  # a tied weight once
                tensor = resident(self.model, name, parameter)  # an offloaded one read through its hook
                digest.update(f"{tensor.dtype}:{list(tensor.shape)};".encode())
                digest.update(_tensor_bytes(tensor))
            self._weights_hash = "sha256:" + digest.hexdigest()
        return self._weights_hash

    def tokenizer_hash(self) -> str:
        """Hash of what turns text into token ids (tokenizer_hash()), computed once per loaded model."""
        if self._tokenizer_hash is None:
            self._tokenizer_hash = tokenizer_hash(self.tokenizer)
        return self._tokenizer_hash

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


# Texts whose token ids stand for what a vocabulary alone does not show (merges, normalizer,
# pre-tokenizer): prose, a CounterFact-like prompt, digits, spacing, accents, CJK, an emoji.
TOKENIZER_PROBES = (
    "The Space Needle is located in the city of Seattle.",
    "The mother tongue of Danielle Darrieux is French",
    "In 1969, 3.14159 and 1,000,000; x=y+2 (e.g. [a]) -- done!",
    "  two  spaces\tand a tab\nnew line\r\n",
    "Zürich, São Paulo, Ελλάδα, Москва, 東京, 서울, नई दिल्ली 👩‍🔬",
)


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """Hash of what turns text into token ids: a journal's edits mean nothing under another.

    It hashes behaviour, not a file format: the vocabulary (token -> id, added tokens
    included) and the ids of TOKENIZER_PROBES with and without special tokens (which shows
    the start and end tokens a prompt gets). A serialization that changes between library
    versions (tokenizers rewrote how merges are written), padding settings a call leaves
    behind, or a pad token named from the vocabulary change none of these.
    """
    vocab = sorted(tok.get_vocab().items(), key=lambda item: (item[1], item[0]))
    probes = [tok(text, add_special_tokens=flag)["input_ids"] for text in TOKENIZER_PROBES for flag in (False, True)]
    payload = json.dumps([vocab, probes], ensure_ascii=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def weight_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes: byte-exact identity of a weight state."""
    return "sha256:" + hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


# ----------------------------------------------------------------------------- loading
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    spec: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    module_template: str | None = None,
    log: Callable[[str], None] = stderr_log,
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
        folder, revision = cached_hub_snapshot(spec)
    refuse_remote_code(folder, spec)
    # Checked before any weight is allocated: the config, the checkpoint's headers against the
    # shapes the config implies, and the tokenizer (a hostile folder costs a header read).
    config = checked_config(folder, spec, module_template)
    embedding_rows = check_weights(folder, spec, config)
    require_tokenizer_files(folder, spec)
    dispatch = _dispatch_kwargs(device_map, max_memory)
    with quiet_transformers():
        # A model folder's own code never runs (trust_remote_code=False, and folders that ask
        # for it are refused above), and safetensors only: a pickled checkpoint (.bin) from
        # elsewhere must not run code either.
        with load_errors(spec, "its tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        check_tokenizer(tokenizer, spec, embedding_rows)
        with load_errors(spec, "its weights"):
            loaded = AutoModelForCausalLM.from_pretrained(
                str(folder),
                config=config,
                dtype=DTYPES[dtype],
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
                **dispatch,
            )
        # output_loading_info=True: (model, report), which the stub does not say.
        model, info = cast("tuple[PreTrainedModel, dict]", loaded)
    check_loading_info(info, spec, log)
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
