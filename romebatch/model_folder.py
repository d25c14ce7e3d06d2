"""Checking a model folder before and after transformers loads it: nothing is allocated for a
folder that cannot be edited, and nothing from it runs or reaches the terminal raw.

- **before loading**: no request to run the folder's own code, a config of an architecture
  romebatch edits, a checkpoint whose tensor headers fill the model the config describes, and
  tokenizer files;
- **after loading**: a tokenizer that fits the embedding rows, no tensor left random;
- transformers' own errors and warnings, each turned into one line naming the folder.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import adapter_for_type, supported_model_types
from .errors import UserError, escape_controls
from .files import MAX_JSON_BYTES, read_regular_text


# What loading a hostile folder raises from inside transformers, tokenizers and safetensors:
# bad JSON or values (ValueError, TypeError, a key missing from a JSON file: LookupError,
# huggingface_hub's strict-dataclass errors), shapes
# that do not fit (RuntimeError), nesting too deep (RecursionError), unreadable files (OSError).
def load_error_types() -> tuple[type[BaseException], ...]:
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
def load_errors(spec: str, what: str) -> Iterator[None]:
    """Turn a failure to read `what` from model folder `spec` into one UserError line."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        # tokenizers raises a bare Exception for a tokenizer.json it cannot parse; a JSON value
        # of the wrong type (a number where transformers expects a string) an AttributeError.
        if not isinstance(error, (*load_error_types(), AttributeError)) and type(error) is not Exception:
            raise
        # Chained: ROMEBATCH_DEBUG=1 shows where inside transformers it failed.
        raise UserError(f"--model {spec}: cannot load {what} ({first_line(error)})") from error


def first_line(error: BaseException) -> str:
    """The error's text as one line (a validation error's cause is on its second), capped."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def quiet_transformers() -> Iterator[None]:
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


def checked_config(folder: Path, spec: str, module_template: str | None):
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
    with quiet_transformers(), load_errors(spec, "config.json"):
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
    absent; read as a regular file only, so it is size-bounded and never a FIFO or device."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = json.loads(read_regular_text(path, limit=MAX_JSON_BYTES))
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
        raise UserError(f"{what} {path}: not a valid safetensors file ({first_line(error)})") from None


def check_weights(folder: Path, spec: str, config) -> int | None:
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
        with quiet_transformers(), torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError) as error:
        raise UserError(f"--model {spec}: config.json does not describe a model ({first_line(error)})") from None
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


def require_tokenizer_files(folder: Path, spec: str) -> None:
    """A folder without tokenizer files would load an empty tokenizer, and every prompt would tokenise to nothing."""
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    raise UserError(
        f"--model {spec}: no tokenizer in the folder (tokenizer.json, tokenizer.model, or vocab.json with merges.txt)"
    )


def check_tokenizer(tokenizer, spec: str, embedding_rows: int | None) -> None:
    """Refuse a tokenizer that is empty, or whose token ids reach past the model's embedding rows."""
    with load_errors(spec, "its tokenizer"):
        ids = tokenizer.get_vocab().values()
        top = max(ids, default=-1)
    if len(tokenizer) < 2:
        raise UserError(f"--model {spec}: the tokenizer holds {len(tokenizer)} token(s); it is empty or damaged")
    if embedding_rows is not None and top >= embedding_rows:
        raise UserError(
            f"--model {spec}: the tokenizer has token id {top} but the model has {embedding_rows} embedding rows; "
            "the tokenizer does not belong to these weights"
        )


def check_loading_info(info: dict, spec: str, log: Callable[[str], None]) -> None:
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
