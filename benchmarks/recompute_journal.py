"""Recompute the first N edits of a recorded journal bundle with this checkout's code, in a scratch journal,
and compare every edit's weight_hash_after (issue 21: the refactor must not change what an edit computes).

    python benchmarks/recompute_journal.py N SCRATCH_JOURNAL [BUNDLE]   # default: the first seq-default bundle
"""

import json
import sys
import time
from pathlib import Path

import torch

from romebatch.bundle_read import read_bundle
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import fact_from_dict
from romebatch.model import load_model

N = int(sys.argv[1])
work = Path(sys.argv[2])
torch.manual_seed(0)
b = read_bundle(
    sys.argv[3]
    if len(sys.argv) > 3
    else str(Path(__file__).resolve().parent / "runs" / "seq-default-s5-bundles" / "00001-00090.rbundle")
)
rows = b.edits[:N]
assert [r["seq"] for r in rows] == list(range(1, N + 1)) and all(r["parent"] == r["seq"] - 1 for r in rows)
assert len({r["fact_hash"] for r in rows}) == N, "a repair among the first N edits"
print(
    "recorded probe columns of edit 1:",
    {k: rows[0].get(k) for k in ("neighborhood_drop", "probe_regression", "retention")},
)
facts = [fact_from_dict(json.loads(r["fact_json"])) for r in rows]
hp = HParams.from_dict(b.doc["meta"]["hparams"])
lm = load_model(None)
started = time.perf_counter()
with Editor(work, lm=lm, hparams=hp, create=True, log=print) as editor:
    editor.apply(facts, checks=None, repair_every=0)
    mine = editor.journal.lineage()
print(f"{len(mine)} edits recomputed in {time.perf_counter() - started:.0f} s")
same = [a.weight_hash_after == r["weight_hash_after"] for a, r in zip(mine, rows)]
print(
    f"weight_hash_after equal at {sum(same)} of {len(rows)}; first differing seq: "
    f"{next((i + 1 for i, s in enumerate(same) if not s), None)}"
)
print("head:", mine[-1].weight_hash_after, "recorded:", rows[-1]["weight_hash_after"])
