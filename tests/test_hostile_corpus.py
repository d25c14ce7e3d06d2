"""A generated corpus of hostile inputs, each run through real `romebatch apply` (not --dry-run).

More than 2,000 manifests and hyper-parameter files per run, seeded, covering each class of
input that once crashed or hung romebatch: lone surrogates, integers of thousands of digits,
duplicate keys, subjects holding the `{}` placeholder, special files (FIFO, /dev/zero and a
link to it, a folder), hyper-parameter files with non-text keys, NaN, infinity, negative
counts or a bool for a layer, and bad options; markup, ANSI escapes and newlines are mixed
into every one of them, so the error lines must print them inert.

Each must end in exit 2 with only `error:` / `hint:` lines (no traceback, no raw control
character) and write nothing: no journal folder, no results file. The model is a real tiny
model folder, so a file that slipped through validation would load it, create the journal
and fail the "nothing written" check.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 130  # 16 generated classes x 130 = 2,080 files a run
HOSTILE_TEXT = [
    "[/] x",
    "[bold red]boom[/]",
    "\x1b[31mred\x1b[0m",
    "line\nerror: forged",
    "tab\there",
    "\u2028sep",
    "[link=file:///etc/passwd]x[/link]",
    "plain",
]
GOOD = {"subject": "The Space Needle", "prompt": "{} is located in the city of", "target_new": "Paris"}


def _decoration(rng: random.Random) -> dict:
    """Valid-looking fields full of markup and control characters, around the real defect."""
    return {"id": rng.choice(HOSTILE_TEXT) + str(rng.randrange(10**6)), "target_true": rng.choice(HOSTILE_TEXT)}


def _huge(rng: random.Random) -> str:
    return "9" * rng.randint(4301, 9000)


def _fact(rng, **overrides) -> dict:
    fact = {**GOOD, **_decoration(rng)}
    fact.update(overrides)
    return fact


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Each generator writes one hostile file into `folder` and returns (path, extra CLI args).
def gen_surrogate_json(rng, folder, n):
    field = rng.choice(["subject", "prompt", "target_new", "id", "target_true"])
    fact = _fact(rng)
    text = json.dumps([fact]).replace(json.dumps(fact[field])[1:-1], json.dumps(fact[field])[1:-1] + "\\ud800", 1)
    path = folder / f"s{n}.json"
    path.write_text(text, encoding="utf-8")
    return path, []


def gen_surrogate_jsonl(rng, folder, n):
    field = rng.choice(["subject", "target_new", "id"])
    fact = _fact(rng, **{field: "x"})
    line = json.dumps(fact).replace('"x"', '"x\\udc80"', 1)
    return _jsonl(folder / f"s{n}.jsonl", [json.dumps(_fact(rng, id="ok")), line]), []


def gen_huge_int_json(rng, folder, n):
    where = rng.choice(["id", "case_id", "neighbor"])
    if where == "case_id":  # CounterFact's layout
        text = (
            '[{"case_id": ' + _huge(rng) + ', "requested_rewrite": {"prompt": "{} is in", "subject": "X", '
            '"target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}}}]'
        )
    elif where == "id":
        text = '[{"id": ' + _huge(rng) + ', "subject": "X", "prompt": "{} is in", "target_new": "Paris"}]'
    else:
        text = '[{"subject": "X", "prompt": "{} is in", "target_new": "Paris", "paraphrases": [' + _huge(rng) + "]}]"
    path = folder / f"h{n}.json"
    path.write_text(text)
    return path, []


def gen_huge_int_jsonl(rng, folder, n):
    return _jsonl(
        folder / f"h{n}.jsonl", ['{"id": ' + _huge(rng) + ', "subject": "X", "prompt": "{} is", "target_new": "Y"}']
    ), []


def gen_huge_int_yaml(rng, folder, n):
    path = folder / f"h{n}.yaml"
    path.write_text(f"- id: {_huge(rng)}\n  subject: X\n  prompt: '{{}} is in'\n  target_new: Paris\n")
    return path, []


def gen_huge_int_csv_cell(rng, folder, n):
    path = folder / f"h{n}.csv"
    path.write_text(f'id,subject,prompt,target_new,paraphrases\na,X,{{}} is in,Paris,"[{_huge(rng)}]"\n')
    return path, []


def gen_duplicate_key_json(rng, folder, n):
    key = rng.choice(["subject", "target_new", "prompt", "id"])
    body = json.dumps(_fact(rng))[:-1] + f', "{key}": {json.dumps(rng.choice(HOSTILE_TEXT))}}}'
    suffix = rng.choice([".json", ".jsonl"])
    path = folder / f"d{n}{suffix}"
    path.write_text(("[" + body + "]") if suffix == ".json" else body + "\n")
    return path, []


def gen_duplicate_key_yaml(rng, folder, n):
    path = folder / f"d{n}.yaml"
    path.write_text("- subject: X\n  prompt: '{} is in'\n  target_new: Paris\n  target_new: Rome\n")
    return path, []


def gen_placeholder_subject(rng, folder, n):
    subject = rng.choice(["a{}b", "{}", "The {} Tower"])
    fact = _fact(rng, subject=subject, prompt=rng.choice([f"{subject} is in", "{} is in"]))
    path = folder / f"p{n}.yaml"
    path.write_text(yaml.safe_dump([fact], allow_unicode=True))
    return path, []


def gen_special_file(rng, folder, n):
    kind = rng.choice(["fifo", "zero", "zero-link", "folder"])
    path = folder / f"x{n}.{rng.choice(['csv', 'yaml', 'jsonl', 'json'])}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        return Path("/dev/zero"), []
    elif kind == "zero-link":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path, []


def gen_hparams_bad_value(rng, folder, n):
    key, value = rng.choice(
        [
            ("v_lr", ".nan"),
            ("v_lr", ".inf"),
            ("kl_factor", "-.inf"),
            ("v_steps", "-3"),
            ("stats_tokens", "-100"),
            ("layer", "true"),
            ("layer", "-1"),
            ("v_steps", "2.5"),
            ("clamp_norm_factor", "0"),
            ("seed", _huge(rng)),
            ("stats_tokens", "1e400"),
            ("prefixes", "[[1, 2, 3]]"),
            ("exact_protocol", "'yes'"),
            ("ridge", "'1e-3'"),
            ("spread_layers", "0"),
            ("preserve", "'[red]x[/]'"),
        ]
    )
    path = folder / f"hp{n}.yaml"
    path.write_text(f"{key}: {value}\n")
    return _good_manifest(folder, n), ["--hparams", str(path)]


def gen_hparams_bad_keys(rng, folder, n):
    text = rng.choice(
        [
            "1: x\nv_lr: 0.5\n",
            "[1, 2]: x\n",
            "v_lr: 0.5\nv_lr: 0.6\n",
            "? !!binary AA==\n: 1\n",
            f"{rng.choice(HOSTILE_TEXT)!r}: 1\n",
            "- just\n- a list\n",
            "v_lr: [\n",
        ]
    )
    path = folder / f"hk{n}.yaml"
    path.write_text(text)
    return _good_manifest(folder, n), ["--hparams", str(path)]


def gen_hparams_special_file(rng, folder, n):
    path = folder / f"hs{n}.yaml"
    os.mkfifo(path) if rng.random() < 0.5 else path.symlink_to("/dev/zero")
    return _good_manifest(folder, n), ["--hparams", str(path)]


def gen_bad_option(rng, folder, n):
    option = rng.choice(
        [
            ["--on-regression", "bogus"],
            ["--results", str(folder / "r.txt")],
            ["--results", str(folder / "missing-dir" / "r.csv")],
            ["--layer", "x1"],
            ["--layer", _huge(rng)],
            ["--dtype", "float64"],
            ["--device", "tpu"],
            ["--min-retention", "90"],
            ["--repair-every", "-1"],
            ["--repair-span", "-5"],
            ["--preserve", "sometimes"],
            ["--limit", "-2"],
        ]
    )
    return _good_manifest(folder, n), option


def gen_markup_in_errors(rng, folder, n):
    """A CSV whose defect sits beside markup and newlines, in an id and a subject."""
    path = folder / f"m{n}.csv"
    id_ = rng.choice(HOSTILE_TEXT).replace('"', "")
    path.write_text(
        f'id,subject,prompt,target_new\n"{id_}","{rng.choice(HOSTILE_TEXT)}",has no subject slot,Paris\n',
        encoding="utf-8",
    )
    return path, []


def gen_control_key(rng, folder, n):
    key = rng.choice(["\x1b[2J", "bad\nkey", "[red]k[/]", "k\u2028"])
    path = folder / f"k{n}.jsonl"
    path.write_text(json.dumps({**GOOD, key: 1}) + "\n")
    return path, []


def _good_manifest(folder: Path, n: int) -> Path:
    path = folder / f"good{n}.csv"
    path.write_text("id,subject,prompt,target_new\nneedle,The Space Needle,{} is located in the city of,Paris\n")
    return path


GENERATORS = [
    gen_surrogate_json,
    gen_surrogate_jsonl,
    gen_huge_int_json,
    gen_huge_int_jsonl,
    gen_huge_int_yaml,
    gen_huge_int_csv_cell,
    gen_duplicate_key_json,
    gen_duplicate_key_yaml,
    gen_placeholder_subject,
    gen_special_file,
    gen_hparams_bad_value,
    gen_hparams_bad_keys,
    gen_hparams_special_file,
    gen_bad_option,
    gen_markup_in_errors,
    gen_control_key,
]
CONTROL = set(range(32)) - {9} | {0x7F} | set(range(0x80, 0xA0)) | {0x2028, 0x2029}


def assert_clean(code: int, err: str, where: str) -> None:
    assert code == 2, f"{where}: exit {code}: {err[:400]}"
    assert "Traceback" not in err, f"{where}: {err[:400]}"
    lines = err.splitlines()
    assert lines, f"{where}: no message"
    for line in lines:
        assert line.startswith(("error: ", "hint: ", "Usage: ", "Try ", "Error: ")) or not line.strip(), (
            f"{where}: stray line {line!r}"
        )
        assert not any(ord(c) in CONTROL for c in line), f"{where}: raw control character in {line!r}"


def run_apply(argv: list[str], capsys) -> tuple[int, str]:
    from romebatch.cli import main

    saved = sys.argv
    sys.argv = ["romebatch", *argv]
    try:
        try:
            main()
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err


@pytest.mark.parametrize("generator", GENERATORS, ids=lambda g: g.__name__[4:])
def test_generated_hostile_inputs_end_in_exit_2_and_write_nothing(generator, tmp_path, tiny_folder, capsys):
    model = tiny_folder("gpt2")
    capsys.readouterr()  # saving the model printed a progress bar
    rng = random.Random(f"hostile-{generator.__name__}")
    journal = tmp_path / "J"
    results = tmp_path / "out" / "results.csv"
    results.parent.mkdir()
    for n in range(PER_CLASS):
        folder = tmp_path / f"case{n}"
        folder.mkdir()
        manifest, extra = generator(rng, folder, n)
        argv = [
            "apply",
            str(manifest),
            "--journal",
            str(journal),
            "--model",
            str(model),
            "--results",
            str(results),
            *extra,
        ]
        code, err = run_apply(argv, capsys)
        assert_clean(code, err, f"{generator.__name__} #{n} ({manifest.name} {extra})")
        assert not journal.exists(), f"{generator.__name__} #{n}: a journal was written"
        assert not results.exists() and not list(results.parent.iterdir()), (
            f"{generator.__name__} #{n}: results written"
        )


def test_the_corpus_is_large_enough():
    assert PER_CLASS * len(GENERATORS) >= 2000


@pytest.mark.parametrize("generator", GENERATORS[::3], ids=lambda g: g.__name__[4:])
def test_a_sample_through_a_real_process(generator, tmp_path, tiny_folder):
    """The same, as a user runs it: `python -m romebatch apply` in its own process."""
    model = tiny_folder("gpt2")
    folder = tmp_path / "case"
    folder.mkdir()
    manifest, extra = generator(random.Random(f"process-{generator.__name__}"), folder, 0)
    journal = tmp_path / "J"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "romebatch",
            "apply",
            str(manifest),
            "--journal",
            str(journal),
            "--model",
            str(model),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
    )
    assert_clean(proc.returncode, proc.stderr, generator.__name__)
    assert not journal.exists()
