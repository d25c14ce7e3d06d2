"""Thousands of sequential edits: plain ROME beside each sequential-stability method.

    python benchmarks/sequential.py --n 1000                  # all methods, checkpoints every 100
    python benchmarks/sequential.py --n 3000 --methods covariance,none
    python benchmarks/sequential.py --report                  # table and plot from what is recorded

Each method's run is a romebatch journal (benchmarks/runs/seq-<method>-journal) and each
checkpoint a line of benchmarks/runs/seq-<method>.jsonl, so killing the command loses at
most the edit in flight: the same command resumes every run where it stopped. Journals are
not tracked in git; the default run's is kept as bundles (benchmarks/bundles.py), from
which it is rebuilt before it resumes (`--bundles` starts them for a run that has none, and a
stopped run packs its new edits before it exits). Methods
advance in turns of one checkpoint interval, so an interrupted session leaves all of them
at comparable depths.

Methods (METHODS below): `default` (romebatch as it ships; `default-s5` the default of
sessions 5-17, without MPES and the norm penalty), plain ROME (`none`) and the
other `--preserve` methods, `window` (`--spread-layers 3`),
and variants of plain ROME that test what benchmarks/leak.py found drives NS down over many
edits: a smaller write (`clamp0.75`), key statistics from CounterFact-style text held out
from what is scored (`domain`), and both (`domain-clamp0.75`).

At every checkpoint (after k edits; records --start..--start+k of
../shared/data/counterfact-edit-10k.json):

- ES / PS / NS / S over the applied facts (all of them up to --sample, else an evenly
  spaced sample of that many, always including the latest ones);
- retention: ES of the first 100 edits, now;
- GE: generation entropy of 10 fixed prompts' samples (the paper's fluency);
- disabling edits: edits rejected by the collapse guard, and the largest update norm.

The unedited model's row is the same scores on the same facts. Edits run with the
regression probes off (the guards stay on): this measures the editing method.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import harmonic_mean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bundles  # noqa: E402

from romebatch.api import REPAIR_EVERY  # noqa: E402
from romebatch.editor import Editor, StopRequest, stop_on_signals  # noqa: E402
from romebatch.fluency import fluency  # noqa: E402
from romebatch.hparams import HParams  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.repair import edits_since_pass, pending_plan  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"
# Outside the project (the data is read from ../shared, never copied in), at a fixed path
# because the journal's hparams record it; rebuilt byte-identically when missing.
DOMAIN = Path(tempfile.gettempdir()) / "romebatch-bench" / "counterfact-text-8000-10000.jsonl"
RUNS = ROOT / "benchmarks" / "runs"
# The configuration every method of sessions 1-3 was measured with (layer 1, clamp 1.5, C
# from 10k tokens sampled plainly from <bos>), pinned so a change of romebatch's defaults
# never changes a baseline or stops its journal from resuming.
# No sequential-stability mechanism: what every method below but `default` was measured without.
# (v_stop_beats_true only matters with MPES on; stated because journals record it.)
BEFORE = {"v_stop_argmax": False, "norm_penalty": 0.0, "write_prompt_key": False, "v_stop_beats_true": False}
PLAIN = {**BEFORE, "preserve": "none", "clamp_norm_factor": 1.5, "stats_tokens": 10_000, "stats_sampling": "plain"}
METHODS = {
    # romebatch as it ships: HParams() resolved for the model (see romebatch/hparams.py):
    # since session 19, MPES, the norm penalty and the prompt key written in full. Begun from
    # edit 0 in session 19.
    "default": {},
    # The default with each δ cut to 1.25 times the smallest share of it that still takes
    # (`v_shrink`): smaller writes, in the hope of less drift. Session 19 stopped it at 100
    # edits: MPES's δ is already nearly the smallest along its direction (RESULTS.md).
    "shrink": {"v_shrink": 1.25},
    # The default one layer deeper. At layer 1 a subject's last-token key is mostly that
    # token, so an edit also rewrites other subjects that end in it: known facts whose subject
    # ends in an edited subject's last token lost 22 points by 329 edits, the rest ~5
    # (benchmarks/known_loss.py, RESULTS.md "Issue 20, session 20"). Layer 2 holds them less:
    # at 100 edits it had lost 5.2 points of them and 6 of NS, where layer 1 had lost none
    # and 1. Stopped there.
    "layer2": {"layer": 2},
    # The session-18 default (MPES and the norm penalty, u from k* alone). Its first 500
    # edits are benchmarks/ablation.py's mpes-norm run (its journal, restored from bundles).
    "default-s18": {"write_prompt_key": False},
    # The session-5..17 default: clamp 0.5 and encyclopedic C (its journal began as
    # "default-clamp0.5", and was this file's `default` to 1,950 edits).
    "default-s5": BEFORE,
    # The session-4 default, clamp 0.75 (NS 8.5 below unedited by 400 edits; stopped at 422).
    "default-s4": {**BEFORE, "clamp_norm_factor": 0.75},
    "none": PLAIN,  # plain sequential ROME
    "covariance": {**PLAIN, "preserve": "covariance"},
    "nullspace": {**PLAIN, "preserve": "nullspace"},
    "window": {**PLAIN, "spread_layers": 3},
    # Smaller writes: every edit leaks a fixed fraction of its write ‖v* − W k*‖ into all
    # other tokens' MLP outputs (RESULTS.md, "Where sequential edits leak"), so the leak
    # accumulated over N edits scales with the write. Plain ROME with a tighter clamp on δ:
    "clamp0.75": {**PLAIN, "clamp_norm_factor": 0.75},
    # Key statistics from text like the prompts: the self-sampled corpus under-represents
    # relation words (" native speaker of"), so u = C⁻¹k* leaks into them cheaply by C's
    # account and expensively on CounterFact text. See domain_corpus().
    "domain": {**PLAIN, "stats_corpus": str(DOMAIN), "stats_tokens": 60_000},
    # Both: the smaller write and the better-placed u (their drifts at 100 edits were 0.21
    # and 0.29 of the layer's output RMS, against 0.45 for plain ROME).
    "domain-clamp0.75": {**PLAIN, "stats_corpus": str(DOMAIN), "stats_tokens": 60_000, "clamp_norm_factor": 0.75},
    # The default with the earlier edits' keys protected: retention and ES fall as later
    # edits overwrite earlier ones, and a smaller write shrinks an edit's margin and its leak
    # alike, so the clamp alone cannot hold them (at 500 edits: ES 93.5, retention 88).
    "default-covariance": {**BEFORE, "preserve": "covariance"},
}
# Repair passes (romebatch/repair.py) are part of `romebatch apply` as it ships since
# session 6: every REPAIR_EVERY edits, facts that no longer hold are edited again. Only the
# defaults run them; `default-s5`'s journal ran without them up to edit 602, so its first
# pass, at 602, repaired what those edits had lost.
REPAIRS = {"default": REPAIR_EVERY, "shrink": REPAIR_EVERY, "default-s18": REPAIR_EVERY, "default-s5": REPAIR_EVERY}
FLUENCY_PROMPTS = [
    "The city of",
    "My favourite food is",
    "In 1990, the",
    "The best way to learn",
    "She walked into the room and",
    "Scientists have discovered",
    "The river flows",
    "Yesterday I",
    "The history of music",
    "A good friend",
]


KNOWN = ROOT.parent / "shared" / "data" / "known_1000.json"
GE_SEEDS = range(8)


def unedited_known_facts() -> list[dict]:
    """The known facts (ROME's known_1000) whose subject is no CounterFact record's subject:
    none of them is edited by any run here, up to all 10,000 records, so the set is fixed."""
    edited = {r["subject"] for r in json.loads(DATA.read_text())}
    return [k for k in json.loads(KNOWN.read_text()) if k["subject"] not in edited]


def general_prompts(known: list[dict], n: int = 50) -> list[str]:
    """GE's prompts: n of the unedited known facts' prompts, evenly spaced (text about unedited subjects)."""
    return [known[i * len(known) // n]["prompt"] for i in range(n)]


def general(lm) -> dict:
    """What the edits do not target: GE over 50 prompts x 8 seeds, and the known facts' accuracy.

    GE50 is the mean over seeds of each seed's GE (one batch of the 50 prompts a seed);
    GE50_sd their spread. `known` is zsRE's token accuracy of the true attribute after
    each unedited known fact's prompt, in percent."""
    from statistics import fmean, stdev

    from romebatch.fluency import fluency_seeds

    known = unedited_known_facts()
    per_seed = fluency_seeds(lm, general_prompts(known), GE_SEEDS)
    return {
        "GE50": fmean(per_seed),
        "GE50_sd": stdev(per_seed),
        "known": known_accuracy(lm, known),
        "known_n": len(known),
    }


def known_accuracy(lm, known: list[dict] | None = None) -> float:
    """zsRE's token accuracy of the true attribute after each unedited known fact's prompt, in percent."""
    from statistics import fmean

    from romebatch.zsre_scores import token_accuracy

    known = unedited_known_facts() if known is None else known
    return 100 * fmean(token_accuracy(lm, [(k["prompt"], k["attribute"]) for k in known]))


GENERAL_KEYS = ("GE50", "GE50_sd", "known", "known_n")


def domain_corpus(first: int = 8000, evaluated: int = 3000) -> Path:
    """CounterFact-style text for the `domain` method's C, disjoint from what is scored.

    The edit prompts (true object appended), paraphrases and neighbourhood
    prompts of records `first`..end, leaving out any record whose subject appears in, and any
    sentence that contains, a neighbourhood prompt of the first `evaluated` records (the
    runs here edit and score at most those).
    """
    if DOMAIN.exists():
        return DOMAIN
    records = json.loads(DATA.read_text())
    scored = {r["locality_prompt"] for r in records[:evaluated]}
    lines = []
    for r in records[first:]:
        if any(r["subject"] in p for p in scored):
            continue
        texts = [
            r["prompt"] + " " + r["ground_truth"],
            r["rephrase_prompt"],
            r["locality_prompt"] + " " + r["locality_ground_truth"],
        ]
        lines += [json.dumps({"text": t}) for t in texts if not any(p in t for p in scored)]
    DOMAIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOMAIN.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(DOMAIN)
    return DOMAIN


def sample_indices(k: int, size: int) -> list[int]:
    """All of 0..k-1 up to `size`, else an even spread that always includes the newest."""
    if k <= size:
        return list(range(k))
    step = k / size
    return sorted({min(k - 1, round(i * step)) for i in range(size - 1)} | {k - 1})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# Set from the command line (main): the extra readings every checkpoint takes.
GENERAL = False  # --general: GE over 50 prompts x 8 seeds and the known facts (`general`)
GENERAL_EVERY = 0  # --general-every 500: that reading only at checkpoints that are multiples of it
KNOWN_EVERY = 0  # --known-every 100: the known facts' accuracy alone (no GE50) at multiples of it
LONG_RETENTION: tuple[int, ...] = ()  # --retention-also 1000: ES of the first 1,000 edits too
KEEP_BUNDLES = False  # --bundles: keep every run's journal as bundles, also one that has none yet


def score(lm, facts, applied: list, sample: int, n_retention: int = 100, with_general: bool | None = None) -> dict:
    """The checkpoint's readings; `with_general` (default: --general) adds `general`."""
    indices = sample_indices(len(applied), sample)
    scored = dict(zip(indices, score_facts(lm, [applied[i] for i in indices])))
    row = {**summarize(list(scored.values()))}
    row["retention"] = retention(lm, applied, n_retention, scored)  # None (no ES) with nothing applied
    for n in LONG_RETENTION:
        if len(applied) >= n:
            row[f"retention{n}"] = retention(lm, applied, n, scored)
    row["GE"] = fluency(lm, FLUENCY_PROMPTS)
    if GENERAL if with_general is None else with_general:
        row.update(general(lm))
    return row


def extended(lm, facts, k: int, rows: list[dict]) -> dict | None:
    """The unedited model's reading on the first k facts, from its deepest row on all of a
    shorter prefix and scores of the facts after it: the base model does not change, so at
    2,000 facts this scores the 500 after the 1,500-fact row instead of all 2,000. None when
    no row covers a prefix, or a fact lacks a probe (then the means' counts would differ from n).
    """
    earlier = [r for r in rows if r.get("n") == r["edits"] < k and "ES" in r]
    probes = all(f.target_true is not None and f.paraphrases and f.neighborhood for f in facts[:k])
    if not earlier or not probes:
        return None
    base = max(earlier, key=lambda r: r["edits"])
    j = base["edits"]
    new = score_facts(lm, facts[j:k])
    totals = {  # successes in percent, summed over facts
        "ES": [base["ES"] * j, *(100.0 * s.efficacy for s in new)],
        "PS": [base["PS"] * j, *(100.0 * s.paraphrase_success for s in new)],
        "NS": [base["NS"] * j, *(100.0 * s.neighborhood_success for s in new)],
    }
    row = {key: sum(parts) / k for key, parts in totals.items()}
    row["S"] = harmonic_mean(list(row.values())) if all(row.values()) else 0.0
    row["n"] = k
    for n, key in [(min(100, k), "retention"), *((n, f"retention{n}") for n in LONG_RETENTION if n <= k)]:
        if n <= j:
            if key not in base:
                return None  # the first n of the base row's j were not read on their own
            row[key] = base[key]
        else:  # the first n: all j of the base row, then the new facts up to n
            row[key] = (base["ES"] * j + sum(100.0 * s.efficacy for s in new[: n - j])) / n
    row["GE"] = base["GE"]
    return row


def retention(lm, applied: list, n: int, scored: dict) -> float | None:
    """ES of the first `n` facts applied, read from `scored` (index -> scores) when the sample
    holds all of them: a checkpoint that scores every fact edited so far scores none twice
    (the first 1,000 of 1,500 were a second pass of 2,600 fact scorings before)."""
    first = range(min(n, len(applied)))
    if all(i in scored for i in first):
        return summarize([scored[i] for i in first])["ES"]
    return summarize(score_facts(lm, applied[: len(first)]))["ES"]


def run_method(lm, name: str, facts, upto: int, every: int, sample: int, stop: StopRequest) -> None:
    """Advance one method by one checkpoint interval (or record a checkpoint a crash skipped)."""
    out = RUNS / f"seq-{name}.jsonl"
    done = {r["edits"] for r in read_jsonl(out)}
    journal = RUNS / f"seq-{name}-journal"
    with bundles.kept(journal, lm, start=KEEP_BUNDLES):  # a run kept as bundles in git, if it has them
        _run_method(lm, name, facts, upto, every, sample, stop, journal, out, done)


def _run_method(lm, name, facts, upto, every, sample, stop, journal: Path, out: Path, done: set) -> None:
    with Editor(journal, lm=lm, hparams=HParams(**METHODS[name]), log=print) as editor:
        try:
            pending = editor.pending(facts[:upto])
            processed = upto - len(pending)  # facts applied or rejected: a prefix of the list
            due = processed and processed not in done and (processed % every == 0 or processed == upto)
            unfinished = pass_unfinished(editor.journal, REPAIRS.get(name))
            if not due or unfinished:
                if processed >= upto and not unfinished:
                    return
                # A checkpoint reads the state after its repair pass: finish a pass a stop cut short first.
                target = processed if due else min(upto, (processed // every + 1) * every)
                started = time.perf_counter()
                result = editor.apply(facts[:target], checks=None, stop=stop, repair_every=REPAIRS.get(name))
                if result.repair_passes:  # what each repair pass bought
                    with (RUNS / f"seq-{name}-passes.jsonl").open("a") as f:
                        f.writelines(json.dumps(p.to_dict()) + "\n" for p in result.repair_passes)
                reached = upto - len(editor.pending(facts[:upto]))
                print(
                    f"[{name}] {reached - processed} edits in {time.perf_counter() - started:.0f}s "
                    f"({result.count('rejected')} rejected, {result.count('repaired')} repaired); "
                    f"head {editor.head}",
                    flush=True,
                )
                if reached < target or result.interrupted:  # Ctrl-C / SIGTERM, in the edits or their pass
                    raise SystemExit(f"[{name}] stopped at {reached} edits; the same command resumes")
                processed = target
            if stop:  # asked to stop as the stretch ended: not a half-hour checkpoint first
                raise SystemExit(f"[{name}] stopped at {processed} edits; the same command reads its checkpoint")
            checkpoint(lm, editor, name, facts, processed, sample, out)
        finally:
            editor.replay(0, verify=False)  # the next method starts from the base weights


def pass_unfinished(journal, repair_every: int | None) -> bool:
    """The run repairs, and a stop came after its last new fact but before its pass ended:
    `apply` over the same facts finishes that pass (a journaled plan, or one never begun)."""
    return bool(repair_every) and (pending_plan(journal) is not None or edits_since_pass(journal) > 0)


def state_after(journal, k: int) -> int:
    """The seq of the state in which the head's run had processed (applied or rejected) its
    first k facts, the repairs that followed the k-th included: a checkpoint's state."""
    rejected_after: dict[int, list[str]] = {}  # a rejection leaves the head where it was
    for r in journal.rejections():
        rejected_after.setdefault(r["parent"], []).append(r["fact_hash"])
    events = [(0, h) for h in rejected_after.get(0, [])]
    for seq, fact_hash in journal.lineage_facts():
        events += [(seq, fact_hash)] + [(seq, h) for h in rejected_after.get(seq, [])]
    seen: set[str] = set()
    state = 0
    for seq, fact_hash in events:
        if fact_hash not in seen:
            if len(seen) >= k:
                return state  # the (k+1)-th fact begins here
            seen.add(fact_hash)
        state = seq
    return state  # k reaches past the run: its head


def backfill(lm, name: str, facts, every: int, sample: int) -> None:
    """Read the checkpoints below a run's depth that it never recorded (a run begun by another
    script: the default's first 500 edits are benchmarks/ablation.py's candidate run), each
    at the state the run was in then, replayed from the journal."""
    out = RUNS / f"seq-{name}.jsonl"
    done = {r["edits"] for r in read_jsonl(out)}
    journal = RUNS / f"seq-{name}-journal"
    bundles.restore(journal, lm)
    with Editor(journal, lm=lm, hparams=HParams(**METHODS[name]), log=print) as editor:
        try:
            processed = len(facts) - len(editor.pending(facts))
            for k in range(every, processed, every):
                if k not in done:
                    state = state_after(editor.journal, k)
                    editor.replay(state, verify=False)
                    checkpoint(lm, editor, name, facts, k, sample, out, head=state)
        finally:
            editor.replay(0, verify=False)


def checkpoint(lm, editor, name, facts, k, sample, out: Path, head: int | None = None) -> None:
    """Score the model as it is now, which is state `head` (default: the journal's head)."""
    by_hash = {f.hash: f for f in facts}
    path = editor.journal.lineage(head)
    # In the order first edited; a repaired fact has more than one edit on the path.
    applied = [by_hash[h] for h in dict.fromkeys(r.fact_hash for r in path) if h in by_hash]
    on_path = {0, *(r.seq for r in path)}
    rejections = [r for r in editor.journal.rejections() if r["parent"] in on_path]
    seconds = sorted(r.seconds_total for r in path if r.seconds_total)
    t = time.perf_counter()
    row = {
        "method": name,
        "edits": k,
        "applied": len(applied),
        "repairs": len(path) - len(applied),
        "rejected": len(rejections),
        "collapse_rejections": sum(r["reason"].startswith("collapse") for r in rejections),
        "max_update_norm": max((r.update_norm for r in path), default=0.0),
        "median_seconds": seconds[len(seconds) // 2] if seconds else None,
        **score(lm, facts, applied, sample, with_general=GENERAL or bool(GENERAL_EVERY and k % GENERAL_EVERY == 0)),
    }
    if "known" not in row and KNOWN_EVERY and k % KNOWN_EVERY == 0:
        row["known"] = known_accuracy(lm)
    row["score_seconds"] = time.perf_counter() - t
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"[{name}] checkpoint {k}: "
        + " ".join(
            f"{key} {row[key]:.1f}" for key in ("ES", "PS", "NS", "S", "retention", "GE") if row.get(key) is not None
        ),
        flush=True,
    )


def unedited(lm, facts, upto: int, every: int, sample: int) -> None:
    out = RUNS / "seq-unedited.jsonl"
    # A depth is done when scored on as many facts as the runs now score there (rows from
    # --sample 200 do not pair with a run scored on all its facts); report reads the last row.
    done = {(r["edits"], r.get("n")) for r in read_jsonl(out)}
    for k in list(range(every, upto + 1, every)) + ([upto] if upto % every else []):
        if (k, min(k, sample)) in done:
            continue
        # The base model's general reading does not vary with k: taken once, then copied.
        row = {"method": "unedited", "edits": k}
        row.update(extended(lm, facts, k, read_jsonl(out)) or score(lm, facts, facts[:k], sample, with_general=False))
        if GENERAL or GENERAL_EVERY:
            earlier = [r for r in read_jsonl(out) if "GE50" in r]
            row.update({key: earlier[0][key] for key in GENERAL_KEYS} if earlier else general(lm))
        elif KNOWN_EVERY:
            earlier = [r for r in read_jsonl(out) if "known" in r]
            row["known"] = earlier[0]["known"] if earlier else known_accuracy(lm)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def report(methods: list[str]) -> None:
    # One row per (method, edits): two processes running different methods may both have
    # scored the unedited model at the same checkpoint.
    rows = {
        m: sorted({r["edits"]: r for r in read_jsonl(RUNS / f"seq-{m}.jsonl")}.values(), key=lambda r: r["edits"])
        for m in ["unedited", *methods]
    }
    keys = ("ES", "PS", "NS", "S", "retention", "GE")
    print(
        f"{'method':<12} {'edits':>6} "
        + " ".join(f"{k:>9}" for k in keys)
        + f" {'rejected':>8} {'repairs':>7} {'max ‖ΔW‖':>9} {'s/edit':>7}"
    )
    for m, recs in rows.items():
        for r in recs:
            print(
                f"{m:<12} {r['edits']:>6} "
                + " ".join(f"{r[k]:>9.1f}" if r.get(k) is not None else f"{'-':>9}" for k in keys)
                + (
                    f" {r['rejected']:>8} {r.get('repairs', 0):>7} {r['max_update_norm']:>9.3f} {r['median_seconds']:>7.1f}"
                    if "rejected" in r
                    else ""
                )
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 6, figsize=(24, 3.6))
    # The same method in the same colour on every panel (the cycle has ten; an eleventh is black).
    colour = {m: f"C{i}" if i < 10 else "black" for i, m in enumerate(rows)}
    for ax, key in zip(axes, ("ES", "PS", "NS", "retention", "GE")):
        for m, recs in rows.items():
            if recs:
                ax.plot(
                    [r["edits"] for r in recs],
                    [r[key] for r in recs],
                    marker="o",
                    label=m,
                    color=colour[m],
                    linestyle="--" if m == "unedited" else "-",
                )
        ax.set_title(key)
        ax.set_xlabel("sequential edits")
    # Each checkpoint scores a different sample of facts, so the unedited NS moves (73-83):
    # what the target reads is the paired difference at the same checkpoint.
    base = {r["edits"]: r["NS"] for r in rows["unedited"]}
    for m in methods:
        recs = [r for r in rows[m] if r["edits"] in base]
        if recs:
            axes[5].plot(
                [r["edits"] for r in recs],
                [r["NS"] - base[r["edits"]] for r in recs],
                marker="o",
                color=colour[m],
                label=m,
            )
    axes[5].axhline(-8, color="grey", linestyle=":")
    axes[5].set_title("NS − unedited NS (target ≥ −8)")
    axes[5].set_xlabel("sequential edits")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    target = RUNS.parent / "sequential.png" if RUNS == ROOT / "benchmarks" / "runs" else RUNS / "sequential.png"
    fig.savefig(target, dpi=90)
    print(f"plot: {target}")


def main() -> None:
    global RUNS, GENERAL, GENERAL_EVERY, KNOWN_EVERY, LONG_RETENTION, KEEP_BUNDLES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="edits per method")
    ap.add_argument("--every", type=int, default=100, help="checkpoint interval")
    ap.add_argument("--sample", type=int, default=200, help="facts scored per checkpoint")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="only print the table and write the plot")
    ap.add_argument("--runs", type=Path, default=RUNS, help="where journals and checkpoints go")
    ap.add_argument("--general", action="store_true", help="GE over 50 prompts x 8 seeds, and known-facts accuracy")
    ap.add_argument(
        "--general-every", type=int, default=0, help="the --general reading only at multiples of this many edits"
    )
    ap.add_argument(
        "--known-every", type=int, default=0, help="the known facts' accuracy alone at multiples of this many edits"
    )
    ap.add_argument("--retention-also", default="", help="e.g. 1000: ES of the first 1,000 edits at each checkpoint")
    ap.add_argument("--bundles", action="store_true", help="keep the journals as bundles in git, from the first edit")
    ap.add_argument("--backfill", action="store_true", help="only read the checkpoints a run skipped, then stop")
    args = ap.parse_args()
    # Runs last hours with their output sent to a log file: each line there as it is printed.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    RUNS = args.runs
    KEEP_BUNDLES = args.bundles
    GENERAL = args.general
    GENERAL_EVERY = args.general_every
    KNOWN_EVERY = args.known_every
    LONG_RETENTION = tuple(int(n) for n in args.retention_also.split(",") if n)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.report:
        return report(methods)
    RUNS.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if any(METHODS[m].get("stats_corpus") == str(DOMAIN) for m in methods):
        domain_corpus()
    lm = load_model()
    facts = load_manifest(DATA, skip_invalid=True).facts[args.start : args.start + args.n]
    stop = StopRequest()  # Ctrl-C / SIGTERM: finish the edit in flight, then exit
    if args.backfill:
        for name in methods:
            backfill(lm, name, facts, args.every, args.sample)
        return report(methods)
    with stop_on_signals(stop, print):
        advance(lm, methods, facts, args, stop)
    report(methods)


def advance(lm, methods: list[str], facts, args, stop: StopRequest) -> None:
    while True:
        progress = False
        for name in methods:
            # Rows, not depths: a run redone from edit 0 re-reads depths an earlier run recorded.
            before = len(read_jsonl(RUNS / f"seq-{name}.jsonl"))
            run_method(lm, name, facts, args.n, args.every, args.sample, stop)
            progress |= len(read_jsonl(RUNS / f"seq-{name}.jsonl")) != before
        deepest = max((r["edits"] for m in methods for r in read_jsonl(RUNS / f"seq-{m}.jsonl")), default=0)
        unedited(lm, facts, deepest, args.every, args.sample)
        if not progress:
            break


if __name__ == "__main__":
    main()
