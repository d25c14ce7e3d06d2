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
