"""`romebatch report`: per-window scores from the journal, checked against SQL aggregates of the same rows.

A real journal file with 250 synthetic edits in one chain (no model): seeded scores and probe
outcomes, warnings, edits 101-103 re-editing the facts of edits 1-3 (a repair pass that ended
at 103, and refused a fourth repair), and two rejections.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from romebatch import api
from romebatch.cli import app
from romebatch.errors import UserError
from romebatch.journal import DB_NAME, Journal
from romebatch.journal_records import EditRecord
from romebatch.manifest import Fact

N = 250
REFUSED = Fact(id="refused", subject="S4", prompt="{} is", target_new="T4")  # edit 4's fact, refused a repair
PLAIN = Fact(id="plain", subject="New", prompt="{} is", target_new="T")  # an ordinary rejection


@pytest.fixture
def journal(tmp_path):
    """Written only through the journal's own API (commit_edit, record_rejection, set_many)."""
    directory = tmp_path / "J"
    hashes = [f"sha256:{i}" for i in range(1, N + 1)]
    hashes[3] = REFUSED.hash
    hashes[100:103] = hashes[0:3]  # edits 101-103 edit the facts of 1-3 again: repairs
    rng = np.random.default_rng(7)
    with Journal(directory, write=True, create=True) as j:
        j.set_many({"model": "tiny-test-model", "base_hash": "sha256:base", "head": 0})
        for seq in range(1, N + 1):
            if seq == 102:  # the pass refused to repair edit 4's fact, on state 101
                j.record_rejection(REFUSED, 1, "no", 1.0, 0.1)
            if seq == 161:
                j.record_rejection(PLAIN, 1, "no", 1.0, 0.1)
            p_new, p_true = rng.uniform(size=2)
            probed = seq > 50  # the first 50 edits were made without probes
            drop, regression, retention = rng.uniform(size=3).tolist() if probed else (None, None, None)
            j.commit_edit(
                EditRecord(
                    seq=0,
                    parent=seq - 1,
                    fact_id=f"id{seq}",
                    fact_hash=hashes[seq - 1],
                    fact_json=json.dumps(
                        {"id": f"id{seq}", "subject": f"S{seq}", "prompt": "{} is", "target_new": f"T{seq}"}
                    ),
                    layer=1,
                    weight_name="w",
                    lam=rng.normal(size=4),
                    u=rng.normal(size=8),
                    update_norm=float(seq),
                    denominator=0.5,
                    weight_hash_before=f"sha256:{seq - 1}",
                    weight_hash_after=f"sha256:{seq}",
                    p_new_after=float(p_new),
                    p_true_after=float(p_true),
                    neighborhood_drop=drop,
                    probe_regression=regression,
                    retention=retention,
                    warning="regression: x" if seq % 37 == 0 else None,
                )
            )
            if seq == 103:
                j.set_many({"repair_passes": [103]})
    return directory


def sql_windows(directory, every):
    db = sqlite3.connect(directory / DB_NAME)
    return db.execute(f"""
        SELECT MIN(seq), MAX(seq), COUNT(*), 100.0 * AVG(p_new_after > p_true_after), AVG(p_new_after),
               100.0 * (1 - AVG(neighborhood_drop)), 100.0 * AVG(probe_regression), 100.0 * AVG(retention),
               SUM(warning IS NOT NULL)
        FROM edits GROUP BY (seq - 1) / {every} ORDER BY 1""").fetchall()


@pytest.mark.parametrize("every", [100, 30])
def test_windows_match_sql_aggregates_of_the_journal(journal, every):
    report = api.curves(journal, every=every)
    expected = sql_windows(journal, every)
    assert report["edits"] == N and report["every"] == every and len(report["windows"]) == len(expected)
    for w, (start, end, count, es, p_new, ns, probe, retention, warned) in zip(report["windows"], expected):
        assert (w["start"], w["end"], w["edits"], w["warned"]) == (start, end, count, warned)
        assert w["es"] == pytest.approx(es) and w["p_new_after"] == pytest.approx(p_new)
        for key, value in (("ns_kept", ns), ("probe_regression", probe), ("retention", retention)):
            assert w[key] == (None if value is None else pytest.approx(value)), (start, key)
    repairs = {w["start"]: w["repairs"] for w in report["windows"]}
    assert sum(repairs.values()) == 3
    assert sum(w["rejected"] for w in report["windows"]) == 2


def test_the_repair_pass_is_read_from_the_journal(journal):
    (p,) = api.curves(journal)["repair_passes"]
    # It began after edit 100 with 100 facts edited, and found 4 lost: 3 repaired, 1 refused.
    assert p == {"at": 100, "facts": 100, "lost": 4, "held": 96.0}


def test_report_command_draws_the_png_and_prints_the_table(journal, tmp_path):
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["report", "--journal", str(journal), "--out", str(out)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    expected = sql_windows(journal, 100)
    for start, end, _, es, *_ in expected:
        assert f"{start}-{end}" in result.output and f"{es:.1f}" in result.output
    assert "96/100 at 100" in result.output
    data = json.loads(
        CliRunner().invoke(app, ["report", "-j", str(journal), "--json", "--every", "50"]).stdout.splitlines()[-1]
    )
    assert [w["end"] for w in data["windows"]] == [50, 100, 150, 200, 250]


@pytest.mark.parametrize("kwargs, message", [({"every": 0}, "--every 0"), ({"out": "x.jpg"}, "--out x.jpg")])
def test_bad_options(journal, kwargs, message):
    with pytest.raises(UserError, match=message):
        api.curves(journal, **kwargs)
