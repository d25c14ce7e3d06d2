"""What every `romebatch` command shares: option aliases, choices, and how it talks to people.

Shared options are declared once, as `Annotated` aliases, so that `--journal`, `--model`,
`--device` and `--json` read and behave the same in every command. Messages for people go
through stdlib logging (so -q and -v set one level) to a rich console on stderr; `--json`
goes to stdout. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_JOURNAL = Path("romebatch.journal")

JournalOpt = Annotated[Path, typer.Option("--journal", "-j", envvar="ROMEBATCH_JOURNAL", help="Journal directory.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="ROMEBATCH_MODEL",
        help="HF id (local cache), model folder or .gguf file; default: the journal's model, "
        "else the embedded Gemma-3-270M.",
    ),
]


# Enumerations are typer choices, so a typo is a usage error (exit 2) before anything loads.
class OnRegression(str, Enum):
    warn = "warn"
    skip = "skip"
    stop = "stop"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights' dtype while editing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object as the last line of stdout.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model over devices, CPU and disk: auto, balanced, sequential, or a FILE.json "
        "of module: device (accelerate's dispatch; --device is then unused).",
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option("--max-memory", help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=60GiB'."),
]
ResultsOpt = Annotated[Path | None, typer.Option("--results", help="Write the per-fact table (.parquet or .csv).")]


class ManifestFormat(str, Enum):  # romebatch.manifest.FORMATS (a test keeps them equal)
    csv = "csv"
    yaml = "yaml"
    jsonl = "jsonl"
    json = "json"
    counterfact = "counterfact"
    counterfact_flat = "counterfact-flat"
    zsre = "zsre"


FormatOpt = Annotated[
    ManifestFormat | None,
    typer.Option(
        "--format",
        metavar="<layout>",
        help="The manifest's layout: csv, yaml, jsonl, json, counterfact, counterfact-flat or zsre; "
        "default: from its suffix (.json: its first record), for '-' (stdin) from its first line.",
    ),
]


def manifest_arg(path: Path | None, layout: ManifestFormat | None):
    """A manifest named on the command line: '-' (stdin, read once) or one with --format is read
    here and passed on as a Manifest; a plain file is passed on as its path."""
    if path is None and layout is not None:
        from .errors import UserError

        raise UserError(f"--format {value_of(layout)}: give the manifest it describes (--manifest or --facts)")
    if path is None or (str(path) != "-" and layout is None):
        return path
    from .manifest import load_manifest

    return load_manifest(path, format=value_of(layout))


class RunEnded(Exception):
    """A command that finished its report but must exit non-zero (a signal, a stop, failed facts).

    Not typer.Exit: typer returns an interrupt as code 130 too, which main() reports as an abort.
    """

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def value_of(choice):
    """An enumeration's value (what the library takes); anything else as it is."""
    return choice.value if isinstance(choice, Enum) else choice


def console():
    """The rich console on stderr. Looked up on `romebatch.cli` at each call: that is the one
    place a caller (or a test) replaces it, for every command module at once."""
    from . import cli

    return cli._console()


LOG = logging.getLogger("romebatch.cli")


class _ConsoleHandler(logging.Handler):
    def emit(self, record):
        from .errors import one_line

        # Every message carries user strings (ids, subjects, paths): one line each, controls
        # escaped, no markup, whoever logged it.
        console().print(one_line(record.getMessage()), highlight=False, markup=False)


LOG.addHandler(_ConsoleHandler())
LOG.propagate = False
LOG.setLevel(logging.INFO)  # -q and -v change it (cli._root)


def say(message: str) -> None:
    from .errors import one_line

    # Messages carry user strings (ids, subjects, paths): one line each, controls escaped.
    LOG.info(one_line(message))


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def with_loading(command):
    """`command` with the options that say which model to load and where (`--model`,
    `--device`, `--device-map`, `--max-memory`), declared here once. They stand where the
    command declares its `loading` parameter, which receives them as the keyword arguments
    every api call that loads a model takes (its progress lines going to `say`). The device,
    the device map and the memory limits are checked before the command runs."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    at = [p.name for p in own].index("loading")
    keyword = inspect.Parameter.KEYWORD_ONLY
    generated = [
        inspect.Parameter("model", keyword, annotation=ModelOpt, default=None),
        inspect.Parameter("device", keyword, annotation=DeviceOpt, default="cpu"),
        inspect.Parameter("device_map", keyword, annotation=DeviceMapOpt, default=None),
        inspect.Parameter("max_memory", keyword, annotation=MaxMemoryOpt, default=None),
    ]
    parameters = (
        [p.replace(kind=keyword) for p in own[:at]] + generated + [p.replace(kind=keyword) for p in own[at + 1 :]]
    )

    @functools.wraps(command)
    def wrapper(**given):
        check_device(given["device"])
        if given["device_map"] is not None or given["max_memory"] is not None:
            # Read and checked here, so every command (a --dry-run too) refuses a bad file up
            # front; imported only then, since device_map imports torch.
            from .device_map import parse_device_map, parse_max_memory

            parse_device_map(given["device_map"])
            parse_max_memory(given["max_memory"])
        loading = {p.name: given.pop(p.name) for p in generated}
        return command(**given, loading={**loading, "log": say})

    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def check_device(device: str) -> None:
    from .errors import UserError

    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")
