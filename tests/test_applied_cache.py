"""The guard and the probes read applied edits from memory (romebatch/applied_cache.py) and decide as before.

Before, every edit re-read and re-parsed every applied row (O(N) per edit). The reference
here is that old computation, copied from the editor as it was: at every edit the cache's
lists must equal it, and a 60-edit run with the cache must make the same accept / reject
decisions and write the same weight hashes as one that re-reads the journal every time.
"""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch import applied_cache
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact, Neighbor
from romebatch.probes import Thresholds

SUBJECTS = [
    "The Space Needle",
    "The Eiffel Tower",
    "The Colosseum",
    "Big Ben",
    "Danielle Darrieux",
    "Michel Rocard",
    "Toko Yasuda",
    "The quick brown fox",
    "The lazy dog",
    "The river",
]
PROMPTS = [
    ("{} is located in the city of", "Seattle"),
    ("The mother tongue of {} is", "French"),
    ("{} is a native speaker of", "French"),
    ("{} plays the", "guitar"),
    ("{} is in", "Spain"),
    ("Where is {}? It is in", "Tokyo"),
]
TARGETS = ["Paris", "Rome", "London", "Tokyo", "Berlin", "Madrid", "Seattle", "Spain", "French", "Washington"]


def facts(n: int) -> list[Fact]:
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        prompt, true = PROMPTS[(i // len(SUBJECTS)) % len(PROMPTS)]
        target = TARGETS[(i * 7) % len(TARGETS)]
        if target == true:
            target = TARGETS[(i * 7 + 1) % len(TARGETS)]
        out.append(
            Fact(
                id=f"f{i}",
                subject=subject,
                prompt=prompt,
                target_new=target,
                target_true=true,
                neighborhood=[Neighbor(prompt.replace("{}", SUBJECTS[(i + 3) % len(SUBJECTS)], 1), true)],
            )
        )
    return out


def old_norms(journal) -> list[float]:
    return [r["update_norm"] for r in journal.applied_summaries()]


def old_earlier(journal) -> list[dict]:
    # The editor's code before the cache, verbatim.
    return [
        {
            "text": f["prompt"].replace("{}", f["subject"], 1),
            "target_new": f["target_new"],
            "target_true": f.get("target_true"),
            "p_new_after": r["p_new_after"],
        }
        for r in journal.applied_summaries()
        for f in [json.loads(r["fact_json"])]
        if r["p_true_after"] is None or (r["p_new_after"] or 0) > r["p_true_after"]
    ]


HP = {**TINY_HPARAMS, "prefixes": ((3, 1),), "v_steps": 8, "guard_factor": 1.6, "guard_min_edits": 3}


def run(tmp_path, tokenizer, name: str, check_each: bool) -> tuple[list, list]:
    decisions, hashes = [], []
    lm = tiny_loaded("gpt2", tokenizer)
    all_facts = facts(60)
    with Editor(tmp_path / name, lm=lm, hparams=HParams(**HP), log=lambda m: None) as editor:

        def on_edit(row):
            decisions.append((row.fact_id, row.status, row.reason))
            if check_each:
                cache = editor._applied
                assert cache.norms() == sorted(old_norms(editor.journal))
                norms = old_norms(editor.journal)
                if norms:
                    assert cache.median_norm() == statistics.median(norms)
                assert cache.earlier() == old_earlier(editor.journal)

        # A vanishing probe budget: the minimum sample sizes, whatever the wall time (and so the load).
        checks = Thresholds(max_neighborhood_drop=0.0, max_probe_regression=0.3, min_retention=0.9, probe_budget=1e-12)
        editor.apply(all_facts[:35], checks=checks, on_regression="skip", on_edit=on_edit, repair_every=0)
        editor.rollback(steps=3)  # the head moves without a commit: the cache must reload
        decisions.append(("rollback", editor.head, ""))
        editor.apply(all_facts, checks=checks, on_regression="skip", on_edit=on_edit, repair_every=0)
        hashes = [(r.seq, r.parent, r.fact_id, r.weight_hash_after) for r in editor.journal.edits()]
        rejections = [(r["parent"], r["fact_id"], r["reason"]) for r in editor.journal.rejections()]
    return decisions + rejections, hashes


def test_cache_gives_the_old_lists_and_decisions(tmp_path, bytelevel_tokenizer, monkeypatch):
    cached, cached_hashes = run(tmp_path, bytelevel_tokenizer, "cached", check_each=True)
    statuses = [d[1] for d in cached if d[0] != "rollback" and d[1] in ("applied", "rejected")]
    # The run exercises both guards that read the applied edits.
    assert statuses.count("applied") > 10
    assert any("median" in str(d[2]) for d in cached)  # the norm guard refused some
    assert any("regression" in str(d[2]) for d in cached)  # the probes refused some

    # The old behaviour: every read goes to the journal.
    def always_reload(self):
        self.head = None
        return original(self)

    original = applied_cache.AppliedCache._sync
    monkeypatch.setattr(applied_cache.AppliedCache, "_sync", always_reload)
    reread, reread_hashes = run(tmp_path, bytelevel_tokenizer, "reread", check_each=False)
    assert cached == reread
    assert cached_hashes == reread_hashes


def test_median_matches_statistics_median():
    cache = applied_cache.AppliedCache.__new__(applied_cache.AppliedCache)
    for values in ([3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0], [0.1, 0.7, 0.3, 0.9, 0.2]):
        cache._norms = sorted(values)
        cache.head = 0
        cache.journal = type("J", (), {"head": 0})()
        assert cache.median_norm() == statistics.median(values)


@pytest.mark.parametrize("p_new, p_true, kept", [(0.5, 0.2, True), (0.1, 0.2, False), (0.1, None, True)])
def test_earlier_entry_keeps_only_edits_that_took(p_new, p_true, kept):
    row = {
        "fact_json": json.dumps({"prompt": "{} is in", "subject": "Big Ben", "target_new": "Rome"}),
        "p_new_after": p_new,
        "p_true_after": p_true,
        "update_norm": 1.0,
    }
    entry = applied_cache.earlier_entry(row)
    assert (entry is not None) == kept
    if kept:
        assert entry["text"] == "Big Ben is in" and entry["target_true"] is None
