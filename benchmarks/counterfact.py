"""CounterFact quality benchmark: single-edit mode (edit, score, restore) on the embedded default.

    python benchmarks/counterfact.py --n 100                       # the recorded table
    python benchmarks/counterfact.py --n 20 --layers 2,4,6,8 --tag sweep   # the layer sweep
    python benchmarks/counterfact.py --n 20 --set v_lr=0.1 --tag lr0.1
    python benchmarks/counterfact.py --mode sequential --n 200    # all edits kept, scored at the end
    python benchmarks/counterfact.py --dataset zsre --n 100       # zsRE: token accuracies
    python benchmarks/counterfact.py --n 50 --set exact_protocol=true --tag exact   # the plain v* path

Sequential mode is a romebatch journal (benchmarks/runs/<tag>-journal): re-running the
command resumes it. It is scored at the end on every fact (ES/PS/NS and the magnitudes)
and for fluency (GE, generations from the first 20 edit prompts), beside the unedited row;
the rows are written to benchmarks/runs/<tag>.json.

Each (config, record) result is appended to a JSONL file under benchmarks/runs/ as soon
as it is computed, so an interrupted run resumes where it stopped. The unedited model's
row is computed on the same records. Data: ../shared/data/counterfact-edit-10k.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.hparams import HParams, resolve  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.rome import apply_edit, compute_edit, load_or_compute_stats, sample_prefixes  # noqa: E402
from romebatch.scores import FactScores, score_facts, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-edit-10k.json"
ZSRE = ROOT.parent / "shared" / "data" / "zsre-1k.json"


def zsre_rows(lm, facts) -> list:
    """zsRE's scores as the ROME paper reports them: top-1 token accuracy under teacher forcing
    of the new answer on the question (efficacy) and its rephrasing (paraphrase), and of the
    true answer on an unrelated NQ question (specificity)."""
    from romebatch.zsre_scores import token_accuracy

    out = []
    for fact in facts:
        es = token_accuracy(lm, [(fact.text, fact.target_new)])[0]
        ps = token_accuracy(lm, [(p, fact.target_new) for p in fact.paraphrases]) if fact.paraphrases else []
        ns = token_accuracy(lm, [(n.prompt, n.answer) for n in fact.neighborhood]) if fact.neighborhood else []
        out.append({"ES": es, "PS": sum(ps) / len(ps) if ps else None, "NS": sum(ns) / len(ns) if ns else None})
    return out


def model_slug(model: str | None) -> str:
    """'' for the embedded default (the recorded file names), else '-<name>': another model's
    unedited rows must never be read as the default model's."""
    if model is None:
        return ""
    name = model.rstrip("/").rsplit("/", 1)[-1].replace("package:", "")
    return "-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return out


def load_done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            done[row["id"]] = row
    return done


def row_from_scores(fact_id: str, s: FactScores, extra: dict) -> dict:
    return {
        "id": fact_id,
        "ES": s.efficacy,
        "PS": s.paraphrase_success,
        "NS": s.neighborhood_success,
        "p_new": s.p_new,
        "p_true": s.p_true,
        **extra,
    }


def table(rows: list[dict]) -> dict:
    def pct(key):  # ES/PS/NS are 0/1 per fact on CounterFact, token accuracies on zsRE
        vals = [r[key] for r in rows if r.get(key) is not None]
        return 100 * sum(vals) / len(vals) if vals else float("nan")

    es, ps, ns = pct("ES"), pct("PS"), pct("NS")
    s = 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0
    secs = [r["seconds"] for r in rows if "seconds" in r]
    return {
        "n": len(rows),
        "ES": es,
        "PS": ps,
        "NS": ns,
        "S": s,
        "sec_per_edit": median(secs) if secs else None,
        "steps": median([r["steps"] for r in rows if "steps" in r]) if secs else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: the model's default)")
    ap.add_argument("--set", nargs="*", default=[], help="hyper-parameter overrides name=value")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--mode", choices=["single", "sequential"], default="single")
    ap.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    args = ap.parse_args()
    args.tag = (args.tag or args.mode) + ("-zsre" if args.dataset == "zsre" else "")
    data = ZSRE if args.dataset == "zsre" else DATA
    if args.mode == "sequential":
        return sequential(args)

    torch.manual_seed(0)
    lm = load_model(args.model)
    manifest = load_manifest(data, skip_invalid=True)
    facts = manifest.facts[args.start : args.start + args.n]
    zsre = args.dataset == "zsre"
    base_hash = lm.base_hash()
    overrides = parse_set(args.set)
    hp0 = resolve(HParams.from_dict(overrides), lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [hp0.layer]
    out_dir = ROOT / "benchmarks" / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)

    base_path = out_dir / f"unedited{model_slug(args.model)}{'-zsre' if zsre else ''}-{args.start}-{args.n}.jsonl"
    base_done = load_done(base_path)
    if len(base_done) < len(facts):
        with base_path.open("w") as f:
            if zsre:
                for fact, r in zip(facts, zsre_rows(lm, facts)):
                    f.write(json.dumps({"id": fact.id, **r}) + "\n")
            else:
                for fact, s in zip(facts, score_facts(lm, facts)):
                    f.write(json.dumps(row_from_scores(fact.id, s, {})) + "\n")
        base_done = load_done(base_path)
    results = {"unedited": table(list(base_done.values()))}

    prefixes = sample_prefixes(lm, hp0.prefixes, hp0.prefix_top_k, hp0.seed)
    stats = (
        load_or_compute_stats(
            lm,
            layers,
            base_hash,
            **hp0.stats_options(),
            log=print,
        )
        if hp0.mom2 != "identity"
        else {}
    )
    for layer in layers:
        hp = resolve(
            HParams.from_dict({**overrides, "layer": layer}), lm.config.model_type, lm.n_layers, lm.adapter.v_steps
        )
        st = stats[layer].factor(hp.ridge) if layer in stats else None
        path = out_dir / f"{args.tag}-L{layer}-{args.start}-{args.n}.jsonl"
        done = load_done(path)
        with path.open("a") as f:
            for fact in facts:
                if fact.id in done:
                    continue
                weight = lm.weight(layer).detach().clone()
                t = time.perf_counter()
                edit, _, value = compute_edit(
                    lm,
                    layer,
                    fact.prompt,
                    fact.subject,
                    fact.target_new,
                    prefixes,
                    st,
                    hp,
                    target_true=fact.target_true,
                )
                seconds = time.perf_counter() - t
                apply_edit(lm, edit)
                extra = {"seconds": seconds, "steps": value.steps, "norm": edit.norm, "denominator": edit.denominator}
                if zsre:
                    row = {"id": fact.id, **zsre_rows(lm, [fact])[0], **extra}
                else:
                    row = row_from_scores(fact.id, score_facts(lm, [fact])[0], extra)
                with torch.no_grad():
                    lm.weight(layer).copy_(weight)  # restore exactly: single-edit mode
                f.write(json.dumps(row) + "\n")
                f.flush()
                done[fact.id] = row
                print(
                    f"L{layer} {fact.id}: ES {row['ES']} PS {row['PS']} NS {row['NS']} "
                    f"{seconds:.1f}s {value.steps} steps",
                    flush=True,
                )
        results[f"{args.tag} L{layer}"] = table([done[f.id] for f in facts])

    print(f"\n{'row':<22} {'n':>4} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'s/edit':>7} {'steps':>6}")
    for name, r in results.items():
        spe = f"{r['sec_per_edit']:.1f}" if r.get("sec_per_edit") else "-"
        st = f"{r['steps']:.0f}" if r.get("steps") else "-"
        print(f"{name:<22} {r['n']:>4} {r['ES']:>6.1f} {r['PS']:>6.1f} {r['NS']:>6.1f} {r['S']:>6.1f} {spe:>7} {st:>6}")


def sequential(args) -> None:
    from romebatch.editor import Editor
    from romebatch.fluency import fluency
    from romebatch.scores import magnitudes

    out_dir = ROOT / "benchmarks" / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = load_manifest(DATA, skip_invalid=True).facts[args.start : args.start + args.n]
    overrides = parse_set(args.set)
    lm = load_model(args.model)
    fluency_prompts = [f.text for f in facts[:20]]
    rows = {}
    base_path = out_dir / f"unedited{model_slug(args.model)}-seq-{args.start}-{args.n}.json"
    if base_path.exists():
        rows["unedited"] = json.loads(base_path.read_text())
    else:
        scores = score_facts(lm, facts)
        rows["unedited"] = {**summarize(scores), **magnitudes(scores), "GE": fluency(lm, fluency_prompts)}
        base_path.write_text(json.dumps(rows["unedited"]))
    journal = out_dir / f"{args.tag}-journal"
    hp = HParams.from_dict(overrides) if overrides else None
    started = time.perf_counter()
    with Editor(journal, lm=lm, hparams=hp, log=print) as editor:

        def progress(row):
            print(
                f"{row.seq}: {row.fact_id} {row.status} P(new) {row.p_new_before:.3f} -> "
                f"{(row.p_new_after or 0):.3f} {row.seconds:.1f}s",
                flush=True,
            )

        # Sequential mode is measured without repair passes (its numbers stay comparable across sessions).
        result = editor.apply(facts, on_edit=progress, checks=None, repair_every=0)
        print(f"applied {result.count('applied')} in {time.perf_counter() - started:.0f}s")
        scores = score_facts(editor.lm, facts)
        rows[f"{args.tag} ({editor.head} edits)"] = {
            **summarize(scores),
            **magnitudes(scores),
            "GE": fluency(editor.lm, fluency_prompts),
        }
    # The scored rows are the run's record: the journal stays out of git, this file is committed.
    (out_dir / f"{args.tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{'row':<26} {'n':>4} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'EM':>6} {'PM':>6} {'NM':>6} {'GE':>6}")
    for name, r in rows.items():
        print(
            f"{name:<26} {r['n']:>4} "
            + " ".join(f"{r[k]:>6.1f}" for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM", "GE"))
        )


if __name__ == "__main__":
    main()
