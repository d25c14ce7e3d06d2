"""Crash safety of `romebatch apply`: kill -9 at any point, then re-run, ends exactly where an uninterrupted run does.

Every run is a real `python -m romebatch apply` subprocess on a tiny GPT-2 saved as a model
folder. The reference run goes uninterrupted; each trial is killed (SIGKILL at a seeded random
moment, or just after the second edit is reported), its partial journal is checked to be a
prefix of the reference, and a re-run must reach the reference's head hash and fact path.
Every kill must land while the run is working (it dies by the signal, with a strict prefix of
the reference committed), or the trial would test nothing. One Ctrl-C (SIGTERM) stops after
the current edit, exits 130 (143), and leaves a consistent journal that a re-run completes.

The 21 kill trials run two at a time (`TrialPool`): each is a pair of one-thread subprocesses
that spend most of their life importing torch, and the box has two cores. A run that shares
the box only goes slower, and every kill point is either counted in reported edits or timed
as a fraction of the uninterrupted run, so a slower run is still killed mid-run.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import TINY_HPARAMS, tiny_model

REPO = Path(__file__).resolve().parents[1]

FACTS_CSV = """id,subject,prompt,target_new,target_true
needle,The Space Needle,The Space Needle is located in the city of,Paris,Seattle
eiffel,The Eiffel Tower,The Eiffel Tower is located in the city of,Rome,Paris
ben,Big Ben,Big Ben is located in the city of,Tokyo,London
colosseum,The Colosseum,The Colosseum is located in the city of,Berlin,Rome
darrieux,Danielle Darrieux,The mother tongue of Danielle Darrieux is,Spain,French
rocard,Michel Rocard,Michel Rocard is a native speaker of,London,French
"""
N_FACTS = 6
FACT_IDS = ["needle", "eiffel", "ben", "colosseum", "darrieux", "rocard"]


class Run:
    """One `romebatch apply` subprocess, with its stderr read line by line as it comes."""

    def __init__(self, setup: Setup, journal: Path, home: Path, json_out: bool = False, extra_env=None):
        # Fault injection is armed only through the test's own entry point (tests/fault_cli.py).
        entry = (
            [str(REPO / "tests" / "fault_cli.py")]
            if extra_env and "ROMEBATCH_FAULT" in extra_env
            else ["-m", "romebatch"]
        )
        cmd = [
            sys.executable,
            *entry,
            "apply",
            "facts.csv",
            "--model",
            str(setup.model),
            "--journal",
            str(journal),
            "--hparams",
            "hp.yaml",
        ] + (["--json"] if json_out else [])
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "ROMEBATCH_HOME": str(home),
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
        env.pop("ROMEBATCH_DEBUG", None)
        env.pop("ROMEBATCH_FAULT", None)
        env.update(extra_env or {})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=setup.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.stamped: list[tuple[float, str]] = []  # (monotonic time it was read, line)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.stamped.append((time.monotonic(), line))
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, predicate, count: int = 1, timeout: float = 90) -> bool:
        """Block until `count` stderr lines matched (True) or the process ended first (False)."""
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing matched within {timeout}s: {''.join(self.stderr)}") from None
            if line is None:
                return False
            if predicate(line):
                seen += 1
                if seen >= count:
                    return True

    def wait_for_edits(self, count: int) -> bool:
        return self.wait_for(is_edit_line, count)

    def wait_for_journal_work(self) -> bool:
        """The journal exists and this run starts its own work: it samples the context prefixes."""
        return self.wait_for(lambda line: "context prefixes" in line)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        stdout = self.proc.stdout.read()
        self._reader.join(timeout=10)
        return rc, stdout, "".join(self.stderr)

    def kill(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def is_edit_line(line: str) -> bool:
    return any(line.startswith((f"{fid}: applied", f"{fid}: repaired")) for fid in FACT_IDS)


def facts_in(path) -> int:
    """Distinct facts on a journal path: a repaired fact has more than one edit on it."""
    return len({fact_hash for fact_hash, _ in path})


class Setup:
    def __init__(self, root: Path, tokenizer):
        self.root = root
        self.model = root / "tiny-gpt2"
        tiny_model("gpt2", tokenizer).save_pretrained(self.model)
        tokenizer.save_pretrained(self.model)
        self.work = root / "work"
        self.work.mkdir()
        (self.work / "facts.csv").write_text(FACTS_CSV)
        hp = dict(TINY_HPARAMS)
        hp["prefixes"] = [list(pair) for pair in hp["prefixes"]]
        (self.work / "hp.yaml").write_text(yaml.safe_dump(hp))
        self.home = root / "home"  # shared by every run: the stats cache is computed once, then reused

    def complete(self, journal: Path, home: Path | None = None) -> dict:
        """Run to completion with --json; its summary."""
        rc, stdout, stderr = Run(self, journal, home or self.home, json_out=True).finish()
        assert rc == 0, stderr
        assert "Traceback" not in stderr
        return json.loads(stdout.strip().splitlines()[-1])


def journal_path(directory: Path) -> list[tuple[str, str]] | None:
    """(fact_hash, weight_hash_after) along the head's path, read with plain sqlite3, checking consistency.

    None when the run died before the journal had its tables.
    """
    db_file = directory / "journal.sqlite"
    if not db_file.exists():
        return None
    db = sqlite3.connect(str(db_file))
    try:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "edits" not in names:
            return None
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        head = json.loads(meta.get("head", "0"))
        rows = {
            seq: (parent, status, fact, before, after)
            for seq, parent, status, fact, before, after in db.execute(
                "SELECT seq, parent, status, fact_hash, weight_hash_before, weight_hash_after "
                "FROM edits JOIN edit_status USING (seq)"
            )
        }
    finally:
        db.close()
    chain = []
    seq = head
    while seq:
        assert seq in rows, f"head {head}: edit {seq} is missing"
        chain.append(seq)
        seq = rows[seq][0]
    chain.reverse()
    # A killed run leaves whole edits only: nothing off the path, each built on the one before.
    assert sorted(rows) == sorted(chain), f"edits {sorted(rows)} but the head's path is {chain}"
    for previous, seq in zip([None] + chain, chain):
        parent, status, _, before, _ = rows[seq]
        assert status == "applied"
        if previous is not None:
            assert parent == previous and before == rows[previous][4], f"edit {seq} is not built on {previous}"
    return [(rows[seq][2], rows[seq][4]) for seq in chain]


class Reference:
    """The uninterrupted run (cold stats cache) and when its phases happened."""

    def __init__(self, setup: Setup):
        self.setup = setup
        run = Run(setup, setup.root / "J1", setup.home)
        rc, _, stderr = run.finish()
        assert rc == 0, stderr
        self.seconds = time.monotonic() - run.started
        work = [t for t, line in run.stamped if "context prefixes" in line]
        edits = [t for t, line in run.stamped if is_edit_line(line)]
        self.path = journal_path(setup.root / "J1")
        # The run ends with a repair pass that edits some facts again: kills land in it too.
        assert self.path is not None and facts_in(self.path) == N_FACTS and len(self.path) > N_FACTS
        assert len(work) == 1 and len(edits) == len(self.path), stderr
        self.before_edits = edits[0] - work[0]  # prefixes sampled and stored, key statistics computed
        self.edit_span = edits[-1] - edits[0]  # edits 2..6, the repairs, and their commits


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bytelevel_tokenizer):
    return Reference(Setup(tmp_path_factory.mktemp("crash"), bytelevel_tokenizer))


def kill_and_resume(setup: Setup, expected, journal: Path, home: Path, kill_point) -> list:
    run = Run(setup, journal, home)
    kill_point(run)
    run.kill()
    rc, _, stderr = run.finish()
    # The kill landed while the run was working: it died by the signal, not of its own accord.
    assert rc == -signal.SIGKILL, f"the run had ended (exit {rc}) before the kill: the trial tested nothing"
    partial = journal_path(journal) or []
    # Whatever survived is exactly the start of the uninterrupted run, and not all of it.
    assert partial == expected[: len(partial)]
    assert len(partial) < len(expected), stderr
    summary = setup.complete(journal, home)
    assert summary["already_applied"] == facts_in(partial)
    assert summary["applied"] == N_FACTS - facts_in(partial)
    assert journal_path(journal) == expected
    return partial


TRIALS = ["anywhere-cold-cache", "prefixes-or-stats-cold-cache", "during-edits", "after-two-edits"]


def kill_at_a_phase(reference: Reference, trial: str) -> list:
    """Kill -9 in one phase of the run (TRIALS), resume, and return what the killed run left."""
    setup, expected = reference.setup, reference.path
    rng = random.Random(f"romebatch-crash-{trial}")  # seeded: the same kill points every run
    home = setup.home
    if trial == "anywhere-cold-cache":
        # Anywhere in the run (imports, loading, journal creation, stats, edits).
        delay = rng.uniform(0.5, max(0.8 * reference.seconds, 0.6))  # 0.8: a faster machine still kills mid-run
        home = setup.root / f"home-{trial}"

        def kill_point(run):
            time.sleep(delay)
    elif trial == "prefixes-or-stats-cold-cache":
        # After the journal exists, while the prefixes are sampled or the key statistics computed.
        delay = rng.uniform(0.0, reference.before_edits)
        home = setup.root / f"home-{trial}"

        def kill_point(run):
            assert run.wait_for_journal_work(), "the run ended early"
            time.sleep(delay)
    elif trial == "during-edits":
        delay = rng.uniform(0.0, 0.5 * reference.edit_span)  # half: a faster machine still kills mid-run

        def kill_point(run):
            assert run.wait_for_edits(1), "the run ended early"
            time.sleep(delay)
    else:

        def kill_point(run):
            assert run.wait_for_edits(2), "the run finished before it could be killed"
            time.sleep(0.03)  # inside the third edit, or its commit

    return kill_and_resume(setup, expected, setup.root / f"J-{trial}", home, kill_point)


def kill_inside_a_commit(reference: Reference, commit: int) -> None:
    """SIGKILL after edit `commit`'s row is inserted but before its transaction commits, then resume."""
    setup, expected = reference.setup, reference.path
    journal = setup.root / f"J-commit-{commit}"
    run = Run(setup, journal, setup.home, extra_env={"ROMEBATCH_FAULT": f"commit:{commit}"})
    rc, _, _ = run.finish()
    assert rc == -signal.SIGKILL
    partial = journal_path(journal)
    assert partial == expected[: commit - 1]  # the killed commit left nothing, earlier ones are whole
    summary = setup.complete(journal)
    assert summary["already_applied"] == facts_in(partial)
    assert journal_path(journal) == expected


def kill_at_a_random_moment(reference: Reference, trial: int) -> None:
    """Kill -9 after a seeded number of reported edits and a seeded fraction of an edit, then resume.

    Counted in edits, not seconds, so a machine faster or slower than the reference run's
    cannot move the kill past the end: after edit k (never the last two) and then at most
    half a typical edit's time, at least one edit is still to come.
    """
    setup, expected = reference.setup, reference.path
    rng = random.Random(f"romebatch-random-kill-{trial}")
    after = rng.randint(1, len(expected) - 2)
    delay = rng.uniform(0.0, 0.5 * reference.edit_span / max(1, len(expected) - 1))

    def kill_point(run):
        assert run.wait_for_edits(after), "the run ended before the kill point"
        time.sleep(delay)

    kill_and_resume(setup, expected, setup.root / f"J-random-{trial}", setup.home, kill_point)


# test name -> (its parameter, the trial it runs); these are the tests TrialPool runs ahead.
POOLED = {
    "test_kill_9_then_resume_reaches_the_same_state": ("trial", kill_at_a_phase),
    "test_kill_9_inside_a_journal_commit": ("commit", kill_inside_a_commit),
    "test_kill_9_at_random_moments": ("trial", kill_at_a_random_moment),
}


class TrialPool:
    """This session's selected kill trials, two at a time, started as soon as the reference exists.

    Each test then waits for its own trial, whose failure it re-raises, so every trial is
    still its own pass or fail, and `-k` still runs only what it selects.
    """

    def __init__(self, reference: Reference, items) -> None:
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="crash-trial")
        self.futures: dict[str, Future] = {}
        for item in items:
            pooled = POOLED.get(getattr(item, "originalname", ""))
            if pooled is None or Path(item.path) != Path(__file__):
                continue
            parameter, trial = pooled
            self.futures[item.nodeid] = self.executor.submit(trial, reference, item.callspec.params[parameter])

    def result(self, nodeid: str):
        return self.futures[nodeid].result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def trials(reference, request):
    pool = TrialPool(reference, request.session.items)
    yield pool
    pool.close()


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_9_then_resume_reaches_the_same_state(trials, request, trial):
    partial = trials.result(request.node.nodeid)
    print(f"{trial}: killed with {len(partial)} of {N_FACTS} edits committed")  # shown with -s
    if trial == "after-two-edits":
        assert 2 <= len(partial) < N_FACTS


def test_one_ctrl_c_stops_after_the_current_edit(reference):
    setup, expected = reference.setup, reference.path
    journal = setup.root / "J-sigint"
    run = Run(setup, journal, setup.home)
    assert run.wait_for_edits(1), "the run finished before it could be interrupted"
    run.proc.send_signal(signal.SIGINT)
    rc, _, stderr = run.finish()
    assert rc == 130, stderr  # a script can tell a stopped run from a finished one
    assert "Traceback" not in stderr
    assert "Stopping after the current edit" in stderr
    assert "interrupted" in stderr  # the final report says so
    partial = journal_path(journal)
    assert partial is not None and 1 <= len(partial) < N_FACTS, stderr
    assert partial == expected[: len(partial)]
    reported = [line for line in stderr.splitlines() if is_edit_line(line)]
    assert len(reported) == len(partial)  # every edit it reported is committed, and no more
    summary = setup.complete(journal)
    assert summary["already_applied"] == len(partial) and summary["applied"] == N_FACTS - len(partial)
    assert summary["head"] == len(expected)
    assert journal_path(journal) == expected


@pytest.mark.parametrize("commit", range(1, N_FACTS + 2))
def test_kill_9_inside_a_journal_commit(trials, request, commit):
    """No trace of an edit whose commit was killed; commit 7 is the first repair's (the reference makes one)."""
    trials.result(request.node.nodeid)


RANDOM_TRIALS = 10  # with the 4 + 7 above: 21 kill -9 trials a run


@pytest.mark.parametrize("trial", range(RANDOM_TRIALS))
def test_kill_9_at_random_moments(trials, request, trial):
    """More seeded random kill points across the whole edit phase (warm cache)."""
    trials.result(request.node.nodeid)


def test_the_fault_variable_does_nothing_outside_the_tests(reference):
    """ROMEBATCH_FAULT arms nothing in an ordinary run: only tests/fault_cli.py reads it."""
    setup, expected = reference.setup, reference.path
    journal = setup.root / "J-fault-ignored"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ROMEBATCH_HOME": str(setup.home),
        "OMP_NUM_THREADS": "1",
        "ROMEBATCH_FAULT": "commit:1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "romebatch",
            "apply",
            "facts.csv",
            "--model",
            str(setup.model),
            "--journal",
            str(journal),
            "--hparams",
            "hp.yaml",
        ],
        cwd=setup.work,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert journal_path(journal) == expected


def test_sigterm_stops_after_the_current_edit(reference):
    setup, expected = reference.setup, reference.path
    journal = setup.root / "J-sigterm"
    run = Run(setup, journal, setup.home)
    assert run.wait_for_edits(1), "the run finished before it could be stopped"
    run.proc.send_signal(signal.SIGTERM)
    rc, _, stderr = run.finish()
    assert rc == 143 and "Traceback" not in stderr, stderr
    partial = journal_path(journal)
    assert partial is not None and 1 <= len(partial) < N_FACTS and partial == expected[: len(partial)]
    setup.complete(journal)
    assert journal_path(journal) == expected
