"""The `romebatch` command: argument parsing, exit codes, error lines, --json, and writing nothing on bad input.

The library calls are replaced by fakes (no model is loaded), except where a real journal
is needed; it is then built directly with `Journal` and synthetic edits. Exit codes are
checked through `python -m romebatch` in a subprocess, since `main()` maps errors to 2.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from romebatch.cli import app
from romebatch.editor import ApplyResult, FactResult
from romebatch.hparams import HParams
from romebatch.journal import DB_NAME, Journal
from romebatch.journal_records import EditRecord
from romebatch.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

HEADER = "id,subject,prompt,target_new,target_true\n"
GOOD_CSV = HEADER + (
    "needle,The Space Needle,The Space Needle is located in the city of,Paris,Seattle\n"
    "ben,Big Ben,{} is located in the city of,Tokyo,London\n"
    "darrieux,Danielle Darrieux,The mother tongue of Danielle Darrieux is,Spain,French\n"
)


def runner() -> CliRunner:
    return CliRunner()


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    data = json.loads(lines[-1])
    assert isinstance(data, dict)
    return data


def romebatch(*args: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "romebatch", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_journal(directory: Path, fact_hashes: list[str], head: int | None = None) -> None:
    """A real journal file with synthetic edits (chained), without a model."""
    with Journal(directory, write=True, create=True) as journal:
        journal.set_many({"model": "tiny-test-model", "base_hash": "sha256:base", "head": 0})
        for i, fact_hash in enumerate(fact_hashes, 1):
            rng = np.random.default_rng(i)
            journal.commit_edit(
                EditRecord(
                    seq=0,
                    parent=i - 1,
                    fact_id=f"id{i}",
                    fact_hash=fact_hash,
                    fact_json=json.dumps(
                        {"id": f"id{i}", "subject": f"Subject {i}", "prompt": "{} is in", "target_new": f"Target {i}"}
                    ),
                    layer=1,
                    weight_name="w",
                    lam=rng.normal(size=4),
                    u=rng.normal(size=8),
                    update_norm=float(i),
                    denominator=0.5,
                    weight_hash_before=f"sha256:{i - 1}",
                    weight_hash_after=f"sha256:{i}",
                )
            )
        if head is not None:
            journal.move_head(head)


# ----------------------------------------------------------------------------- apply: parsing
class Recorder:
    def __init__(self, returns):
        self.calls: list[tuple[tuple, dict]] = []
        self.returns = returns

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.returns(*args, **kwargs) if callable(self.returns) else self.returns


def fake_apply_result(manifest, **kwargs) -> ApplyResult:
    row = FactResult(
        "needle",
        "sha256:x",
        "The Space Needle",
        "Paris",
        "Seattle",
        "applied",
        seq=3,
        layer=1,
        p_new_before=0.1,
        p_true_before=0.5,
        p_new_after=0.7,
        p_true_after=0.2,
        update_norm=2.5,
        denominator=1.5,
        v_steps=4,
        seconds=0.5,
    )
    skipped = FactResult(
        "ben", "sha256:y", "Big Ben", "Tokyo", "London", "already_applied", reason="in the journal already"
    )
    kwargs["on_edit"](row)  # the CLI's progress callback must accept a real row
    return ApplyResult(journal=str(kwargs["journal"]), head=3, results=[row, skipped], seconds=1.25)


@pytest.fixture
def fake_apply(monkeypatch):
    recorder = Recorder(fake_apply_result)
    monkeypatch.setattr("romebatch.api.apply", recorder)
    return recorder


def test_apply_passes_every_option(tmp_path, monkeypatch, fake_apply):
    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(GOOD_CSV)
    Path("corpus.txt").write_text("some text\n")
    result = runner().invoke(
        app,
        [
            "apply",
            "facts.csv",
            "--journal",
            "J",
            "--model",
            "some/model",
            "--layer",
            "2",
            "--limit",
            "2",
            "--results",
            "out.csv",
            "--v-steps",
            "7",
            "--v-lr",
            "0.25",
            "--kl-factor",
            "0.1",
            "--mom2",
            "identity",
            "--stats-corpus",
            "corpus.txt",
            "--stats-tokens",
            "500",
            "--stats-sampling",
            "plain",
            "--module-template",
            "a.{}.b",
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(fake_apply.calls) == 1
    args, kwargs = fake_apply.calls[0]
    (manifest,) = args  # the Manifest the CLI validated, passed on instead of read again
    assert manifest.path == "facts.csv" and [f.id for f in manifest.facts] == ["needle", "ben"]  # --limit 2
    assert kwargs["journal"] == Path("J")
    assert kwargs["model"] == "some/model"
    assert kwargs["layer"] == 2 and "limit" not in kwargs  # applied once, to the manifest above
    assert kwargs["results"] == Path("out.csv")
    assert kwargs["device"] == "cuda" and kwargs["dtype"] == "bfloat16"
    assert kwargs["module_template"] == "a.{}.b"
    assert callable(kwargs["on_edit"]) and callable(kwargs["log"])
    assert kwargs["hparams"] == HParams(
        layer=2,
        v_steps=7,
        v_lr=0.25,
        kl_factor=0.1,
        mom2="identity",
        stats_corpus="corpus.txt",
        stats_tokens=500,
        stats_sampling="plain",
    )
    summary = last_json(result.stdout)
    assert summary["head"] == 3 and summary["applied"] == 1 and summary["already_applied"] == 1
    assert summary["journal"] == "J" and summary["efficacy"] == 100.0


def test_apply_without_hparams_lets_the_journal_keep_its_own(tmp_path, monkeypatch, fake_apply):
    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(GOOD_CSV)
    result = runner().invoke(app, ["apply", "facts.csv"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = fake_apply.calls
    assert kwargs["hparams"] is None
    assert kwargs["journal"] == Path("romebatch.journal")
    assert kwargs["model"] is None and kwargs["layer"] is None and "limit" not in kwargs
    assert kwargs["device"] == "cpu" and kwargs["dtype"] is None  # None: the journal's own dtype
    # The human report goes to stderr, stdout stays clean.
    assert result.stdout.strip() == ""
    assert "1 applied" in result.stderr and "head 3" in result.stderr


def test_apply_hparams_file_with_flag_override(tmp_path, monkeypatch, fake_apply):
    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(GOOD_CSV)
    Path("hp.yaml").write_text("v_lr: 3.0\nkl_factor: 0.2\nprefixes: [[2, 3], [4, 1]]\nstats_tokens: 900\n")
    result = runner().invoke(app, ["apply", "facts.csv", "--hparams", "hp.yaml", "--v-lr", "2.0"])
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = fake_apply.calls
    assert kwargs["hparams"] == HParams(v_lr=2.0, kl_factor=0.2, prefixes=((2, 3), (4, 1)), stats_tokens=900)


def test_apply_with_bad_manifest_never_calls_the_library(tmp_path, monkeypatch, fake_apply):
    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(HEADER + "a,X,no subject here,Y,Z\n")
    result = runner().invoke(app, ["apply", "facts.csv", "--journal", "J"])
    assert result.exit_code != 0
    assert fake_apply.calls == []
    assert not Path("J").exists()


def test_apply_repair_options_reach_the_library_and_a_negative_span_is_refused(
    tmp_path, monkeypatch, capsys, fake_apply
):
    from test_conventions import main_exit

    monkeypatch.chdir(tmp_path)
    Path("facts.csv").write_text(GOOD_CSV)
    result = runner().invoke(app, ["apply", "facts.csv", "--journal", "J", "--repair-span", "250"])
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = fake_apply.calls
    assert kwargs["repair_span"] == 250
    code, err = main_exit(monkeypatch, capsys, "apply", "facts.csv", "--journal", "K", "--repair-span", "-1")
    assert code == 2 and len(fake_apply.calls) == 1 and not Path("K").exists()
    assert err.strip().splitlines() == ["error: --repair-span -1: give a number of facts, or 0 to check them all"]


# ----------------------------------------------------------------------------- rollback / export / log
@pytest.fixture
def fake_rollback(monkeypatch):
    recorder = Recorder(lambda journal, **kwargs: kwargs["to"] if kwargs["to"] is not None else 1)
    monkeypatch.setattr("romebatch.api.rollback", recorder)
    return recorder


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--to", "3"], dict(to=3, steps=None, fact=None, base=False, prune=False)),
        (["--to", "0"], dict(to=0, steps=None, fact=None, base=False, prune=False)),
        (["--steps", "2"], dict(to=None, steps=2, fact=None, base=False, prune=False)),
        (["--fact", "needle"], dict(to=None, steps=None, fact="needle", base=False, prune=False)),
        (["--base", "--prune"], dict(to=None, steps=None, fact=None, base=True, prune=True)),
    ],
)
def test_rollback_selectors(argv, expected, fake_rollback):
    result = runner().invoke(app, ["rollback", "-j", "JJ", *argv, "--model", "m", "--json"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = fake_rollback.calls
    assert args == (Path("JJ"),)
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["model"] == "m" and kwargs["device"] == "cpu"
    out = last_json(result.stdout)
    assert out == {"journal": "JJ", "head": expected["to"] if expected["to"] is not None else 1}


def test_rollback_human_output(fake_rollback):
    result = runner().invoke(app, ["rollback", "--to", "0"])
    assert result.exit_code == 0, result.output
    assert "head is now 0" in result.stderr and "base model" in result.stderr
    assert result.stdout.strip() == ""


def test_export_options(monkeypatch):
    recorder = Recorder(lambda outdir, **kwargs: Path(outdir))
    monkeypatch.setattr("romebatch.api.export", recorder)
    result = runner().invoke(app, ["export", "OUT", "--force", "--journal", "J", "--json"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = recorder.calls
    assert args == (Path("OUT"),)
    assert kwargs["force"] is True and kwargs["journal"] == Path("J") and kwargs["model"] is None
    assert last_json(result.stdout) == {"journal": "J", "export": "OUT"}

    recorder.calls.clear()
    result = runner().invoke(app, ["export", "OUT2"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = recorder.calls
    assert args == (Path("OUT2"),) and kwargs["force"] is False and kwargs["journal"] == Path("romebatch.journal")


def test_log_json_on_a_real_journal(tmp_path):
    directory = tmp_path / "J"
    write_journal(directory, ["sha256:a", "sha256:b", "sha256:c"], head=2)
    with Journal(directory, write=True) as journal:
        journal.record_rejection(load_manifest(_write(tmp_path, "f.csv", GOOD_CSV)).facts[0], 1, "too big", 9.0, 0.1)
    result = runner().invoke(app, ["log", "--journal", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    data = last_json(result.stdout)
    assert data["head"] == 2 and data["model"] == "tiny-test-model"
    assert [(e["seq"], e["parent"], e["status"]) for e in data["edits"]] == [
        (1, 0, "applied"),
        (2, 1, "applied"),
        (3, 2, "rolled_back"),
    ]
    assert [e["subject"] for e in data["edits"]] == ["Subject 1", "Subject 2", "Subject 3"]
    assert len(data["rejections"]) == 1
    assert data["rejections"][0]["reason"] == "too big" and data["rejections"][0]["fact_id"] == "needle"
    assert "fact_json" not in data["rejections"][0]

    # The same through the real entry point, and the human form.
    proc = romebatch("log", "--journal", str(directory), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout) == data
    human = runner().invoke(app, ["log", "--journal", str(directory)])
    assert human.exit_code == 0, human.output
    assert "head 2" in human.stderr and "needle: too big" in human.stderr


def _write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- manifest errors via main()
BAD_MANIFESTS = {
    # name: (file name, content, [(row, field, fragment), ...]); row/field None where the message has none
    "duplicate_ids": (
        "bad.csv",
        HEADER + "a,Big Ben,{} is in,Paris,London\na,Rome,{} is in,Berlin,Italy\n",
        [(3, "id", "duplicate id 'a'")],
    ),
    "subject_not_in_prompt": (
        "bad.csv",
        HEADER + "a,Big Ben,The tower is in,Paris,London\n",
        [(2, "prompt", "not found in prompt")],
    ),
    "empty_target": ("bad.csv", HEADER + "a,Big Ben,{} is in,   ,London\n", [(2, "target_new", "empty target")]),
    "conflicting_targets": (
        "bad.csv",
        HEADER + "a,Big Ben,{} is in,Paris,London\nb,Big Ben,{} is in,Rome,London\n",
        [(3, "target_new", "conflicting targets")],
    ),
    "unknown_column": (
        "bad.csv",
        "id,subject,prompt,target_new,colour\na,Big Ben,{} is in,Paris,red\n",
        [(1, "colour", "unknown column")],
    ),
    "invalid_utf8": (
        "bad.csv",
        HEADER.encode() + b"a,Big Ben,{} is in,Paris,London\nb,Caf\xe9,{} is in,X,Y\n",
        [(3, None, "not valid UTF-8")],
    ),
    "yaml_python_tag": (
        "bad.yaml",
        "- subject: !!python/object/apply:os.system ['touch pwned']\n  prompt: '{} is in'\n  target_new: Paris\n",
        [(1, None, "invalid YAML")],
    ),
    "missing_file": (None, "nope.csv", [(None, None, "cannot read file")]),
    "unsupported_extension": ("facts.txt", "subject,prompt\n", [(None, None, "unsupported file type '.txt'")]),
    "two_problems": (
        "bad.csv",
        HEADER + "a,Big Ben,{} is in,Paris,London\na,Rome,{} is in,Berlin,Italy\nc,Paris,{} is in,,France\n",
        [(3, "id", "duplicate id"), (4, "target_new", "empty target")],
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_manifest_errors_exit_2_and_write_nothing(case, tmp_path):
    name, content, expected = BAD_MANIFESTS[case]
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    if name is None:
        name = content  # a file that does not exist
    else:
        _write(work, name, content)
    before = sorted(p.name for p in work.iterdir())
    proc = romebatch("apply", name, "--journal", "J", cwd=work, env={"ROMEBATCH_HOME": str(home)})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(expected), lines
    for line, (row, field, fragment) in zip(lines, expected):
        assert line.startswith("error: "), line
        where = f"error: {name}:{row}:" if row is not None else f"error: {name}:"
        assert line.startswith(where), line
        if field is not None:
            assert f"field '{field}'" in line, line
        assert fragment in line, line
    # Nothing written: no journal, no cache, nothing beside the manifest, and no code ran.
    assert sorted(p.name for p in work.iterdir()) == before
    assert not home.exists()


def test_preflight_error_after_model_load_writes_nothing(tmp_path, tiny_folder):
    """A prompt longer than the model's context is refused before the journal exists."""
    folder = tiny_folder("gpt2")
    work = tmp_path / "work"
    work.mkdir()
    long_prompt = "{} is " + " ".join(["located in the city of"] * 40)
    _write(work, "facts.csv", HEADER + f"ok,Big Ben,{{}} is in,Paris,London\nlong,Rome,{long_prompt},Paris,Italy\n")
    proc = romebatch(
        "apply",
        "facts.csv",
        "--model",
        str(folder),
        "--journal",
        "J",
        cwd=work,
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: facts.csv:3: field 'prompt'"), proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["facts.csv"]


def test_other_errors_exit_2(tmp_path):
    proc = romebatch("log", "--journal", "missing", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no journal at missing")
    assert "hint:" in proc.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("argv", [["rollback", "--to", "three"], ["apply"], ["frobnicate"]])
def test_usage_errors_exit_2_without_traceback(argv, tmp_path):
    # Regression: typer's vendored click exceptions escaped main() as a traceback, exit 1.
    usage = romebatch(*argv, cwd=tmp_path)
    assert "Traceback" not in usage.stderr, usage.stderr
    assert usage.returncode == 2
    assert list(tmp_path.iterdir()) == []


def run_main(monkeypatch, argv: list[str]) -> int:
    """cli.main() in process, as the console script runs it: its exit status."""
    from romebatch.cli import main

    monkeypatch.setattr(sys, "argv", ["romebatch", *argv])
    try:
        main()
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    return 0


def test_main_maps_user_errors_to_exit_2(monkeypatch, capsys):
    from romebatch.errors import JournalLockedError, ManifestError

    def locked(*args, **kwargs):
        raise JournalLockedError("journal J is in use by pid 4242", hint="wait for it")

    monkeypatch.setattr("romebatch.api.rollback", locked)
    assert run_main(monkeypatch, ["rollback", "--to", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: journal J is in use by pid 4242", "hint: wait for it"]

    def bad(*args, **kwargs):
        raise ManifestError(["f.csv:3: field 'prompt': too long", "f.csv:4: field 'target_new': tokenises to nothing"])

    monkeypatch.setattr("romebatch.api.export", bad)
    assert run_main(monkeypatch, ["export", "OUT"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: f.csv:3: field 'prompt': too long",
        "error: f.csv:4: field 'target_new': tokenises to nothing",
    ]


def test_abort_by_second_ctrl_c_exits_130(monkeypatch, capsys):
    # Regression: typer turned KeyboardInterrupt into a *returned* 130, and main() exited 0.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("romebatch.api.rollback", interrupted)
    assert run_main(monkeypatch, ["rollback", "--to", "1"]) == 130
    assert "aborted" in capsys.readouterr().err


def test_check_of_a_damaged_journal_exits_1(monkeypatch, capsys):
    # Regression: the code of `raise typer.Exit(1)` was returned by typer and dropped by main().
    from romebatch.editor import CheckReport

    report = CheckReport(journal="J", edits=3, head=3, problems=["edit 2 (fact x): damaged"], last_good=1)
    monkeypatch.setattr("romebatch.api.check", lambda *args, **kwargs: report)
    assert run_main(monkeypatch, ["check", "--journal", "J"]) == 1
    assert "damaged: edit 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- no torch for --help / bad input
IMPORT_PROBE = """
import json, sys
sys.argv = ["romebatch", *json.loads(sys.argv[1])]
from romebatch.cli import main
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules, "code": code}))
"""


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["apply", "--help"], 0), (["apply", "bad.csv"], 2)])
def test_help_and_bad_manifest_do_not_import_torch(argv, code, tmp_path):
    _write(tmp_path, "bad.csv", HEADER + "a,X,no subject,Y,Z\n")
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, json.dumps(argv)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    probe = last_json(proc.stdout)
    assert probe == {"torch": False, "transformers": False, "code": code}, proc.stderr
    if argv[-1] == "--help":
        assert "Usage" in proc.stdout


def test_help_lists_the_commands(tmp_path):
    proc = romebatch("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("apply", "rollback", "export", "log"):
        assert command in proc.stdout


# ----------------------------------------------------------------------------- dry run
def test_dry_run_lists_pending_without_creating_the_journal(tmp_path):
    _write(tmp_path, "facts.csv", GOOD_CSV)
    proc = romebatch("apply", "facts.csv", "--journal", "J", "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = last_json(proc.stdout)
    assert data["facts"] == 3
    assert [row["id"] for row in data["pending"]] == ["needle", "ben", "darrieux"]
    assert data["pending"][1]["prompt"] == "{} is located in the city of"
    assert not (tmp_path / "J").exists()

    human = romebatch("apply", "facts.csv", "--journal", "J", "--dry-run", cwd=tmp_path)
    assert human.returncode == 0 and human.stdout.strip() == ""
    assert "3 pending" in human.stderr and "needle" in human.stderr and "darrieux" in human.stderr
    assert not (tmp_path / "J").exists()


def test_dry_run_against_an_existing_journal(tmp_path):
    manifest = _write(tmp_path, "facts.csv", GOOD_CSV)
    facts = load_manifest(manifest).facts
    # "ben" is applied; "darrieux" was applied then rolled back, so it is pending again.
    write_journal(tmp_path / "J", [facts[1].hash, facts[2].hash], head=1)
    db = sqlite3.connect(str(tmp_path / "J" / DB_NAME))
    before = list(db.iterdump())
    db.close()
    proc = romebatch("apply", "facts.csv", "--journal", "J", "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [row["id"] for row in last_json(proc.stdout)["pending"]] == ["needle", "darrieux"]
    db = sqlite3.connect(str(tmp_path / "J" / DB_NAME))
    assert list(db.iterdump()) == before
    db.close()


# ----------------------------------------------------------------------------- a locked journal
HOLD_LOCK = """
import sys
from romebatch.journal import Journal
journal = Journal(sys.argv[1], write=True, create=True)
journal.set_many({"model": "tiny-test-model", "base_hash": "sha256:base", "head": 0})
print("locked", flush=True)
sys.stdin.read()
"""


def test_locked_journal_exits_2_naming_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, "J"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = romebatch("rollback", "--journal", "J", "--to", "0", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith("error: journal J is in use by"), first
        assert f"pid {holder.pid}" in first
        assert "Traceback" not in proc.stderr
        # Readers are not blocked.
        reader = romebatch("log", "--journal", "J", "--json", cwd=tmp_path)
        assert reader.returncode == 0, reader.stderr
        assert last_json(reader.stdout)["head"] == 0
    finally:
        holder.kill()
        holder.wait()


def in_process(monkeypatch, capsys, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`romebatch ARGS` run in this process (no interpreter start per case): its code and output."""
    monkeypatch.chdir(cwd)
    code = run_main(monkeypatch, list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["rollback", "--to", "99999999999999999999"], "has no edit 99999999999999999999"),
        (["rollback", "--to", "7"], "has no edit 7"),
        (["rollback", "--steps", "5"], "--steps 5: the head is 2 edit(s) from the base"),
        (["rollback", "--fact", "nope"], "--fact nope: no applied edit has that fact id"),
        (["compare", "--at", "99999999999999999999"], "has no edit 99999999999999999999"),
    ],
)
def test_a_state_the_journal_lacks_is_refused_before_the_model_loads(tmp_path, argv, says, monkeypatch, capsys):
    # The journal names a model that cannot load ("tiny-test-model"): a selector checked only
    # after loading would fail on the model instead, and a number past SQLite's integers used to
    # escape as OverflowError.
    write_journal(tmp_path / "J", ["a" * 64, "b" * 64])
    database = (tmp_path / "J" / DB_NAME).read_bytes()
    proc = in_process(monkeypatch, capsys, *argv, "--journal", "J", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert (tmp_path / "J" / DB_NAME).read_bytes() == database


def _refused(proc: subprocess.CompletedProcess, says: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and says in proc.stderr.splitlines()[0], proc.stderr


@pytest.mark.parametrize("target", ["dangling", "loop"])
def test_export_to_a_link_to_nothing_is_refused_before_the_model_loads(tmp_path, target, monkeypatch, capsys):
    # The journal's model ("tiny-test-model") cannot load: a check made after loading would fail
    # on the model instead, and the adapter used to be written beside the link, then left there.
    write_journal(tmp_path / "J", ["a" * 64])
    if target == "dangling":
        (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "out").symlink_to(tmp_path / "back")
        (tmp_path / "back").symlink_to(tmp_path / "out")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["export", "--adapter", "out"], ["export", "out"]):
        _refused(
            in_process(monkeypatch, capsys, *argv, "--journal", "J", cwd=tmp_path), "out is a symbolic link to nothing"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("make", ["file", "loop", "under_a_file"])
def test_dry_run_refuses_a_journal_path_a_run_would_refuse(tmp_path, make, monkeypatch, capsys):
    manifest = tmp_path / "facts.csv"
    manifest.write_text(GOOD_CSV)
    if make == "file":
        journal, says = tmp_path / "J", "is a file, not a journal folder"
        journal.write_text("x")
    elif make == "loop":
        journal, says = tmp_path / "J", "is a symbolic link to nothing"
        journal.symlink_to(tmp_path / "K")
        (tmp_path / "K").symlink_to(journal)
    else:
        (tmp_path / "plain").write_text("x")
        journal, says = tmp_path / "plain" / "J", "is not a folder"
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(
        in_process(monkeypatch, capsys, "apply", str(manifest), "--dry-run", "--journal", str(journal), cwd=tmp_path),
        says,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (
        in_process(
            monkeypatch, capsys, "apply", str(manifest), "--dry-run", "--journal", "new/J", cwd=tmp_path
        ).returncode
        == 0
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--prompt", "The Eiffel Tower is in", "--subject", ""], "--subject is empty"),
        (["--prompt", "The Eiffel Tower is in", "--subject", "   "], "--subject is empty"),
        (["--prompt", "The Eiffel Tower is in", "--subject", "Big Ben"], "does not occur in --prompt"),
        (["--prompt", "The Eiffel Tower is in", "--subject", "Eiffel", "--answer", ""], "--answer is empty"),
        (["--facts", "known.json"], "known.json:1: field 'subject': empty"),
        (["--prompt", "The Eiffel Tower is in", "--subject", "Eiffel", "--out", "d.png"], "is a folder"),
    ],
)
def test_trace_checks_its_fact_before_the_model_loads(tmp_path, argv, says, monkeypatch, capsys):
    (tmp_path / "known.json").write_text(json.dumps([{"prompt": "X is in", "subject": "", "attribute": "Paris"}]))
    (tmp_path / "d.png").mkdir()
    _refused(
        in_process(monkeypatch, capsys, "trace", *argv, "--model", str(tmp_path / "no-model-here"), cwd=tmp_path), says
    )


@pytest.mark.parametrize(
    "content, says",
    [(None, "not a regular file"), ("[1]\n", "results.jsonl:1:"), ('{"model_hash": 5, "kind": "trace"}\n', ":1:")],
)
def test_tune_checks_its_results_file_before_the_model_loads(tmp_path, content, says, monkeypatch, capsys):
    manifest = tmp_path / "facts.csv"
    manifest.write_text(GOOD_CSV)
    results = tmp_path / "results.jsonl"
    if content is None:
        results.mkdir()
    else:
        results.write_text(content)
    proc = in_process(
        monkeypatch,
        capsys,
        "tune",
        str(manifest),
        "--no-save",
        "--results",
        str(results),
        "--model",
        str(tmp_path / "none"),
        cwd=tmp_path,
    )
    _refused(proc, says)


def test_a_dry_run_checks_the_device_map_file_too(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "facts.csv"
    manifest.write_text(GOOD_CSV)
    (tmp_path / "map.json").write_text('{"model.layers.0": "gpu-ish"}')
    proc = in_process(
        monkeypatch, capsys, "apply", str(manifest), "--dry-run", "--device-map", "map.json", cwd=tmp_path
    )
    _refused(proc, "--device-map map.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.csv", "map.json"]
