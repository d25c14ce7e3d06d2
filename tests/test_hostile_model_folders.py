"""Hostile model folders and GGUF files: each is refused in one escaped line (a UserError), before heavy work.

A checkpoint missing tensors, a config that does not match its weights, an unsupported or
oversized architecture, a damaged safetensors or GGUF file, a missing or oversized tokenizer:
none may load with random weights, print a traceback, allocate what the config claims, or
leave files behind. Tiny GPT-2 folders, edited in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from romebatch.errors import UserError, resource_problem
from romebatch.model import load_model
from romebatch.model_sources import gguf_to_safetensors

HOSTILE_NAME = "x\x1b[2J\x1b]0;pwn\x07\u202eevil"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, bytelevel_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "M"
    tiny_model("gpt2", bytelevel_tokenizer).save_pretrained(folder)
    bytelevel_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def folder(base_folder, tmp_path) -> Path:
    copy = tmp_path / "M"
    shutil.copytree(base_folder, copy)
    return copy


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def refused(spec: Path | str, capfd, *fragments: str) -> str:
    """load_model(spec) raises a one-line UserError holding every fragment; nothing raw on stdout/stderr."""
    with pytest.raises(UserError) as caught:
        load_model(str(spec), log=lambda line: None)
    message = caught.value.message
    assert "\n" not in message and "\x1b" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "\x1b" not in out + err, out + err
    return message


def test_the_untouched_folder_loads(folder, capfd):
    lm = load_model(str(folder), log=lambda line: None)
    assert lm.n_layers == 3
    assert "\x1b" not in capfd.readouterr().err


def test_missing_tensors_are_refused_not_filled_with_random_values(folder, capfd):
    edit_weights(folder, lambda t: [t.pop(name) for name in list(t) if name.startswith("transformer.h.1.mlp.")])
    refused(folder, capfd, str(folder), "weights")


def test_more_layers_in_the_config_than_in_the_checkpoint(folder, capfd):
    edit_config(folder, n_layer=5)
    refused(folder, capfd, str(folder))


def test_the_load_report_of_missing_keys_is_ours_and_escaped(folder, capfd, monkeypatch):
    """Past the header check (a tensor renamed to a hostile name, same size): transformers' MISSING report."""

    def rename(tensors):
        tensors[HOSTILE_NAME] = tensors.pop("transformer.h.1.mlp.c_fc.weight")

    edit_weights(folder, rename)
    message = refused(folder, capfd, "lacks 1 tensor", "transformer.h.1.mlp.c_fc.weight")
    assert "\u202e" not in message


def test_unexpected_tensors_are_noted_escaped(folder, capfd):
    edit_weights(folder, lambda t: t.__setitem__(HOSTILE_NAME, torch.zeros(2)))
    lines: list[str] = []
    load_model(str(folder), log=lines.append)
    assert any("does not use" in line for line in lines)
    assert all("\x1b" not in line and "\u202e" not in line for line in lines)
    out, err = capfd.readouterr()
    assert "\x1b" not in out + err and "UNEXPECTED" not in out + err


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"n_layer": "3"}, "config.json"),
        ({"n_layer": 0}, "at least one layer"),
        ({"n_layer": -2}, "at least one layer"),
        ({"n_embd": 64}, "shape"),
        ({"vocab_size": 0}, "shape"),
        ({"model_type": "bert"}, "unsupported architecture"),
        ({"model_type": "llama"}, ""),  # llama's default sizes: billions of weights, refused from headers
        ({"n_layer": 24, "n_embd": 1024}, ""),
        ({"model_type": 7}, "model_type"),
    ],
)
def test_configs_that_do_not_fit_the_checkpoint(folder, capfd, changes, fragment):
    edit_config(folder, **changes)
    refused(folder, capfd, str(folder), fragment)


def test_config_that_is_a_list(folder, capfd):
    (folder / "config.json").write_text("[1, 2]")
    refused(folder, capfd, "config.json is not a JSON object")


def test_a_tensor_of_the_wrong_shape(folder, capfd):
    edit_weights(folder, lambda t: t.__setitem__("transformer.h.0.mlp.c_proj.weight", torch.zeros(3, 3)))
    refused(folder, capfd, "transformer.h.0.mlp.c_proj.weight", "shape")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", struct.pack("<Q", 1 << 60) + b"{}", "truncate"],
    ids=["empty", "short-header", "huge-header", "truncated"],
)
def test_damaged_safetensors_files_are_named(folder, capfd, content):
    path = folder / "model.safetensors"
    data = path.read_bytes()[:-100] if content == "truncate" else content
    path.write_bytes(data)
    refused(folder, capfd, str(path), "not a valid safetensors file")


def test_tokenizer_too_deeply_nested(folder, capfd):
    (folder / "tokenizer.json").write_text("[" * 100000)
    refused(folder, capfd, str(folder), "tokenizer")


def test_folder_without_a_tokenizer(folder, capfd):
    (folder / "tokenizer.json").unlink()
    refused(folder, capfd, "no tokenizer")


def test_tokenizer_with_ids_past_the_embedding(folder, capfd):
    edit_config(folder, vocab_size=300)

    def trim(tensors):
        tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:300].clone()

    edit_weights(folder, trim)
    refused(folder, capfd, "token id 399", "300 embedding rows")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a gguf file at all, just text",
        b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40),
        b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\xff" * 64,
    ],
    ids=["empty", "garbage", "huge-counts", "truncated"],
)
def test_damaged_gguf_files(tmp_path, capfd, content):
    path = tmp_path / f"bad-{HOSTILE_NAME}.gguf"
    path.write_bytes(content)
    message = refused(path, capfd, "bad-x")
    assert str(path.parent) in message and "tmp" + "/" not in message.replace(str(tmp_path), "")
    models = Path(__import__("os").environ["ROMEBATCH_HOME"]) / "models"
    leftovers = [p.name for p in models.iterdir()] if models.exists() else []
    assert not [name for name in leftovers if name.startswith((".bad-", "tmp", "bad-"))], leftovers


def test_gguf_header_check_runs_before_hashing(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_to_safetensors(path)


def test_resource_problem_maps_only_write_failures():
    from safetensors import SafetensorError

    assert resource_problem(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    written = resource_problem(SafetensorError("Error while serializing: IoError(No space left on device)"))
    assert written is not None and written.startswith("could not write")
