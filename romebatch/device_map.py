"""Models larger than one device: accelerate's big-model dispatch, and edits through it.

`--device-map auto|balanced|balanced_low_0|sequential|FILE.json` and `--max-memory` are
handed to `from_pretrained`, which places each module with accelerate (the engine
transformers uses) on a GPU, the CPU or disk. A module placed on "disk" (or on "cpu" when
the main device is a GPU) holds its weights on the meta device; an `AlignDevicesHook`
loads them from a weights map before each forward and drops them after.

ROME writes one weight in place, so an offloaded weight needs a home that forwards read:
the weights map (accelerate's `OffloadedWeightsLoader`) answers from its `state_dict` before
its files, so the edited weight is loaded once into a CPU tensor placed there ("pinned"),
and every later forward, edit, replay and hash reads and writes that one tensor. Only
weights romebatch writes are pinned (one down-projection per edited layer); everything else
stays offloaded. Hashes read offloaded tensors through the same map, so a dispatched model
hashes exactly as the same weights loaded whole.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, cast

import torch

from .errors import UserError
from .manifest.validation import describe, short_repr

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# ASCII digits only (`\d` and str.isdigit take other scripts' digits, which int() may refuse),
# and few of them: an index is a small number.
_SIZE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,20})?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda|cuda:[0-9]{1,4}|[0-9]{1,4})$")
_INDEX = re.compile(r"^[0-9]{1,4}$")
# A GPU index above this is a mistake, not a machine.
MAX_GPU_INDEX = 1023
# A device map names each module once: a few kB for the largest models.
MAX_DEVICE_MAP_BYTES = 16 * 1024**2


def parse_device_map(value: str | dict | None):
    """A strategy name, or a JSON file's {module name: device}; None passes through.

    The file is read and checked whole here, before anything loads: a regular file of UTF-8
    JSON, one object of module name: device, each device a GPU index, 'cuda:N', 'cpu', 'disk'
    (or 'mps', 'meta'). Every problem is a UserError naming the file and the module.
    """
    if value is None or isinstance(value, dict):
        return value
    if value in STRATEGIES:
        return value
    if not value.endswith(".json"):
        raise UserError(f"--device-map {value!r}: give {', '.join(STRATEGIES)} or a FILE.json of module: device")
    data = _read_device_map(value)
    where = f"--device-map {value}"
    if not isinstance(data, dict) or not data:
        raise UserError(f"{where}: must be a JSON object of module name: device, got {describe(data)}")
    out: dict = {}
    for name, device in data.items():
        out[name] = _device(where, name, device)
    return out


def _read_device_map(value: str):
    from .files import open_regular_file
    from .manifest.reading import DuplicateKey, strict_json, value_problem

    where = f"--device-map {value}"
    try:
        with open_regular_file(value, limit=MAX_DEVICE_MAP_BYTES) as f:  # never a FIFO, device or folder
            text = f.read()
    except UserError as error:  # "PATH: is a FIFO, not a regular file", ...
        raise UserError(f"--device-map {error.message}") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: cannot read it (not UTF-8 text)") from None
    except OSError as error:
        raise UserError(f"{where}: cannot read it ({error.strerror or error})") from None
    try:
        return strict_json(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except DuplicateKey as error:
        raise UserError(f"{where}: module {short_repr(error.key, 80)} is given twice") from None
    except ValueError as error:  # a number of thousands of digits
        raise UserError(f"{where}: not JSON ({value_problem(error)})") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{where}: not JSON (nested too deeply)") from None


def _device(where: str, name: str, device):
    """The device of module `name`, as accelerate takes it: a GPU index as an int."""
    bad = UserError(
        f"{where}: module {short_repr(name, 80)} has device {short_repr(device, 40)}; use a GPU index "
        f"(0..{MAX_GPU_INDEX}), 'cuda:N', 'cpu' or 'disk'"
    )
    if isinstance(device, bool):
        raise bad
    if isinstance(device, int):
        if not 0 <= device <= MAX_GPU_INDEX:
            raise bad
        return device
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise bad
    index = device.removeprefix("cuda:")
    if _INDEX.match(index) and int(index) > MAX_GPU_INDEX:
        raise bad
    return int(device) if _INDEX.match(device) else device


def parse_max_memory(value: str | dict | None):
    """'0=20GiB,1=20GiB,cpu=60GiB' as accelerate's {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'}."""
    if value is None or isinstance(value, dict):
        return value
    out: dict = {}
    for item in value.split(","):
        device, sep, size = (part.strip() for part in item.partition("="))
        index = _INDEX.match(device) is not None and int(device) <= MAX_GPU_INDEX
        if not sep or not (index or device in ("cpu", "disk", "mps")) or not _SIZE.match(size):
            raise UserError(
                f"--max-memory {short_repr(value, 200)}: write DEVICE=SIZE pairs such as '0=20GiB,cpu=60GiB' "
                f"(bad item {short_repr(item.strip(), 80)})"
            )
        out[int(device) if index else device] = int(size) if size.isdigit() else size
    return out


def dispatched(model: torch.nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None


def _align_hook(module: torch.nn.Module):
    """The module's own AlignDevicesHook (possibly inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for candidate in getattr(hook, "hooks", (hook,)):
        if hasattr(candidate, "weights_map") and hasattr(candidate, "execution_device"):
            return candidate
    return None


def _offload_map(module: torch.nn.Module, name: str):
    """(weights map, key) holding the offloaded tensor `name` of `module`; None if it is resident."""
    tensor = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
    if tensor is None or tensor.device.type != "meta":
        return None
    hook = _align_hook(module)
    if hook is None or not getattr(hook, "offload", False) or hook.weights_map is None:
        raise UserError(f"{type(module).__name__}.{name} is on the meta device without an offload hook to load it from")
    return hook.weights_map, name


def read_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The current value of `module.<name>`, wherever it lives (never pins)."""
    found = _offload_map(module, name)
    if found is None:
        return getattr(module, name)
    weights_map, key = found
    return weights_map[key]


def writable_weight(module: torch.nn.Module) -> torch.Tensor:
    """`module.weight` as a tensor an in-place write reaches every later forward through.

    Resident weights are returned as they are. An offloaded one is pinned: loaded once into
    a CPU tensor that the weights map then serves (OffloadedWeightsLoader.state_dict wins
    over its files), and returned.
    """
    found = _offload_map(module, "weight")
    if found is None:
        return cast(torch.Tensor, module.weight)  # nn.Module types attributes as Tensor | Module
    weights_map, key = found
    store, full_key = weights_map, key
    while hasattr(store, "dataset") and hasattr(store, "prefix"):  # accelerate's PrefixedDataset
        full_key = store.prefix + full_key
        store = store.dataset
    if isinstance(store, dict):  # offloaded to CPU RAM: the dict's tensor is already the home
        return store[full_key]
    pinned = getattr(store, "state_dict", None)
    if not isinstance(pinned, dict):
        raise UserError(
            f"cannot edit {full_key}: it is offloaded to a store romebatch cannot write",
            hint="place the edited layer on a device in --device-map",
        )
    if full_key not in pinned:
        pinned[full_key] = store[full_key].detach().to("cpu").clone()  # a private copy: never writes the files
    return pinned[full_key]


def state_tensors(model: torch.nn.Module):
    """(name, tensor) of the whole state dict, offloaded tensors read through their hooks."""
    for name, tensor in model.state_dict().items():
        yield name, resident(model, name, tensor)


def resident(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (model's `name`) with its values: an offloaded one read through its hook, or
    UserError where no hook holds it (a tied weight whose other name was offloaded)."""
    if tensor.device.type != "meta":
        return tensor
    owner, _, attr = name.rpartition(".")
    try:
        found = read_tensor(model.get_submodule(owner), attr)
    except (KeyError, AttributeError):
        found = None
    if found is None or found.device.type == "meta":
        raise UserError(
            f"cannot read offloaded {name} (a tied weight?)",
            hint="keep the embeddings and the head on a device in --device-map",
        )
    return found


def input_device(model: PreTrainedModel) -> torch.device | None:
    """Where a dispatched model's inputs go (its embeddings' execution device); None if not dispatched."""
    if not dispatched(model):
        return None
    hook = _align_hook(model.get_input_embeddings())
    if hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def needs_offload_folder(device_map, max_memory) -> bool:
    return isinstance(device_map, str) or (isinstance(device_map, dict) and "disk" in device_map.values())
