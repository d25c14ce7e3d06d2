"""Hostile input outside manifests' rows: `--set` values, bundles, --device-map files, YAML aliases.

Each case goes through the real entry point (`romebatch.cli.main`, or `python -m romebatch`
where a hang is the failure), and must end with exit code 2 (docs/cli.md: bad input, nothing
written), exactly one `error:` line naming the file or option, no traceback, and no file
written. No model loads: manifests run with --dry-run, and a --device-map is given with a
--model that does not exist, so it is the device map, checked first, that is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from romebatch.errors import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "examples" / "facts.csv"


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from romebatch.cli import main

    capsys.readouterr()  # what set-up printed is not the command's
    argv = sys.argv
    sys.argv = ["romebatch", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *names: str) -> str:
    """Exit 2 and exactly one `error:` line naming each of `names`; the line is returned."""
    assert code == EXIT_BAD_INPUT, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert len(lines[0]) < 600, lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def refused_without_writing(tmp_path: Path, monkeypatch, capsys, args: list[str], *names: str) -> str:
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    code, err = run_cli(args, capsys)
    line = assert_refused(code, err, *names)
    assert files_under(tmp_path) == before, "a refused command wrote files"
    return line


# --------------------------------------------------------------------------- --set
@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
def test_a_nested_set_value_is_refused(tmp_path, monkeypatch, capsys, depth):
    args = ["apply", str(FACTS), "--dry-run", "--journal", "J", "--set", "prefixes=" + "[" * depth]
    refused_without_writing(tmp_path, monkeypatch, capsys, args, "--set prefixes")


# --------------------------------------------------------------------------- bundles
def crafted_bundle(path: Path, document: str) -> Path:
    """A bundle file whose document is `document`, with a correct checksum."""
    from romebatch.bundle_file import DIGEST_KEY, DOC_KEY, _save, sha256_of

    _save({}, {DOC_KEY: document, DIGEST_KEY: sha256_of(document.encode("utf-8"))}, str(path))
    return path


@pytest.mark.parametrize(
    "document",
    ["[" * 100_000, "9" * 5000, json.dumps({"magic": "romebatch-bundle", "version": ["x" * 100] * 10_000})],
    ids=["nested", "digits", "huge-version"],
)
def test_a_crafted_bundle_document_is_refused(tmp_path, monkeypatch, capsys, document):
    crafted_bundle(tmp_path / "x.rbundle", document)
    args = ["apply", "x.rbundle", "--dry-run", "--journal", "K"]
    refused_without_writing(tmp_path, monkeypatch, capsys, args, "x.rbundle")


def test_a_bundle_that_is_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "x.rbundle").mkdir()
    args = ["apply", "x.rbundle", "--dry-run", "--journal", "K"]
    assert "is a folder" in refused_without_writing(tmp_path, monkeypatch, capsys, args, "x.rbundle")


def test_a_bundle_into_a_missing_folder_is_refused_and_creates_nothing(
    tmp_path, monkeypatch, capsys, bytelevel_tokenizer
):
    from conftest import TINY_HPARAMS, tiny_model

    from romebatch.editor import Editor
    from romebatch.hparams import HParams
    from romebatch.manifest import Fact

    folder = tmp_path / "tiny"
    tiny_model("gpt2", bytelevel_tokenizer).save_pretrained(folder)
    bytelevel_tokenizer.save_pretrained(folder)
    fact = Fact(id="needle", subject="The Space Needle", prompt="{} is located in the city of", target_new="Paris")
    with Editor(tmp_path / "J", model=str(folder), hparams=HParams(**TINY_HPARAMS), log=lambda _: None) as editor:
        assert editor.apply([fact], checks=None, repair_every=0).results[0].status == "applied"
    args = ["bundle", str(Path("nonexist") / "x.rbundle"), "--journal", "J"]
    refused_without_writing(tmp_path, monkeypatch, capsys, args, "nonexist")
    assert not (tmp_path / "nonexist").exists()


# --------------------------------------------------------------------------- --device-map
DEVICE_MAPS = {
    "nested": ("[" * 200_000 + "]" * 200_000, None),
    "digits": ('{"model.layers.0": ' + "9" * 5000 + "}", None),
    "negative": (json.dumps({"model.layers.0": -1}), "model.layers.0"),
    "huge-index": (json.dumps({"model.layers.1": 10**40}), "model.layers.1"),
    "huge-cuda": (json.dumps({"lm_head": "cuda:99999"}), "lm_head"),
    "long-cuda": (json.dumps({"lm_head": "cuda:" + "9" * 5000}), "lm_head"),
    "other-digit": (json.dumps({"lm_head": "\u00b2"}), "lm_head"),
    "float": (json.dumps({"lm_head": 1.0}), "lm_head"),
    "bool": (json.dumps({"lm_head": True}), "lm_head"),
    "twice": ('{"lm_head": 0, "lm_head": "cpu"}', "lm_head"),
    "list": ("[0, 1]", None),
    "empty": ("{}", None),
    "not-json": ('{"lm_head": ', None),
}


def device_map_args(name: str) -> list[str]:
    # A model that does not exist: were the device map not checked first, the error would name it.
    return ["apply", str(FACTS), "--journal", "J", "--model", "no-such-model-folder", "--device-map", name]


@pytest.mark.parametrize("case", sorted(DEVICE_MAPS))
def test_a_bad_device_map_file_is_refused_before_any_model(tmp_path, monkeypatch, capsys, case):
    text, key = DEVICE_MAPS[case]
    (tmp_path / "map.json").write_text(text, encoding="utf-8")
    names = ["--device-map map.json"] + ([key] if key else [])
    line = refused_without_writing(tmp_path, monkeypatch, capsys, device_map_args("map.json"), *names)
    assert "--model" not in line


def test_a_device_map_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "map.json").mkdir()
    line = refused_without_writing(tmp_path, monkeypatch, capsys, device_map_args("map.json"), "--device-map map.json")
    assert "is a folder" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_device_map_fifo_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "map.json")
    before = files_under(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "romebatch", *device_map_args("map.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # reading a FIFO would wait forever: TimeoutExpired fails the test
    )
    line = assert_refused(proc.returncode, proc.stderr, "--device-map map.json")
    assert "FIFO" in line
    assert files_under(tmp_path) == before


def test_device_map_values_as_accelerate_takes_them(tmp_path):
    from romebatch.device_map import parse_device_map

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"a": 0, "b": "1", "c": "cuda:2", "d": "cpu", "e": "disk"}), encoding="utf-8")
    assert parse_device_map(str(path)) == {"a": 0, "b": 1, "c": "cuda:2", "d": "cpu", "e": "disk"}


# --------------------------------------------------------------------------- YAML aliases and merge keys
def alias_bomb() -> str:
    """Nine levels of nine aliases (9**9 values) in about 500 bytes, from an unknown field and paraphrases."""
    lines = ["- subject: S", '  prompt: "{} is"', "  target_new: T", "  a: &l0 [a,a,a,a,a,a,a,a,a]"]
    for level in range(1, 9):
        lines.append(f"  a{level}: &l{level} [{','.join([f'*l{level - 1}'] * 9)}]")
    lines += ["  x: *l8", "  paraphrases: *l8"]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, monkeypatch, capsys):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(), encoding="utf-8")
    started = time.perf_counter()
    args = ["apply", "bomb.yaml", "--dry-run", "--journal", "J"]
    line = refused_without_writing(tmp_path, monkeypatch, capsys, args, "bomb.yaml")
    assert time.perf_counter() - started < 5
    assert "alias" in line


def test_a_yaml_alias_bomb_as_hyper_parameters_is_refused_at_load(tmp_path, monkeypatch, capsys):
    items = ["&l0 [1,1,1,1,1,1,1,1,1]"]
    items += [f"&l{level} [{','.join([f'*l{level - 1}'] * 9)}]" for level in range(1, 9)]
    (tmp_path / "hp.yaml").write_text("seed: 1\nprefixes: [" + ", ".join(items) + "]\n", encoding="utf-8")
    started = time.perf_counter()
    args = ["apply", str(FACTS), "--dry-run", "--journal", "J", "--hparams", "hp.yaml"]
    assert "alias" in refused_without_writing(tmp_path, monkeypatch, capsys, args, "hp.yaml")
    assert time.perf_counter() - started < 5


def test_a_yaml_alias_cycle_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.yaml").write_text('- &a {subject: S, prompt: "{} is", target_new: T, x: *a}\n', encoding="utf-8")
    args = ["apply", "m.yaml", "--dry-run", "--journal", "J"]
    refused_without_writing(tmp_path, monkeypatch, capsys, args, "m.yaml:1")


def test_describing_a_huge_value_is_bounded():
    from romebatch.manifest.validation import describe

    assert "integer" in describe(10**5000)  # more digits than Python writes out
    level: list = ["a"] * 9
    for _ in range(8):  # 9**9 values if it were written out, as the alias bomb's
        level = [level] * 9
    started = time.perf_counter()
    assert describe(level) == "list [[[[[[[[['a', 'a', 'a', 'a', 'a', 'a'..."
    looped: list = []
    looped.append(looped)
    assert describe(looped).startswith("list [[[")
    assert time.perf_counter() - started < 1


def test_yaml_merge_keys_work(tmp_path, monkeypatch, capsys):
    text = '- &x {subject: X, prompt: "{} is in", target_new: Paris}\n- <<: *x\n  subject: Y\n  target_new: Rome\n'
    (tmp_path / "m.yaml").write_text(text, encoding="utf-8")
    from romebatch.manifest import load_manifest

    facts = load_manifest(tmp_path / "m.yaml").facts
    assert [(f.subject, f.prompt, f.target_new) for f in facts] == [
        ("X", "{} is in", "Paris"),
        ("Y", "{} is in", "Rome"),
    ]
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["apply", "m.yaml", "--dry-run", "--journal", "J"], capsys)
    assert code == 0, err
    assert not (tmp_path / "J").exists()


@pytest.mark.parametrize(
    "text, where",
    [
        ("- <<: 5\n  subject: X\n", "m.yaml:1"),
        (
            '- &x {subject: X, prompt: "{} is in", target_new: Paris}\n- <<: *x\n  subject: Y\n  subject: Z\n',
            "m.yaml:4",
        ),
    ],
    ids=["not-a-mapping", "own-key-twice"],
)
def test_bad_yaml_merges_are_refused_on_one_line(tmp_path, monkeypatch, capsys, text, where):
    (tmp_path / "m.yaml").write_text(text, encoding="utf-8")
    args = ["apply", "m.yaml", "--dry-run", "--journal", "J"]
    refused_without_writing(tmp_path, monkeypatch, capsys, args, where)
