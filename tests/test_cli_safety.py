"""The CLI's promises at its edges, through the real entry point.

- Only `apply` creates a journal: every other command on a missing, mistyped, file or
  dangling-symlink journal exits 2 and creates nothing (a typo once exported the base model).
- Fact text with rich markup, ANSI escapes and newlines is printed literally everywhere
  (report, log, dry run), and can never forge an `error:` line.
- Exit codes: 3 stopped on regression, 4 facts failed, 130/143 signals (tests/test_crash.py).
- A model folder that asks to run its own code is refused, even with "y" on stdin.
- A journal on read-only media reads (log, verify, check, export); writers fail cleanly.
- A results CSV never carries a live spreadsheet formula.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_HPARAMS

REPO = Path(__file__).resolve().parents[1]
HOSTILE_SUBJECT = "[/] x"
HOSTILE_ID = "id\x1b[31m\nerror: forged"


def romebatch(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("ROMEBATCH_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "romebatch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


@pytest.fixture
def hp_file(tmp_path):
    path = tmp_path / "hp.yaml"
    path.write_text(json.dumps({**TINY_HPARAMS, "prefixes": [list(p) for p in TINY_HPARAMS["prefixes"]]}))
    return path


def write_hostile_manifest(path: Path) -> Path:
    facts = [
        {
            "id": HOSTILE_ID,
            "subject": HOSTILE_SUBJECT,
            "prompt": "{} is located in the city of",
            "target_new": "[bold]Paris[/bold]",
            "target_true": "Seattle",
        },
        {
            "id": "=cmd|' /C calc'!A0",
            "subject": "The Eiffel Tower",
            "prompt": "{} is located in the city of",
            "target_new": "@SUM(1+1)",
            "target_true": "Paris",
        },
    ]
    path.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    return path


@pytest.fixture(scope="module")
def applied(tmp_path_factory, bytelevel_tokenizer):
    """One real apply of the hostile manifest on a tiny GPT-2, shared by the read-only tests."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("safety")
    model = root / "tiny-gpt2"
    tiny_model("gpt2", bytelevel_tokenizer).save_pretrained(model)
    bytelevel_tokenizer.save_pretrained(model)
    hp = root / "hp.yaml"
    hp.write_text(json.dumps({**TINY_HPARAMS, "prefixes": [list(p) for p in TINY_HPARAMS["prefixes"]]}))
    manifest = write_hostile_manifest(root / "facts.jsonl")
    proc = romebatch(
        "apply",
        str(manifest),
        "--model",
        str(model),
        "--hparams",
        str(hp),
        "--journal",
        "J",
        "--results",
        "out.csv",
        cwd=root,
    )
    return root, model, proc


def test_hostile_fact_text_is_printed_literally_and_forges_nothing(applied):
    root, _, proc = applied
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines()), proc.stderr
    assert HOSTILE_SUBJECT in proc.stderr  # the markup is shown, not interpreted
    assert "\x1b[31m" not in proc.stderr and "\\x1b[31m" in proc.stderr  # the escape is made visible
    log = romebatch("log", "--journal", "J", cwd=root)
    assert log.returncode == 0, log.stderr
    assert HOSTILE_SUBJECT in log.stderr and "[bold]Paris[/bold]" in log.stderr
    assert not any(line.startswith("error:") for line in log.stderr.splitlines())
    dry = romebatch("apply", "facts.jsonl", "--journal", "fresh", "--dry-run", cwd=root)
    assert dry.returncode == 0 and HOSTILE_SUBJECT in dry.stderr
    assert not any(line.startswith("error:") for line in dry.stderr.splitlines()), dry.stderr
    assert not (root / "fresh").exists()


def test_a_results_csv_carries_no_live_formula(applied):
    import polars as pl

    root, _, _ = applied
    frame = pl.read_csv(root / "out.csv")
    cells = [str(v) for column in frame.columns for v in frame[column].to_list() if isinstance(v, str)]
    assert "'=cmd|' /C calc'!A0" in cells and "'@SUM(1+1)" in cells
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), cells


@pytest.mark.parametrize(
    "command",
    [
        ["export", "out"],
        ["rollback", "--steps", "1"],
        ["log"],
        ["verify"],
        ["check"],
    ],
)
@pytest.mark.parametrize("kind", ["missing", "file", "dangling-link"])
def test_commands_other_than_apply_never_create_a_journal(tmp_path, command, kind):
    journal = tmp_path / "typo"
    if kind == "file":
        journal.write_text("not a journal")
    elif kind == "dangling-link":
        journal.symlink_to(tmp_path / "nowhere")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = romebatch(*command, "--journal", str(journal), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was created"
    assert not (tmp_path / "out").exists()


def test_options_are_checked_before_any_model_loads(tmp_path, hp_file):
    manifest = write_hostile_manifest(tmp_path / "facts.jsonl")
    # --model names nothing loadable: a command that got as far as loading would say so.
    for args in (
        ["--on-regression", "bogus"],
        ["--results", "r.txt"],
        ["--results", "no/such/dir/r.csv"],
        ["--dtype", "float64"],
        ["--min-retention", "90"],
    ):
        proc = romebatch("apply", str(manifest), "--model", "no-such-model", *args, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "no-such-model" not in proc.stderr, (args, proc.stderr)
    proc = romebatch("rollback", "--model", "no-such-model", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "choose exactly one" in proc.stderr, proc.stderr


def test_stopped_on_regression_exits_3(monkeypatch, tmp_path, tiny_folder, hp_file, capsys):
    from test_cli import run_main

    from romebatch.probes import ProbeOutcome, RegressionProbes

    model = tiny_folder("gpt2")
    manifest = tmp_path / "facts.csv"
    manifest.write_text(
        "id,subject,prompt,target_new,target_true\n"
        "a,The Space Needle,{} is located in the city of,Paris,Seattle\n"
        "b,Big Ben,{} is located in the city of,Tokyo,London\n"
    )

    def failing(self, fact, earlier, edit_seconds):  # every edit breaks its neighbourhood
        self.applied.add(fact.hash)
        return ProbeOutcome(neighborhood_drop=1.0, problems=["broke 100% of its neighbourhood prompts (max 50%)"])

    monkeypatch.setattr(RegressionProbes, "check", failing)
    code = run_main(
        monkeypatch,
        [
            "apply",
            str(manifest),
            "--model",
            str(model),
            "--hparams",
            str(hp_file),
            "--journal",
            str(tmp_path / "J"),
            "--on-regression",
            "stop",
            "--json",
        ],
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 3
    assert summary["stopped_on_regression"] and summary["exit_code"] == 3
    assert summary["rejected"] == 1 and summary["applied"] == 0 and summary["facts"] == 1  # b was never tried


def test_failed_facts_exit_4(monkeypatch, tmp_path, tiny_folder, hp_file, capsys):
    from test_cli import run_main

    model = tiny_folder("gpt2")
    manifest = tmp_path / "facts.csv"
    manifest.write_text("id,subject,prompt,target_new\na,The Space Needle,{} is located in the city of,Paris\n")

    def cannot(*args, **kwargs):
        raise ValueError("no token covers the subject")

    monkeypatch.setattr("romebatch.pipeline.compute_edit", cannot)
    code = run_main(
        monkeypatch,
        [
            "apply",
            str(manifest),
            "--model",
            str(model),
            "--hparams",
            str(hp_file),
            "--journal",
            str(tmp_path / "J"),
            "--no-probes",
        ],
    )
    assert code == 4
    assert "could not compute the edit" in capsys.readouterr().err


def test_a_model_folder_asking_to_run_its_code_is_refused(tmp_path, tiny_folder):
    model = tiny_folder("gpt2")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    manifest = tmp_path / "facts.csv"
    manifest.write_text("id,subject,prompt,target_new\na,The Space Needle,{} is located in the city of,Paris\n")
    for command in (
        ["apply", str(manifest), "--journal", "J"],
        ["trace", "--prompt", "The Space Needle is", "--subject", "The Space Needle"],
    ):
        proc = romebatch(*command, "--model", str(model), cwd=tmp_path, stdin="y\ny\n", timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "never runs a model folder's code" in proc.stderr
        assert not marker.exists()
    assert not (tmp_path / "J").exists()


@pytest.fixture
def read_only(applied, tmp_path):
    """The applied journal, seen through a read-only bind mount (an auditor's copy)."""
    root, model, _ = applied
    view = tmp_path / "ro"
    view.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(root / "J"), str(view)], capture_output=True, text=True)
    if done.returncode == 0:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True)
    if done.returncode or os.access(view, os.W_OK):
        subprocess.run(["umount", str(view)], capture_output=True)
        pytest.skip(f"a read-only bind mount cannot be made here ({done.stderr.strip()}); needs root")
    try:
        yield view, model
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_a_read_only_journal_reads_and_refuses_writes_cleanly(read_only, tmp_path):
    view, model = read_only
    for command in (["log"], ["check"], ["verify"], ["export", str(tmp_path / "exported")]):
        proc = (
            romebatch(*command, "--journal", str(view), "--model", str(model), cwd=tmp_path)
            if command[0] != "log"
            else romebatch(*command, "--journal", str(view), cwd=tmp_path)
        )
        assert proc.returncode in (0, 1), (command, proc.stderr)  # verify may report a regression (1)
        assert "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "exported" / "romebatch.json").is_file()
    proc = romebatch("rollback", "--steps", "1", "--journal", str(view), "--model", str(model), cwd=tmp_path)
    assert proc.returncode == 2 and "write lock" in proc.stderr, proc.stderr


def test_exporting_onto_a_dangling_symlink_leaves_nothing(applied, tmp_path):
    root, model, _ = applied
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    proc = romebatch("export", str(link), "--journal", str(root / "J"), "--model", str(model), cwd=tmp_path)
    assert proc.returncode == 2 and "symbolic link to nothing" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
