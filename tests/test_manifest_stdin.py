"""A manifest on standard input (`-`), `--format`, and the manifest read once per `apply` (issue 17, issue 21).

`-` reads stdin once, under the same 2 GiB cap as files; without `--format` its first line
must tell the layout. Errors name it `<stdin>:row: field`. The real applies use a tiny model.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_HPARAMS
from typer.testing import CliRunner

from romebatch.cli import app
from romebatch.cli_options import ManifestFormat
from romebatch.errors import ManifestError, UserError
from romebatch.files import read_stdin
from romebatch.manifest import FORMATS, Manifest, load_manifest

REPO = Path(__file__).resolve().parents[1]

CSV = (
    "id,subject,prompt,target_new,target_true\n"
    "ben,Big Ben,{} is located in the city of,Tokyo,London\n"
    "needle,The Space Needle,The Space Needle is located in the city of,Paris,Seattle\n"
)
JSONL = (
    '{"id": "ben", "subject": "Big Ben", "prompt": "{} is located in the city of", "target_new": "Tokyo", '
    '"target_true": "London"}\n'
    '{"id": "needle", "subject": "The Space Needle", "prompt": "The Space Needle is located in the city of", '
    '"target_new": "Paris", "target_true": "Seattle"}\n'
)


def romebatch(*args: str, cwd: Path, stdin=None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "romebatch", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=stdin,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def edits(journal: Path) -> list[tuple]:
    with sqlite3.connect(journal / "journal.sqlite") as db:
        return db.execute("SELECT seq, fact_hash, weight_hash_after FROM edits ORDER BY seq").fetchall()


def test_the_cli_formats_are_the_manifest_layouts():
    assert tuple(f.value for f in ManifestFormat) == FORMATS


# ----------------------------------------------------------------------------- real applies, tiny model
def test_csv_and_jsonl_on_stdin_apply_the_same_edits_as_the_file(tmp_path, tiny_folder):
    folder = tiny_folder("gpt2")
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({k: [list(p) for p in v] if k == "prefixes" else v for k, v in TINY_HPARAMS.items()}))
    (tmp_path / "facts.csv").write_text(CSV)
    common = ["--model", str(folder), "--hparams", str(hp), "--no-probes", "--repair-every", "0", "--json"]
    runs = {}
    for name, source, stdin in (
        ("file", str(tmp_path / "facts.csv"), None),
        ("csv", "-", CSV),
        ("jsonl", "-", JSONL),
    ):
        journal = tmp_path / f"J-{name}"
        result = CliRunner().invoke(app, ["apply", source, "--journal", str(journal), *common], input=stdin)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.strip().splitlines()[-1])["applied"] == 2
        runs[name] = edits(journal)
    assert len(runs["file"]) == 2
    assert runs["csv"] == runs["file"] and runs["jsonl"] == runs["file"]  # same facts, same weights
    with sqlite3.connect(tmp_path / "J-csv" / "journal.sqlite") as db:
        sources = [json.loads(row[0])["source"] for row in db.execute("SELECT fact_json FROM edits ORDER BY seq")]
    assert sources == ["<stdin>:2", "<stdin>:3"]


# ----------------------------------------------------------------------------- errors, through a real process
def test_a_bad_row_on_stdin_names_stdin_and_its_row(tmp_path):
    bad = "id,subject,prompt,target_new\na,X,no subject here,Y\n"
    proc = romebatch("apply", "-", "--journal", "J", cwd=tmp_path, input=bad)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: <stdin>:2: field 'prompt': subject 'X' not found in prompt"]
    assert not (tmp_path / "J").exists()
    bad_jsonl = JSONL + '{"subject": "X", "prompt": "nope", "target_new": "Y"}\n'
    proc = romebatch("apply", "-", "--dry-run", cwd=tmp_path, input=bad_jsonl)
    assert proc.returncode == 2 and proc.stderr.startswith("error: <stdin>:3: field 'prompt': "), proc.stderr


@pytest.mark.parametrize("data", ["Big Ben, Tokyo\n", "hello\n", "subject;prompt;target_new\n"])
def test_stdin_without_format_must_say_its_layout(tmp_path, data):
    proc = romebatch("apply", "-", "--journal", "J", cwd=tmp_path, input=data)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: <stdin>: cannot tell the manifest's layout from its first line; give --format "
        "(csv, yaml, jsonl, json, counterfact, counterfact-flat, zsre)"
    ]
    assert not (tmp_path / "J").exists()


def test_empty_stdin_and_a_terminal_are_refused_at_once(tmp_path):
    proc = romebatch("apply", "-", cwd=tmp_path, input="")
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: <stdin>: is empty; pipe a manifest into it"]
    pty = pytest.importorskip("pty")
    controller, terminal = pty.openpty()
    try:
        proc = romebatch("apply", "-", "--format", "csv", cwd=tmp_path, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 2, proc.stderr
    assert "error: <stdin>: is a terminal, not a manifest; pipe one in" in proc.stderr


def test_dry_run_lists_the_same_facts_from_stdin_as_from_the_file(tmp_path):
    (tmp_path / "facts.csv").write_text(CSV)
    from_file = romebatch("apply", "facts.csv", "--dry-run", "--json", cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    for data, layout in ((CSV, []), (JSONL, []), (CSV, ["--format", "csv"]), (JSONL, ["--format", "jsonl"])):
        piped = romebatch("apply", "-", *layout, "--dry-run", "--json", cwd=tmp_path, input=data)
        assert piped.returncode == 0, piped.stderr
        listed = json.loads(piped.stdout.splitlines()[-1])
        assert listed["manifest"] == "<stdin>"
        assert listed["pending"] == json.loads(from_file.stdout.splitlines()[-1])["pending"]


# ----------------------------------------------------------------------------- layouts, in-process
def fake_stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"))


@pytest.mark.parametrize(
    "text,layout",
    [
        (CSV, "csv"),
        (JSONL, "jsonl"),
        ('{"facts": [{"subject": "Big Ben", "prompt": "{} is in", "target_new": "Tokyo"}]}', "json"),
        ('{\n  "facts": [{"subject": "Big Ben", "prompt": "{} is in", "target_new": "Tokyo"}]\n}\n', "json"),
        ('[{"subject": "Big Ben", "prompt": "{} is in", "target_new": "Tokyo"}]', "json"),
        (
            '[{"case_id": 7, "requested_rewrite": {"subject": "Big Ben", "prompt": "{} is in", '
            '"target_new": {"str": "Tokyo"}, "target_true": {"str": "London"}}}]',
            "counterfact",
        ),
        ('[{"subject": "Big Ben", "src": "Big Ben is in", "alt": "Tokyo", "answers": ["London"]}]', "zsre"),
        ("# facts\n- subject: Big Ben\n  prompt: '{} is in'\n  target_new: Tokyo\n", "yaml"),
        ("facts:\n  - subject: Big Ben\n    prompt: '{} is in'\n    target_new: Tokyo\n", "yaml"),
    ],
)
def test_the_first_line_on_stdin_tells_the_layout(monkeypatch, text, layout):
    fake_stdin(monkeypatch, text)
    manifest = load_manifest("-")
    assert manifest.path == "<stdin>" and manifest.format == layout
    assert manifest.facts[0].subject == "Big Ben" and manifest.facts[0].source.startswith("<stdin>:")


def test_format_overrides_the_suffix_and_names_json_layouts(tmp_path, monkeypatch):
    (tmp_path / "facts.txt").write_text(CSV)
    assert load_manifest(tmp_path / "facts.txt", format="csv").format == "csv"
    with pytest.raises(ManifestError, match="unsupported file type '.txt'"):
        load_manifest(tmp_path / "facts.txt")
    with pytest.raises(ManifestError, match="YAML manifest must be a list of facts"):
        load_manifest(tmp_path / "facts.txt", format="yaml")
    with pytest.raises(UserError, match="format 'xml': choose one of csv, yaml"):
        load_manifest(tmp_path / "facts.txt", format="xml")
    counterfact = (
        '[{"case_id": 7, "requested_rewrite": {"subject": "B", "prompt": "{} is", "target_new": {"str": "T"}}}]'
    )
    (tmp_path / "cf.json").write_text(counterfact)
    assert load_manifest(tmp_path / "cf.json").format == "counterfact"
    with pytest.raises(ManifestError, match="field 'requested_rewrite': unknown field"):
        load_manifest(tmp_path / "cf.json", format="json")  # the named layout, not the sniffed one
    fake_stdin(monkeypatch, "Big Ben, Tokyo\n")
    with pytest.raises(ManifestError, match="<stdin>:1: field 'subject': required column missing"):  # read as CSV
        load_manifest("-", format="csv")


def test_stdin_is_capped_like_a_file(monkeypatch):
    fake_stdin(monkeypatch, "x" * 11)
    with pytest.raises(UserError, match="<stdin>: holds more than 10 bytes; the limit is 10"):
        read_stdin(limit=10)
    fake_stdin(monkeypatch, "x" * 10)
    assert read_stdin(limit=10) == b"x" * 10


def test_bad_utf8_on_stdin_names_the_line(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(CSV.encode() + b"a,\xff,{} b,c\n")))
    with pytest.raises(ManifestError) as error:
        load_manifest("-")
    assert error.value.problems == ["<stdin>:4: not valid UTF-8 (byte 0xff at column 3); save the file as UTF-8"]


# ----------------------------------------------------------------------------- parsed once per apply
def test_apply_reads_the_manifest_once(tmp_path, monkeypatch):
    import romebatch.manifest as manifest_package

    opened = []
    real = manifest_package._open_source
    monkeypatch.setattr(manifest_package, "_open_source", lambda *a: opened.append(a[0].name) or real(*a))

    def stop(*args, **kwargs):
        raise UserError("stop before the model")

    monkeypatch.setattr("romebatch.model.load_model", stop)
    seen = []
    from romebatch import api

    real_apply = api.apply
    monkeypatch.setattr(api, "apply", lambda manifest, **kw: seen.append(manifest) or real_apply(manifest, **kw))
    (tmp_path / "facts.csv").write_text(CSV)
    result = CliRunner().invoke(app, ["apply", str(tmp_path / "facts.csv"), "--journal", str(tmp_path / "J")])
    assert isinstance(result.exception, UserError) and "stop before the model" in str(result.exception)
    assert opened == [str(tmp_path / "facts.csv")]  # the CLI's read; api.apply used the Manifest
    assert isinstance(seen[0], Manifest) and [f.id for f in seen[0].facts] == ["ben", "needle"]
    assert load_manifest(seen[0], limit=1).facts == seen[0].facts[:1]


def test_every_command_that_takes_a_manifest_takes_stdin(tmp_path, monkeypatch):
    seen = {}

    def record(name, key):
        def fake(*args, **kwargs):
            seen[name] = kwargs[key] if key else args[0]
            raise UserError("stop here")

        return fake

    monkeypatch.setattr("romebatch.api.verify", record("verify", "manifest"))
    monkeypatch.setattr("romebatch.api.compare", record("compare", "facts_file"))
    monkeypatch.setattr("romebatch.api.trace", record("trace", "facts_file"))
    monkeypatch.setattr("romebatch.tuning.tune", record("tune", None))
    monkeypatch.chdir(tmp_path)
    for name, argv in (
        ("verify", ["verify", "--manifest", "-"]),
        ("compare", ["compare", "--facts", "-"]),
        ("trace", ["trace", "--facts", "-", "--format", "jsonl"]),
        ("tune", ["tune", "-"]),
    ):
        result = CliRunner().invoke(app, argv, input=JSONL)
        assert "stop here" in str(result.exception), (name, result.output)
        assert isinstance(seen[name], Manifest) and seen[name].path == "<stdin>", name
        assert [f.id for f in seen[name].facts] == ["ben", "needle"], name
    # A file without --format still reaches the library as its path (read there, as before).
    (tmp_path / "facts.csv").write_text(CSV)
    CliRunner().invoke(app, ["verify", "--manifest", "facts.csv"])
    assert seen["verify"] == Path("facts.csv")
    CliRunner().invoke(app, ["verify", "--manifest", "facts.csv", "--format", "csv"])
    assert isinstance(seen["verify"], Manifest)
    result = CliRunner().invoke(app, ["compare", "--format", "csv"])
    assert "--format csv: give the manifest it describes" in str(result.exception)


def test_trace_reads_a_manifest_given_as_a_manifest(tmp_path, monkeypatch):
    from romebatch.trace_facts import read_trace_facts

    fake_stdin(monkeypatch, CSV)
    assert read_trace_facts(load_manifest("-"), limit=1) == [("Big Ben is located in the city of", "Big Ben", "London")]
