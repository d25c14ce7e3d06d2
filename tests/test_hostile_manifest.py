"""Hostile manifests: whatever a file contains, the CLI answers exit 2 and one clear line each.

Property-based: hypothesis generates malformed manifests of every format (wrong columns,
wrong types, broken quoting, invalid UTF-8, huge fields, YAML tags that would construct
objects, nesting bombs, duplicate ids). Each goes through the real entry point,
`romebatch.cli.main`, in-process: the exit code must be 2, every stderr line must be an
`error:` line naming the file, nothing may be printed as a traceback, and no journal may
be created. The counts of examples add up to well over 1,000 per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from romebatch.errors import ManifestError
from romebatch.manifest import load_manifest

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = [
    "id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood",
    "neighborhood_prompts",
    "neighborhood_answers",
    "bogus",
    "",
]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def run_cli(tmp_path: Path, manifest: Path, capsys) -> tuple[int, str]:
    from romebatch.cli import main

    journal = tmp_path / "journal-must-not-exist"
    argv = sys.argv
    sys.argv = ["romebatch", "apply", str(manifest), "--journal", str(journal), "--dry-run"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    assert not journal.exists(), "a rejected manifest created the journal"
    return exit_info.value.code, captured.err


def assert_rejected(tmp_path, manifest, capsys):
    code, err = run_cli(tmp_path, manifest, capsys)
    assert code == 2, f"exit {code} for {manifest.name}: {err[:500]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no message"
    assert "Traceback" not in err
    for line in lines:
        assert line.startswith("error: "), line
        assert manifest.name in line, f"line does not name the file: {line}"
        assert len(line) < 2000, "a problem line must stay readable"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def valid_or_rejected(tmp_path, path, capsys):
    """A generated file may happen to be valid; then it must load. Otherwise: rejected cleanly."""
    try:
        load_manifest(path)
    except ManifestError:
        assert_rejected(tmp_path, path, capsys)


@settings(max_examples=300, **SETTINGS)
@given(data=st.binary(max_size=400), ext=st.sampled_from([".csv", ".yaml", ".json", ".jsonl"]))
def test_random_bytes(tmp_path, capsys, data, ext):
    valid_or_rejected(tmp_path, write(tmp_path, "m" + ext, data), capsys)


@settings(max_examples=300, **SETTINGS)
@given(
    records=st.lists(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), min_size=1, max_size=5),
    ext=st.sampled_from([".json", ".jsonl", ".yaml"]),
)
def test_wrong_types_and_keys(tmp_path, capsys, records, ext):
    if ext == ".jsonl":
        body = "\n".join(json.dumps(r) for r in records)
    else:
        body = json.dumps(records)  # JSON is valid YAML too
    valid_or_rejected(tmp_path, write(tmp_path, "m" + ext, body.encode()), capsys)


@settings(max_examples=300, **SETTINGS)
@given(
    header=st.lists(st.sampled_from(FIELDS), min_size=0, max_size=6),
    rows=st.lists(st.lists(st.text(max_size=20), max_size=7), max_size=5),
    quote_break=st.booleans(),
)
def test_csv_columns_and_quoting(tmp_path, capsys, header, rows, quote_break):
    lines = [",".join(header)] + [",".join(row) for row in rows]
    text = "\n".join(lines)
    if quote_break:
        text += '\n"unterminated,quote'
    valid_or_rejected(tmp_path, write(tmp_path, "m.csv", text.encode("utf-8", "surrogatepass")), capsys)


@settings(max_examples=150, **SETTINGS)
@given(
    tag=st.sampled_from(
        [
            "!!python/object/apply:os.system",
            "!!python/object:builtins.dict",
            "!!python/name:builtins.exec",
            "!!binary",
            "!!set",
            "!custom",
        ]
    ),
    payload=st.text(max_size=20),
)
def test_yaml_tags_construct_nothing(tmp_path, capsys, tag, payload):
    marker = tmp_path / "pwned"
    body = f"- subject: {tag} [\"touch {marker}\"]\n  prompt: '{{}} is'\n  target_new: x\n"
    path = write(tmp_path, "m.yaml", body.encode())
    valid_or_rejected(tmp_path, path, capsys)
    assert not marker.exists()


@settings(max_examples=100, **SETTINGS)
@given(depth=st.integers(min_value=50, max_value=200_000), ext=st.sampled_from([".json", ".jsonl", ".yaml"]))
def test_nesting_bombs(tmp_path, capsys, depth, ext):
    body = "[" * depth + "]" * depth
    assert_rejected(tmp_path, write(tmp_path, "m" + ext, body.encode()), capsys)


def test_yaml_alias_bomb_is_rejected_quickly(tmp_path, capsys):
    import time

    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    body = "\n".join(levels) + "\nfacts: *i\n"
    started = time.perf_counter()
    assert_rejected(tmp_path, write(tmp_path, "bomb.yaml", body.encode()), capsys)
    assert time.perf_counter() - started < 10


@settings(max_examples=100, **SETTINGS)
@given(
    size=st.integers(min_value=10_001, max_value=2_000_000), field=st.sampled_from(["subject", "prompt", "target_new"])
)
def test_huge_fields(tmp_path, capsys, size, field):
    record = {"subject": "S", "prompt": "{} is", "target_new": "x"}
    record[field] = ("{} " if field == "prompt" else "") + "y" * size
    if field == "subject":
        record["prompt"] = "{} is"
    path = write(tmp_path, "m.jsonl", json.dumps(record).encode())
    assert_rejected(tmp_path, path, capsys)


@settings(max_examples=100, **SETTINGS)
@given(ids=st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=6).filter(lambda x: len(set(x)) < len(x)))
def test_duplicate_ids(tmp_path, capsys, ids):
    rows = ["id,subject,prompt,target_new"] + [f"{i},S{n},{{}} is,T{n}" for n, i in enumerate(ids)]
    assert_rejected(tmp_path, write(tmp_path, "m.csv", "\n".join(rows).encode()), capsys)


def test_a_key_with_every_line_breaking_character_is_reported_on_one_line(tmp_path, capsys):
    """Found by the property test above: a neighbourhood key "\\x85" (NEL, a line break to
    str.splitlines) split the error message in two. Every such character is escaped."""
    breakers = "".join(map(chr, [*range(32), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]))
    record = {
        "id": "a",
        "subject": "S",
        "prompt": "{} is",
        "target_new": "x",
        "neighborhood": [{"prompt": "p", "answer": "a", breakers: None}],
    }
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([record]))
    assert_rejected(tmp_path, path, capsys)
