"""A journal's state as PEFT LoRA adapters (exact and `--rank R`) against the state itself.

    python benchmarks/lora.py JOURNAL --manifest examples/facts.csv             # the 24-fact example
    python benchmarks/lora.py benchmarks/runs/seq-default-s5-journal --at 1000 --ranks 256,64,16 \\
        --manifest ../shared/data/counterfact-edit-10k.json --sample 200

The journal is copied to a temporary folder (and there rolled back to the state once `--at`
facts were edited, as benchmarks/ge.py counts them), so it is only read. For each adapter:
its size, the time `export --adapter` takes (model load and replay included), the times to
load the base and the adapter with PEFT and to merge, the largest logit difference of the
merged model from the journal's state (what `export` writes) at the last position of up to
50 edit prompts, and ES / PS / NS of the merged model on the applied facts (an evenly
spread `--sample` of them), beside the same scores of the state itself. One line of JSON
per row on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ge import state_after  # noqa: E402
from sequential import sample_indices  # noqa: E402

from romebatch import api  # noqa: E402
from romebatch.adapters import adapter_for  # noqa: E402
from romebatch.editor import Editor  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import LoadedModel  # noqa: E402
from romebatch.scores import score_facts, summarize  # noqa: E402


def quiet(message: str) -> None:
    pass


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal", type=Path)
    ap.add_argument("--manifest", type=Path, required=True, help="the facts the journal applied (for scoring)")
    ap.add_argument("--at", type=int, help="facts edited (default: the head)")
    ap.add_argument("--ranks", default="", help="comma-separated --rank values besides the exact adapter")
    ap.add_argument("--sample", type=int, default=200, help="facts scored")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="romebatch-lora-"))
    try:
        journal = work / "journal"
        shutil.copytree(args.journal, journal, ignore=shutil.ignore_patterns("lock"))
        with Editor(journal, log=quiet) as editor:
            if args.at is not None:
                editor.rollback(to=state_after(editor.journal.lineage(), args.at))
            path = editor.journal.lineage()
            applied = {r.fact_hash for r in path}
            facts = [f for f in load_manifest(args.manifest, skip_invalid=True).facts if f.hash in applied]
            facts = [facts[i] for i in sample_indices(len(facts), args.sample)]
            lm, base_folder = editor.lm, Path(str(editor.lm.model.name_or_path))
            texts = [f.text for f in facts[:50]]

            def last_logits(model) -> torch.Tensor:
                with torch.no_grad():
                    return torch.stack(
                        [model(**lm.tokenizer(t, return_tensors="pt")).logits[0, -1].float() for t in texts]
                    )

            reference = last_logits(lm.model)
            print(
                json.dumps(
                    {
                        "row": "journal state (= export)",
                        "head": editor.head,
                        "edits": len(path),
                        "facts": len(applied),
                        **summarize(score_facts(lm, facts)),
                    }
                ),
                flush=True,
            )
        for rank in [None] + [int(r) for r in args.ranks.split(",") if r]:
            out = work / f"adapter-{rank or 'exact'}"
            started = time.perf_counter()
            report = api.export_adapter(out, journal=journal, rank=rank, log=quiet)
            exported = time.perf_counter() - started
            started = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
            loaded_base = time.perf_counter() - started
            started = time.perf_counter()
            wrapped = PeftModel.from_pretrained(base, str(out)).eval()
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            merged = wrapped.merge_and_unload()
            merge = time.perf_counter() - started
            scores = summarize(
                score_facts(
                    LoadedModel(model=merged, tokenizer=lm.tokenizer, adapter=adapter_for(merged), spec="merged"), facts
                )
            )
            print(
                json.dumps(
                    {
                        "row": f"adapter, rank {report.rank}" + (" (exact)" if report.exact else f" (--rank {rank})"),
                        "MB": report.bytes / 1e6,
                        "weights_MB": (out / "adapter_model.safetensors").stat().st_size / 1e6,
                        "relative_error": report.relative_error,
                        "export_s": exported,
                        "load_base_s": loaded_base,
                        "peft_load_s": loaded,
                        "merge_s": merge,
                        "max_abs_logit_diff": float((last_logits(merged) - reference).abs().max()),
                        "max_abs_logit": float(reference.abs().max()),
                        **scores,
                    }
                ),
                flush=True,
            )
            del merged, wrapped, base
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
