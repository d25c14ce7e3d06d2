"""benchmarks/sequential.py's reading of a run's journal: where each checkpoint's state is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
