"""Issue 20's ablation: the default beside each mechanism for long runs, from edit 0.

    python benchmarks/ablation.py --n 40                      # every variant, 40 records each
    python benchmarks/ablation.py --n 40 --variants default,mpes
    python benchmarks/ablation.py --report                    # the table from what is recorded

Every variant applies the same first --n loadable CounterFact records
(../shared/data/counterfact-edit-10k.json) as sequential edits from the base model, as
`romebatch apply` ships them (guards on, repair passes every 100 edits and at the end,
regression probes off as in sequential.py), then scores all of them:

- ES / PS / NS over every edited fact, and NS minus the unedited model's NS on the same facts;
- retention: ES of the first --retention edits, now;
- GE: generation entropy of sequential.py's 10 fixed prompts (one seed: a noisy reading),
  and (a "general" line) GE over 50 prompts x 8 seeds, the accuracy on the known facts whose
  subjects no run edits, and the drift of the edited layer's output on typical keys
  (sequential.general, drift below);
- median Adam steps and median seconds of the first edit of each fact, rejected / failed
  edits, repairs, and how far ‖W‖_F of the edited layer grew over the base.

Variants (VARIANTS below): `default` (romebatch as it shipped until session 18), `mpes`
(most-probable early stopping of v*), `nullspace` (AlphaEdit's sequential form: u ⟂ C's top-64 principal
directions, the earlier edits' keys a soft term in C; the exact form, u ⟂ every earlier key,
runs out of directions once the edits near d_ff = 2,048 and costs O(N²), so it cannot be a
default for 3,000 edits and more: `nullspace-exact` keeps it for comparison), `norm` (the
soft norm bound `norm_penalty`, μ from benchmarks/norm_penalty.py), `all` (the three
together), and `norm-hard` (the hard bound `norm_growth_max`: g from --norm-growth, or half
the growth the default variant reached over the same records).

Also `topk64` and `covariance` (the two halves of `nullspace` apart), `nullspace-256` (a
harder projection) and `mpes-norm` (MPES with the norm penalty: romebatch's default since
session 18, so its 500-record journal goes on as benchmarks/sequential.py's `default` run,
its bundles moved to benchmarks/runs/seq-default-bundles).

Journals go to --work (outside the repository: never commit them); one line per edit and
one per scored variant go to benchmarks/runs/ablation.jsonl, so the same command resumes
where it stopped and re-running a finished variant only re-reads it. A run longer than a
session (every session starts on a fresh machine) takes `--work benchmarks/runs --bundles`:
its journal is then kept in git as bundles (benchmarks/bundles.py) and rebuilt from them.

    python benchmarks/ablation.py --n 500 --checkpoints 100,150,250 --device cuda  # scored on the way too
    python benchmarks/ablation.py --variants mpes-norm --work benchmarks/runs --bundles --deadline 3000

`--checkpoints` also scores each variant when it reaches those numbers of facts (the known
facts and the drift with it; GE over 50 prompts only at --n), `--deadline` stops editing
cleanly after that many seconds. benchmarks/device_run.sh runs it on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bundles  # noqa: E402
from sequential import BEFORE, DATA, FLUENCY_PROMPTS, general, known_accuracy, read_jsonl  # noqa: E402

from romebatch.api import REPAIR_EVERY  # noqa: E402
from romebatch.editor import Editor, StopRequest, stop_on_signals  # noqa: E402
from romebatch.fluency import fluency  # noqa: E402
from romebatch.hparams import HParams  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402

OUT = ROOT / "benchmarks" / "runs" / "ablation.jsonl"
TOP_K = 64  # of Gemma-3-270M's 2,048 key dimensions: a soft null space
NULL_SPACE = {"preserve": "covariance", "preserve_top_k": TOP_K}
NORM_PENALTY = 0.01  # μ, from benchmarks/norm_penalty.py (RESULTS.md, "Issue 20: the soft norm bound")
# Every variant states what `default` meant when it was measured (BEFORE: romebatch's
# defaults until session 18, when mpes-norm became the default), so each one's journal keeps
# resuming and its rows keep their meaning whatever the defaults are now.
VARIANTS = {
    "default": BEFORE,
    "mpes": {**BEFORE, "v_stop_argmax": True},
    "nullspace": {**BEFORE, **NULL_SPACE},
    "norm": {**BEFORE, "norm_penalty": NORM_PENALTY},
    "all": {**BEFORE, **NULL_SPACE, "v_stop_argmax": True, "norm_penalty": NORM_PENALTY},
    "nullspace-exact": {**BEFORE, "preserve": "nullspace", "preserve_top_k": TOP_K},
    "norm-hard": {**BEFORE, "norm_growth_max": "auto"},
    # The two halves of `nullspace` apart, and a harder projection: which one keeps the
    # known facts (the unedited subjects') that the default loses.
    "topk64": {**BEFORE, "preserve_top_k": TOP_K},
    "covariance": {**BEFORE, "preserve": "covariance"},
    "nullspace-256": {**BEFORE, "preserve": "covariance", "preserve_top_k": 256},
    # The candidate from the 150-edit reading on the GPU (RESULTS.md, "Issue 20, session 17"):
    # MPES's fewer steps and the norm penalty's smaller growth, without the covariance term
    # that cost known facts there. romebatch's default in session 18 (since session 19 with
    # the prompt key written in full, which BEFORE turns off).
    "mpes-norm": {**BEFORE, "v_stop_argmax": True, "norm_penalty": NORM_PENALTY},
}
DEFAULT_ORDER = ("default", "mpes", "nullspace", "norm", "all")


def norm_growth(lm, editor: Editor) -> float:
    layer = editor.hparams.layer
    base = float(editor._base(layer).double().norm())
    return float(lm.weight(layer).double().norm()) / base - 1


def resolve_variant(name: str, n: int, growth: float | None) -> dict:
    params = dict(VARIANTS[name])
    if params.get("norm_growth_max") == "auto":
        if growth is None:
            reached = [
                r for r in read_jsonl(OUT) if r.get("kind") == "scored" and r["variant"] == "default" and r["n"] == n
            ]
            if not reached:
                raise SystemExit(f"[{name}] needs --norm-growth, or the default variant scored at n={n} first")
            growth = 0.5 * reached[-1]["norm_growth"]
        params["norm_growth_max"] = round(growth, 6)
    return params


def recorded(kind: str, name: str, n: int) -> bool:
    return any(r.get("kind") == kind and r["variant"] == name and r["n"] == n for r in read_jsonl(OUT))


def drift(lm, editor: Editor) -> float:
    """How far the edited layer's output moved on typical keys, relative to its size:
    ‖(W − W_base) L‖_F / ‖W_base L‖_F with C = L Lᵀ, the RMS over the key statistics' corpus."""
    layer = editor.hparams.layer
    chol = editor.ingredients.stats(layer).cholesky.double().cpu()
    base, now = editor._base(layer).double().cpu(), lm.weight(layer).double().cpu()
    if lm.adapter.conv1d:
        base, now = base.T, now.T
    return float(((now - base) @ chol).norm() / (base @ chol).norm())


def record_general(lm, name: str, n: int, editor: Editor | None = None) -> None:
    """GE over 50 prompts x 8 seeds, the unedited known facts and the drift, at the model's current state."""
    if not recorded("general", name, n):
        write_row(
            {"kind": "general", "variant": name, "n": n, **general(lm), "drift": drift(lm, editor) if editor else 0.0}
        )


def score_row(lm, editor: Editor, facts, name: str, n: int, params: dict, args) -> dict:
    """The scored line of the model as it is now: every fact whose first edit is on the path."""
    path = editor.journal.lineage()
    first = {}
    for record in path:
        first.setdefault(record.fact_hash, record)  # each fact's first edit on the path
    by_hash = {f.hash: f for f in facts}
    applied = [by_hash[h] for h in first if h in by_hash]
    retained = [by_hash[h] for h in list(first)[: args.retention] if h in by_hash]
    return {
        "kind": "scored",
        "variant": name,
        "n": n,
        "of": args.n,  # the run this line was read from: an intermediate checkpoint has n < of
        "hparams": params,
        **summarize(score_facts(lm, applied)),
        "retention": summarize(score_facts(lm, retained))["ES"],
        "GE": fluency(lm, FLUENCY_PROMPTS),
        "applied": len(applied),
        "repairs": len(path) - len(first),
        "rejected": len(editor.journal.rejections()),
        "median_steps": statistics.median(r.v_steps for r in first.values()),
        "mean_steps": statistics.fmean(r.v_steps for r in first.values()),
        "median_seconds": statistics.median(r.seconds_total for r in first.values()),
        "max_update_norm": max(r.update_norm for r in path),
        "norm_growth": norm_growth(lm, editor),
    }


def write_row(row: dict) -> None:
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


def known_row(lm, editor: Editor, name: str, n: int) -> dict:
    """The cheap half of the general line, for checkpoints: the known facts' accuracy and the drift."""
    return {"kind": "known", "variant": name, "n": n, "known": known_accuracy(lm), "drift": drift(lm, editor)}


def run_variant(lm, name: str, facts, args, stop: StopRequest) -> None:
    journal = args.work / f"ablation-{name}-n{args.n}-journal"
    # A run longer than a session: its journal lives as bundles in git (benchmarks/bundles.py).
    with bundles.kept(journal, lm, start=True) if args.bundles else nullcontext():
        _run_variant(lm, name, facts, args, stop, journal)


def _run_variant(lm, name: str, facts, args, stop: StopRequest, journal: Path) -> None:
    if recorded("scored", name, args.n):
        if not recorded("general", name, args.n):  # scored before the general readings existed
            params = resolve_variant(name, args.n, args.norm_growth)
            with Editor(journal, lm=lm, hparams=HParams(**params)) as editor:
                try:
                    record_general(lm, name, args.n, editor)  # opening replayed the model to the head
                finally:
                    editor.replay(0, verify=False)
        return
    params = resolve_variant(name, args.n, args.norm_growth)
    with Editor(journal, lm=lm, hparams=HParams(**params), log=print) as editor:
        try:
            # Checkpoints are read inside the run, right after the fact that reaches them, so
            # a run with checkpoints edits exactly as one without (no extra end-of-run repair).
            edited = {r.fact_hash for r in editor.journal.lineage()}
            by_id = {f.id: f.hash for f in facts}
            due = sorted(c for c in args.checkpoints if c < args.n and not recorded("scored", name, c))
            if len(edited) in args.checkpoints and not recorded("known", name, len(edited)):
                write_row(known_row(lm, editor, name, len(edited)))  # a run stopped at its checkpoint

            def on_edit(row) -> None:
                write_row(
                    {
                        "kind": "edit",
                        "variant": name,
                        "n": args.n,
                        "fact": row.fact_id,
                        "status": row.status,
                        "steps": row.v_steps,
                        "seconds": row.seconds,
                        "norm": row.update_norm,
                        "reason": row.reason[:200],
                    }
                )
                if row.status == "applied":
                    edited.add(by_id.get(row.fact_id))
                while due and len(edited) >= due[0]:
                    checkpoint = due.pop(0)
                    scored = score_row(lm, editor, facts, name, checkpoint, params, args)
                    write_row(scored)
                    write_row(known_row(lm, editor, name, checkpoint))
                    print(json.dumps(scored), flush=True)

            started = time.perf_counter()
            result = editor.apply(facts, checks=None, stop=stop, repair_every=REPAIR_EVERY, on_edit=on_edit)
            print(
                f"[{name}] {result.count('applied')} applied, {result.count('repaired')} repaired, "
                f"{result.count('rejected')} rejected, {result.count('failed')} failed in "
                f"{time.perf_counter() - started:.0f}s",
                flush=True,
            )
            if stop or editor.pending(facts):
                raise SystemExit(f"[{name}] stopped; the same command resumes")
            row = score_row(lm, editor, facts, name, args.n, params, args)
            write_row(row)
            print(json.dumps(row), flush=True)
            record_general(lm, name, args.n, editor)
        finally:
            editor.replay(0, verify=False)  # the next variant starts from the base weights


@contextmanager
def only_one_at_a_time(path: Path):
    """An exclusive lock beside `path`: queues started together (one per core) read the
    unedited model once, the second waiting for the first's rows instead of repeating its
    ~20-minute general reading."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # closing the file releases it
        yield


def unedited(lm, facts, n: int, general_line: bool = True) -> None:
    with only_one_at_a_time(OUT):
        _unedited(lm, facts, n, general_line)


def _unedited(lm, facts, n: int, general_line: bool) -> None:
    if not recorded("scored", "unedited", n):
        # GE does not depend on n for the unedited model: read once, reused for every n.
        earlier = [r["GE"] for r in read_jsonl(OUT) if r.get("kind") == "scored" and r["variant"] == "unedited"]
        ge = earlier[0] if earlier else fluency(lm, FLUENCY_PROMPTS)
        write_row({"kind": "scored", "variant": "unedited", "n": n, **summarize(score_facts(lm, facts)), "GE": ge})
    if general_line:
        record_general(lm, "unedited", n)


def progress(every: list[dict]) -> None:
    """Variants still editing: their edits so far, compared on the facts every one has reached."""
    edits: dict[str, dict[str, dict]] = {}
    for r in every:
        if r.get("kind") == "edit" and r["status"] == "applied":
            edits.setdefault(r["variant"], {}).setdefault(r["fact"], r)  # a fact's first edit
    if not edits:
        return
    common = set.intersection(*(set(e) for e in edits.values()))
    print(f"\nedits so far; steps and seconds over the {len(common)} facts every variant has edited:")
    print("| variant | facts edited | mean steps | median steps | median s/edit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, by_fact in edits.items():
        rows = [by_fact[f] for f in common]
        print(
            f"| {name} | {len(by_fact)} | {statistics.fmean(r['steps'] for r in rows):.1f} "
            f"| {statistics.median(r['steps'] for r in rows):g} | {statistics.median(r['seconds'] for r in rows):.1f} |"
        )


def report(n: int | None) -> None:
    every = read_jsonl(OUT)
    progress(every)
    rows = [r for r in every if r.get("kind") == "scored" and (n is None or r["n"] == n)]
    extra = {(r["variant"], r["n"]): r for r in every if r.get("kind") == "general"}
    cheap = {(r["variant"], r["n"]): r for r in every if r.get("kind") == "known"}
    base = {r["n"]: r for r in rows if r["variant"] == "unedited"}
    print(
        "| variant | n | ES | PS | NS | NS − unedited | retention | GE (10 prompts) | GE (50 × 8 seeds) | known facts "
        "| drift | median steps | mean steps | median s/edit | repairs | rejected | max ‖ΔW‖ | ‖W‖ growth |"
    )
    print("| --- |" + " ---: |" * 17)
    for r in rows:
        g = extra.get((r["variant"], r["n"]))
        ge50 = f"{g['GE50']:.1f} ± {g['GE50_sd']:.1f}" if g else "-"
        k = g or cheap.get((r["variant"], r["n"]))  # a checkpoint has the known facts and drift alone
        known = f"{k['known']:.1f}" if k else "-"
        drifted = f"{k['drift']:.3f}" if k else "-"
        if r["variant"] == "unedited":
            print(
                f"| unedited | {r['n']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | - | - | {r['GE']:.1f} "
                f"| {ge50} | {known} | - | - | - | - | - | - | - | - |"
            )
            continue
        ns = f"{r['NS'] - base[r['n']]['NS']:+.1f}" if r["n"] in base else "-"
        print(
            f"| {r['variant']} | {r['n']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {ns} "
            f"| {r['retention']:.1f} | {r['GE']:.1f} | {ge50} | {known} | {drifted} | {r['median_steps']:g} "
            f"| {r['mean_steps']:.1f} | {r['median_seconds']:.1f} | {r['repairs']} | {r['rejected']} "
            f"| {r['max_update_norm']:.3f} | {100 * r['norm_growth']:.2f}% |"
        )


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="CounterFact records, edited from 0 by every variant")
    ap.add_argument("--variants", default=",".join(DEFAULT_ORDER), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--retention", type=int, default=100, help="retention reads the first this many edits")
    ap.add_argument("--norm-growth", type=float, default=None, help="g of the norm variants (default: auto)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/romebatch-ablation"), help="journals (never commit)")
    ap.add_argument("--out", type=Path, default=Path(OUT), help="the resumable jsonl")
    ap.add_argument(
        "--checkpoints", default="", help="also score at these numbers of facts, e.g. 250 (no general line)"
    )
    ap.add_argument("--deadline", type=float, default=None, help="stop editing cleanly after this many seconds")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 on either)")
    ap.add_argument("--bundles", action="store_true", help="keep each journal as bundles beside it (a --work in git)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    args.checkpoints = [int(c) for c in args.checkpoints.split(",") if c]
    OUT = args.out
    if args.report:
        return report(None)
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lm = load_model(device=args.device)
    facts = load_manifest(DATA, skip_invalid=True).facts[: args.n]
    unedited(lm, facts, args.n)
    for checkpoint in args.checkpoints:
        unedited(lm, facts[:checkpoint], checkpoint, general_line=False)
    stop = StopRequest()
    if args.deadline is not None:
        # Like a SIGTERM at the deadline: the edit in progress finishes and is journaled.
        timer = threading.Timer(args.deadline, lambda: setattr(stop, "requested", True))
        timer.daemon = True
        timer.start()
    with stop_on_signals(stop, print):
        for name in names:
            run_variant(lm, name, facts, args, stop)
    report(args.n)


if __name__ == "__main__":
    main()
