"""benchmarks/sequential.py's reading of a run's journal: where each checkpoint's state is."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_sequential():
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its neighbour bundles.py
    spec = importlib.util.spec_from_file_location("bench_sequential", REPO / "benchmarks" / "sequential.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_checkpoints_state_counts_rejected_facts_and_keeps_the_repairs_after_it():
    sequential = load_sequential()

    class Run:  # edits 1 (a), 2 (b), then c rejected on state 2, 3 repairs a, 4 edits d
        def lineage_facts(self):
            return [(1, "a"), (2, "b"), (3, "a"), (4, "d")]

        def rejections(self):
            return [{"parent": 2, "fact_hash": "c"}]

    assert [sequential.state_after(Run(), k) for k in range(6)] == [0, 1, 2, 3, 4, 4]


def test_retention_reuses_the_checkpoints_scores_and_matches_scoring_alone(bytelevel_tokenizer, monkeypatch):
    from conftest import CITY_FACTS, tiny_loaded

    from romebatch.scores import score_facts, summarize

    sequential = load_sequential()
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    applied = list(CITY_FACTS)
    scored_facts: list[int] = []

    def counting(lm_, facts, *args, **kwargs):
        scored_facts.append(len(facts))
        return score_facts(lm_, facts, *args, **kwargs)

    monkeypatch.setattr(sequential, "score_facts", counting)
    monkeypatch.setattr(sequential, "LONG_RETENTION", (3,))
    row = sequential.score(lm, applied, applied, sample=len(applied), n_retention=2, with_general=False)
    assert scored_facts == [len(applied)]  # the first 2 and the first 3 are read from the one pass
    assert row["retention"] == summarize(score_facts(lm, applied[:2]))["ES"]
    assert row["retention3"] == summarize(score_facts(lm, applied[:3]))["ES"]
    # A sample that leaves out some of the first facts scores those facts on their own.
    scored_facts.clear()
    row = sequential.score(lm, applied, applied, sample=2, n_retention=3, with_general=False)
    assert scored_facts == [2, 3, 3] and row["retention"] == summarize(score_facts(lm, applied[:3]))["ES"]


def test_a_due_checkpoint_waits_for_the_repair_pass_a_stop_left_unfinished(tmp_path, bytelevel_tokenizer, monkeypatch):
    """A run stopped after its last new fact, before that stretch's repair pass ended, resumes
    with a checkpoint due: the pass runs first, so the checkpoint reads the state after it."""
    from conftest import CITY_FACTS, TINY_HPARAMS, tiny_loaded

    from romebatch.editor import Editor, StopRequest
    from romebatch.hparams import HParams
    from romebatch.repair import edits_since_pass

    sequential = load_sequential()
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    monkeypatch.setattr(sequential, "RUNS", tmp_path)
    monkeypatch.setattr(sequential, "METHODS", {"tiny": dict(TINY_HPARAMS)})
    monkeypatch.setattr(sequential, "REPAIRS", {"tiny": 2})
    journal = tmp_path / "seq-tiny-journal"
    facts = list(CITY_FACTS)
    with Editor(journal, lm=lm, hparams=HParams(**TINY_HPARAMS), log=lambda m: None) as editor:
        editor.apply(facts, checks=None, repair_every=None)  # the new facts, and no pass after them
        assert edits_since_pass(editor.journal) == len(facts)
        editor.replay(0, verify=False)  # as sequential.py leaves it: the next opening sees the base weights
    seen = []

    def checkpoint(lm_, editor, name, facts_, k, sample, out, head=None):
        seen.append((k, edits_since_pass(editor.journal), editor.head))

    monkeypatch.setattr(sequential, "checkpoint", checkpoint)
    sequential._run_method(lm, "tiny", facts, len(facts), len(facts), 4, StopRequest(), journal, tmp_path / "o", set())
    assert len(seen) == 1
    k, since_pass, head = seen[0]
    assert k == len(facts) and since_pass == 0  # the pass ended before the checkpoint was read
    passes = [json.loads(line) for line in (tmp_path / "seq-tiny-passes.jsonl").read_text().splitlines()]
    assert len(passes) == 1  # the pass ran in this call, and reported itself
    # A stop asked for while that stretch ran: the half-hour checkpoint is not begun.
    seen.clear()
    stopping = StopRequest()
    stopping.requested = True
    with pytest.raises(SystemExit, match="reads its checkpoint"):
        sequential._run_method(lm, "tiny", facts, len(facts), len(facts), 4, stopping, journal, tmp_path / "o", set())
    assert seen == []


def test_the_unedited_row_extended_from_a_shorter_one_matches_scoring_every_fact(bytelevel_tokenizer, monkeypatch):
    """The base model's reading at k facts, from its row at j < k plus the facts j..k-1 alone,
    equals scoring all k facts in one pass (ES, PS, NS, S and the retentions)."""
    import dataclasses

    from conftest import CITY_FACTS, tiny_loaded

    from romebatch.manifest.validation import Neighbor

    sequential = load_sequential()
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    cities = ["Paris", "Rome", "London", "Tokyo", "Berlin", "Seattle"]
    facts = [
        dataclasses.replace(
            fact,
            id=f"{fact.id}-{round}",
            target_new=cities[(i + round) % 6],
            paraphrases=(f"Where is {fact.subject}? It is in", f"{fact.subject} stands in the city of"),
            neighborhood=tuple(
                Neighbor(f"{other.subject} is located in the city of", other.target_true)
                for other in CITY_FACTS
                if other is not fact
            ),
        )
        for round in range(2)
        for i, fact in enumerate(CITY_FACTS)
    ]
    monkeypatch.setattr(sequential, "LONG_RETENTION", (3, 6))
    whole = sequential.score(lm, facts, facts[:7], sample=7, n_retention=100, with_general=False)
    shorter = sequential.score(lm, facts, facts[:4], sample=4, n_retention=100, with_general=False)
    extended = sequential.extended(lm, facts, 7, [{"edits": 4, **shorter}])
    assert extended is not None
    for key in ("ES", "PS", "NS", "S", "retention", "retention3", "retention6"):
        assert abs(extended[key] - whole[key]) < 1e-9, key
    assert extended["n"] == 7 and extended["GE"] == shorter["GE"]
    # Nothing to extend from (no row on all of a shorter prefix), or a fact without a probe: None.
    assert sequential.extended(lm, facts, 7, [{"edits": 4, **{**shorter, "n": 3}}]) is None
    bare = [*facts[:5], dataclasses.replace(facts[5], neighborhood=()), facts[6]]
    assert sequential.extended(lm, bare, 7, [{"edits": 4, **shorter}]) is None
