"""Speed of an edit, in units of U, on the embedded default (or --model), in one run.

    python benchmarks/speed.py                 # 20 CounterFact edits, the recorded table
    python benchmarks/speed.py --n 5 --exact 2 # a quick look

U is the median time of one forward + backward pass of the model on one edit's
optimisation batch (the context-prefixed rewrite prompts plus the essence prompt), with
the gradient flowing only to a vector δ added at the edited layer, computed the plain way:
every token, every layer, logits at every position. The original protocol costs about
20 U per edit (20 Adam steps) plus the key.

Measured, in this order and in one process so that the ratios share the machine's state:

1. one-off costs: model load from the safetensors cache; key statistics (load from cache,
   and with --cold-stats a fresh computation in a temporary cache);
2. U, over the benchmark's facts;
3. `apply` of N facts with the probes off, then of the same N facts into a second journal
   with the default regression probes on: per-edit wall time split by phase (from
   FactResult.timings), Adam steps, edits per minute;
4. with --exact N, the same edits with `exact_protocol` (the plain path) for comparison;
5. with --depths, the default configuration's edits (probes on, repair passes on) on a
   journal already 100 and 3,000 edits deep (synthetic held facts below them), and a repair
   pass over each whole path: whether the cost of an edit grows with the journal;
6. journal replay of 1,000 edits (synthetic rank-one edits of realistic size and norm,
   committed through the journal, replayed and hash-checked by `Editor.replay`);
7. `verify` throughput (prompts scored per second);
8. peak RSS of `romebatch apply` on 5 facts in its own process, against the model's
   float32 size.

Journals go to a temporary folder; nothing under benchmarks/ is written but --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.cli_settings import hparams_from  # noqa: E402
from romebatch.editor import Editor  # noqa: E402
from romebatch.hparams import REPAIR_EVERY, REPAIR_SPAN, HParams, resolve  # noqa: E402
from romebatch.journal_records import EditRecord  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model, weight_hash  # noqa: E402
from romebatch.probes import Thresholds  # noqa: E402
from romebatch.rome import values as V  # noqa: E402
from romebatch.rome.update import RankOneEdit, apply_edit  # noqa: E402
from romebatch.scores import score_facts  # noqa: E402
from romebatch.specificity import score_head  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"
PHASES = ("key", "value", "update", "guard", "scoring", "probes", "commit", "total")


def apply_peak_rss_mib(model: str | None, n: int = 5) -> float:
    """Peak RSS of `romebatch apply` (default probes) on n CounterFact facts, in its own process.

    This process's own peak is no guide: measuring U materialises full logits (B x T x 262k).
    """
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        # A manifest of the first n records: the whole file holds conflicting records, which
        # `apply` rightly refuses (counterfact.py reads it with skip_invalid).
        manifest = Path(tmp) / "facts.json"
        manifest.write_text(json.dumps(json.loads(DATA.read_text())[:n]))
        argv = ["romebatch", "apply", str(manifest), "--journal", str(Path(tmp) / "journal"), "--json"]
        argv += ["--model", model] if model else []
        # The child reports its own peak (VmHWM, which exec resets): ru_maxrss, of the child or
        # of RUSAGE_CHILDREN, survives exec and so counts this process's pages the fork shared.
        code = (
            "import re, sys\nfrom romebatch.cli import main\nsys.argv = " + repr(argv) + "\n"
            "try:\n    main()\nfinally:\n"
            "    status = open('/proc/self/status').read()\n"
            "    print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK ")]
        if done.returncode or not peaks:
            raise SystemExit(f"romebatch apply failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(peaks[-1]) / 1024  # Linux: KiB


def measure_u(lm, layer: int, facts, prefixes, repeats: int = 1) -> list[float]:
    """Plain forward + backward (every token, every layer, full logits) on each fact's batch."""
    times = []
    for fact in facts:
        rows = V.build_rows(lm, fact.prompt, fact.subject, fact.target_new, prefixes)
        forward = V.exact_forward(lm, layer, rows)
        targets = torch.tensor(rows.targets)
        for _ in range(repeats):
            delta = torch.zeros(lm.config.hidden_size, requires_grad=True)
            t = time.perf_counter()
            logp = forward(delta).float().log_softmax(-1)
            loss = -logp[:-1].gather(1, targets[:, None]).mean() + logp[-1].exp().sum()
            loss.backward()
            times.append(time.perf_counter() - t)
    return times


def apply_run(lm, facts, hp: HParams, checks) -> list:
    with (
        tempfile.TemporaryDirectory() as tmp,
        Editor(Path(tmp) / "journal", lm=lm, hparams=hp, log=lambda m: None) as ed,
    ):
        ed.prefixes()
        ed.stats(hp.layer)
        result = ed.apply(facts, checks=checks, repair_every=0)  # edits only: no repair passes
        rows = [r for r in result.results if r.status == "applied"]
        ed.replay(0, verify=False)  # leave the model at the base for the next run
    return rows


def phase_table(rows, u: float) -> dict:
    out = {}
    for phase in PHASES:
        values = [r.timings.get(phase, 0.0) for r in rows]
        out[phase] = statistics.median(values) if values else float("nan")
    out["steps"] = statistics.median([r.v_steps for r in rows]) if rows else float("nan")
    out["per_step"] = (
        statistics.median([r.timings["value"] / max(r.v_steps, 1) for r in rows]) if rows else float("nan")
    )
    out["total_U"] = out["total"] / u
    out["edits_per_minute"] = 60 / out["total"]
    out["n"] = len(rows)
    return out


def random_edit(layer: int, d_model: int, d_ff: int, norm: float, generator: torch.Generator) -> RankOneEdit:
    """A random rank-one edit with ‖Λ uᵀ‖_F = `norm`, its norm split evenly between Λ and u."""
    lam = torch.randn(d_model, generator=generator)
    u = torch.randn(d_ff, generator=generator)
    scale = (norm / float(lam.norm() * u.norm())) ** 0.5
    return RankOneEdit(layer, lam * scale, u * scale, 1.0, norm)


def synthetic_record(ed, lm, edit: RankOneEdit, fact_id: str, fact_hash: str, fact: dict, norm: float, **extra):
    """Apply a synthetic `edit` and return its journal row (hashes before and after), not yet committed."""
    weight = lm.weight(edit.layer)
    before = weight_hash(weight)
    apply_edit(lm, edit)
    return EditRecord(
        seq=0,
        parent=ed.head,
        fact_id=fact_id,
        fact_hash=fact_hash,
        fact_json=json.dumps(fact),
        layer=edit.layer,
        weight_name=lm.name("down_proj", edit.layer),
        lam=edit.lam.numpy(),
        u=edit.u.numpy(),
        update_norm=norm,
        denominator=1.0,
        weight_hash_before=before,
        weight_hash_after=weight_hash(weight),
        **extra,
    )


def replay_benchmark(lm, layer: int, n_edits: int, norm: float) -> dict:
    """Commit `n_edits` synthetic rank-one edits of norm ~`norm`, then time a full replay."""
    generator = torch.Generator().manual_seed(0)
    d_model, d_ff = lm.config.hidden_size, lm.module("down_proj", layer).in_features
    with tempfile.TemporaryDirectory() as tmp:
        with Editor(Path(tmp) / "journal", lm=lm, log=lambda m: None) as ed:
            ed._base(layer)
            weight = lm.weight(layer)
            commit_times = []
            for i in range(n_edits):
                edit = random_edit(layer, d_model, d_ff, norm, generator)
                fact = {"id": f"synthetic-{i}", "subject": "s", "prompt": "{} p", "target_new": "t"}
                record = synthetic_record(ed, lm, edit, f"synthetic-{i}", f"h{i}", fact, norm)
                t = time.perf_counter()
                ed.journal.commit_edit(record)
                commit_times.append(time.perf_counter() - t)
            head_hash = weight_hash(weight)
            ed.replay(0, verify=False)
            t = time.perf_counter()
            ed.replay()  # every edit applied in order, then the head's hash checked
            seconds = time.perf_counter() - t
            assert weight_hash(weight) == head_hash
            ed.replay(0, verify=False)
    return {"edits": n_edits, "replay_seconds": seconds, "commit_median": statistics.median(commit_times)}


def held_facts(lm, start: int, count: int) -> list:
    """CounterFact records turned round (the true object as the new one), kept where the base
    model already prefers it: facts that hold, so a repair pass scores each one (two sequences,
    as for a real edit) and re-edits none."""
    candidates = [
        dataclasses.replace(f, id=f"held-{f.id}", target_new=f.target_true, target_true=f.target_new)
        for f in load_manifest(DATA, skip_invalid=True).facts[start : start + 2 * count]
        if f.target_true
    ]
    scores = score_facts(lm, candidates)
    held = [f for f, s in zip(candidates, scores) if s.efficacy]
    if len(held) < count:
        raise SystemExit(f"only {len(held)} held facts in records {start}..{start + 2 * count}; lower the depth")
    return held[:count]


def depth_run(lm, hp: HParams, facts, filler: list, depth: int, typical_norm: float) -> dict:
    """Real edits (default probes on, repair passes as shipped) on a journal already `depth` deep.

    The first `depth` edits are synthetic: rank-one updates of norm 1e-6 (the model is
    unchanged for every purpose but the hashes) of held facts, each with its key, so every
    per-edit read of the journal (guards, probes, a preserver's keys, repair passes) sees a
    journal of that size. Their rows record `typical_norm` as the update norm, so the norm
    guard compares a new edit with a run's typical edit, as it would in a real run.
    Per-edit medians come from the edits themselves; a repair pass at this depth (as shipped:
    it checks at most REPAIR_SPAN facts) is timed separately, and `amortised` adds its share
    per REPAIR_EVERY edits."""
    generator = torch.Generator().manual_seed(depth)
    layer = hp.layer
    d_model, d_ff = lm.config.hidden_size, lm.module("down_proj", layer).in_features
    with (
        tempfile.TemporaryDirectory() as tmp,
        Editor(Path(tmp) / "journal", lm=lm, hparams=hp, log=lambda m: None) as ed,
    ):
        ed.prefixes()
        ed.stats(layer)
        ed._base(layer)
        for fact in filler[:depth]:
            edit = random_edit(layer, d_model, d_ff, 1e-6, generator)
            key = torch.randn(d_ff, generator=generator).numpy()
            record = synthetic_record(
                ed, lm, edit, fact.id, fact.hash, fact.to_dict(), typical_norm, p_new_after=0.5, k_star=key
            )
            ed.journal.commit_edit(record)
        t = time.perf_counter()
        result = ed.apply(facts, checks=Thresholds(), repair_every=REPAIR_EVERY)
        wall = time.perf_counter() - t
        rows = [r for r in result.results if r.status == "applied"]
        t = time.perf_counter()
        repaired = ed.repair()  # one more pass at this depth, bounded as shipped
        pass_seconds = time.perf_counter() - t
        ed.replay(0, verify=False)
    median = statistics.median(r.timings["total"] for r in rows) if rows else float("nan")
    return {
        "depth": depth,
        "n": len(rows),
        "median_seconds": median,
        "wall_per_edit": wall / max(len(facts), 1),
        "repair_pass_seconds": pass_seconds,
        "repair_span": REPAIR_SPAN,
        "repaired_in_pass": len(repaired),
        "amortised": median + pass_seconds / REPAIR_EVERY,
        "steps": statistics.median(r.v_steps for r in rows) if rows else float("nan"),
        "phases": {phase: statistics.median(r.timings.get(phase, 0.0) for r in rows) for phase in PHASES}
        if rows
        else {},
    }


def save(path: Path | None, out: dict) -> None:
    """Write what is measured so far: a crash late in the run keeps the earlier numbers."""
    if path:
        path.write_text(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="CounterFact edits per configuration")
    ap.add_argument("--start", type=int, default=1000, help="first record (away from counterfact.py's 0..199)")
    ap.add_argument("--exact", type=int, default=3, help="edits to repeat with the plain path (0: skip)")
    ap.add_argument("--replay", type=int, default=1000, help="synthetic edits for the replay timing")
    ap.add_argument("--cold-stats", action="store_true", help="also time key statistics computed from scratch")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--depths", default="100,3000", help="journal depths to time edits at ('' to skip)")
    ap.add_argument("--filler-start", type=int, default=4000, help="first record of the held facts under the depth")
    ap.add_argument(
        "--set", nargs="*", default=[], help="hyper-parameters name=value over the default (a candidate default)"
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    }
    t = time.perf_counter()
    lm = load_model(args.model)
    out["load_seconds"] = time.perf_counter() - t
    n_params = sum(p.numel() for p in lm.model.parameters())
    out["model_fp32_mib"] = n_params * 4 / 2**20
    hp = resolve(hparams_from(None, sets=args.set) or HParams(), lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    out["hparams_set"] = args.set
    facts = load_manifest(DATA, skip_invalid=True).facts[args.start : args.start + args.n]

    from romebatch.rome import load_or_compute_stats, sample_prefixes

    t = time.perf_counter()
    prefixes = sample_prefixes(lm, hp.prefixes, hp.prefix_top_k, hp.seed)
    out["prefix_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    load_or_compute_stats(
        lm,
        [hp.layer],
        lm.base_hash(),
        **hp.stats_options(),
        log=lambda m: None,
    )
    out["stats_cached_seconds"] = time.perf_counter() - t
    if args.cold_stats:
        home = os.environ.get("ROMEBATCH_HOME")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["ROMEBATCH_HOME"] = tmp
            t = time.perf_counter()
            load_or_compute_stats(
                lm,
                [hp.layer],
                lm.base_hash(),
                **hp.stats_options(),
                log=lambda m: None,
            )
            out["stats_cold_seconds"] = time.perf_counter() - t
        if home is None:
            del os.environ["ROMEBATCH_HOME"]
        else:
            os.environ["ROMEBATCH_HOME"] = home
    print(
        f"one-off: load {out['load_seconds']:.1f}s, prefixes {out['prefix_seconds']:.1f}s, "
        f"stats from cache {out['stats_cached_seconds']:.2f}s",
        flush=True,
    )

    u_times = measure_u(lm, hp.layer, facts, prefixes)
    u = statistics.median(u_times)
    out["U"] = u
    print(f"U = {u:.2f}s (median of {len(u_times)})", flush=True)

    configs = [("probes off", hp, None), ("probes on (default)", hp, Thresholds())]
    if args.exact:
        configs.append(("exact protocol, probes off", hp.replace(exact_protocol=True), None))
    out["runs"] = {}
    norms = []
    for name, config, checks in configs:
        run_facts = facts[: args.exact] if config.exact_protocol else facts
        rows = apply_run(lm, run_facts, config, checks)
        norms += [r.update_norm for r in rows]
        out["runs"][name] = table = phase_table(rows, u)
        save(args.json, out)
        print(
            f"{name}: {table['total']:.2f}s per edit = {table['total_U']:.2f} U "
            f"({table['steps']:.0f} steps, {table['per_step']:.2f}s per step)",
            flush=True,
        )

    if args.depths:
        depths = [int(d) for d in args.depths.split(",")]
        filler = held_facts(lm, args.filler_start, max(depths))
        out["depths"] = []
        for depth in depths:
            row = depth_run(lm, hp, facts, filler, depth, statistics.median(norms))
            row["median_U"] = row["median_seconds"] / u
            row["amortised_U"] = row["amortised"] / u
            out["depths"].append(row)
            save(args.json, out)
            print(
                f"at depth {depth}: {row['median_seconds']:.2f}s per edit = {row['median_U']:.2f} U; "
                f"a repair pass {row['repair_pass_seconds']:.1f}s; amortised {row['amortised_U']:.2f} U",
                flush=True,
            )

    out["replay"] = replay_benchmark(lm, hp.layer, args.replay, norm=statistics.median(norms))
    print(f"replay of {args.replay} edits: {out['replay']['replay_seconds']:.2f}s", flush=True)

    with (
        tempfile.TemporaryDirectory() as tmp,
        Editor(Path(tmp) / "journal", lm=lm, hparams=hp, log=lambda m: None) as ed,
    ):
        ed.apply(facts[:5], checks=None, repair_every=0)
        # Each prompt is scored for the new and the true object, on the head and on the base.
        n_prompts = sum(2 * (1 + len(f.paraphrases) + len(f.neighborhood)) for f in facts[:5]) * 2
        t = time.perf_counter()
        score_head(ed)
        seconds = time.perf_counter() - t
    out["verify_prompts_per_second"] = n_prompts / seconds
    out["peak_rss_mib"] = apply_peak_rss_mib(args.model)
    out["peak_rss_ratio"] = out["peak_rss_mib"] / out["model_fp32_mib"]
    save(args.json, out)
    report(out)


def report(out: dict) -> None:
    u = out["U"]
    print(f"\nmachine: {out['machine']}")
    print(f"U (plain forward + backward on one edit's batch): {u:.2f} s")
    header = (
        f"{'configuration':<28} {'n':>3} "
        + " ".join(f"{p:>8}" for p in PHASES)
        + f" {'in U':>6} {'steps':>6} {'s/step':>7} {'edits/min':>9}"
    )
    print(header)
    for name, t in out["runs"].items():
        print(
            f"{name:<28} {t['n']:>3} "
            + " ".join(f"{t[p]:>8.2f}" for p in PHASES)
            + f" {t['total_U']:>6.2f} {t['steps']:>6.0f} {t['per_step']:>7.2f} {t['edits_per_minute']:>9.1f}"
        )
    first = next(iter(out["runs"].values()))
    print(f"journal commit: {first['commit']:.4f} s = {100 * first['commit'] / first['total']:.2f}% of an edit")
    r = out["replay"]
    print(
        f"replay of {r['edits']} edits: {r['replay_seconds']:.2f} s (commit of a synthetic edit {r['commit_median'] * 1000:.1f} ms)"
    )
    for d in out.get("depths", []):
        print(
            f"at journal depth {d['depth']:>5}: {d['median_seconds']:.2f} s per edit = {d['median_U']:.2f} U "
            f"({d['steps']:.0f} steps); repair pass over the path {d['repair_pass_seconds']:.1f} s; "
            f"with its share per {REPAIR_EVERY} edits {d['amortised_U']:.2f} U"
        )
    if len(out.get("depths", [])) > 1:
        first, last = out["depths"][0], out["depths"][-1]
        print(
            f"depth {last['depth']} against {first['depth']}: per edit x{last['median_seconds'] / first['median_seconds']:.3f}, "
            f"amortised x{last['amortised'] / first['amortised']:.3f}"
        )
    print(f"verify: {out['verify_prompts_per_second']:.0f} (prompt, answer) pairs scored per second")
    print(
        f"one-off: model load {out['load_seconds']:.1f} s, prefixes {out['prefix_seconds']:.1f} s, "
        f"key statistics from cache {out['stats_cached_seconds']:.2f} s"
        + (f", computed {out['stats_cold_seconds']:.0f} s" if "stats_cold_seconds" in out else "")
    )
    print(
        f"peak RSS of `romebatch apply` {out['peak_rss_mib']:.0f} MiB = {out['peak_rss_ratio']:.2f} x the model's float32 size "
        f"({out['model_fp32_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
