"""One-shot GPU check: edits on the embedded model (or --model) on one GPU, then over two.

    python benchmarks/gpu_check.py --device cuda              # bfloat16, 5 edits, JSON summary last
    python benchmarks/gpu_check.py --device cpu --n 2         # the same path on a CPU (float32)

What it runs, in one process, each part in a temporary journal:

1. `--device DEVICE --dtype DTYPE` (bfloat16 on CUDA, float32 on CPU): N facts of
   examples/facts.csv applied with the probes off; seconds per edit (first edit apart: it
   pays for the key statistics and the context prefixes), efficacy, the peak GPU memory;
   then rollback to the base (the weight hash must come back) and `check` (every stored hash
   replayed).
2. With two or more GPUs: the same facts with `--device-map` placing the first half of the
   layers on cuda:0 and the rest (with the norm and head) on cuda:1, and the same checks;
   the edits must agree with the one-device run in efficacy (bytes may differ across
   devices: the kernels differ).

Exit code 1 if a check fails. Paste the JSON line into benchmarks/RESULTS.md with the date
and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebatch.editor import Editor  # noqa: E402
from romebatch.manifest import load_manifest  # noqa: E402
from romebatch.model import load_model, weight_hash  # noqa: E402


def quiet(_message: str) -> None:
    pass


def two_device_map(lm) -> dict:
    """First half of the blocks on GPU 0, the rest on GPU 1; embeddings and a (tied) head on 0.

    Every parameter's and buffer's owner is named, as from_pretrained requires of a map.
    """
    n, block = lm.n_layers, lm.adapter.layer  # block: e.g. "model.layers.{}"
    prefix = block.split("{}")[0]
    head = lm.lm_head_name
    device_map = {}
    tensors = [*lm.model.named_parameters(remove_duplicate=False), *lm.model.named_buffers(remove_duplicate=False)]
    for name, _ in tensors:
        owner = name.rsplit(".", 1)[0]
        if owner.startswith(prefix):
            index = int(owner[len(prefix) :].split(".")[0])
            device_map[block.format(index)] = 0 if index < n // 2 else 1
        else:
            device_map[owner] = (
                0 if (owner == head or "embed" in owner or "rotary" in owner or "wte" in owner or "wpe" in owner) else 1
            )
    return device_map


def run(model, device, dtype, facts, device_map=None) -> dict:
    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map, log=quiet)
    load_s = time.perf_counter() - started
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, Editor(Path(tmp) / "j", lm=lm, log=quiet) as editor:
        layer = editor.hparams.layer
        base = weight_hash(lm.weight(layer))
        result = editor.apply(facts, checks=None, repair_every=0)
        applied = [r for r in result.results if r.status == "applied"]
        seconds = [r.seconds for r in applied]
        head_hash = weight_hash(lm.weight(layer))
        editor.rollback(base=True)
        rollback_ok = weight_hash(lm.weight(layer)) == base
        editor.replay(result.head)
        replay_ok = weight_hash(lm.weight(layer)) == head_hash
        check_ok = editor.check().ok
    out = {
        "device": device,
        "dtype": dtype,
        "device_map": device_map is not None,
        "layer": layer,
        "load_s": round(load_s, 2),
        "edits": len(facts),
        "applied": len(applied),
        "first_edit_s": round(seconds[0], 3) if seconds else None,
        "s_per_edit": round(statistics.median(seconds[1:] or seconds), 3) if seconds else None,
        "efficacy": round(100.0 * sum(bool(r.success) for r in applied) / max(1, len(applied)), 1),
        "rollback_ok": rollback_ok,
        "replay_ok": replay_ok,
        "check_ok": check_ok,
    }
    if device.startswith("cuda") or device_map is not None:
        out["peak_gpu_gib"] = (
            round(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30, 3)
            if torch.cuda.is_available()
            else None
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--model", default=None, help="default: the embedded Gemma-3-270M")
    parser.add_argument("--n", type=int, default=5, help="facts of examples/facts.csv to edit")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    facts = load_manifest(ROOT / "examples" / "facts.csv", limit=args.n).facts
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    print(json.dumps({"env": env}), flush=True)
    runs = [run(args.model, args.device, dtype, facts)]
    print(json.dumps(runs[-1]), flush=True)
    if args.device.startswith("cuda") and torch.cuda.device_count() >= 2:
        lm = load_model(args.model, device="cpu", dtype=dtype, log=quiet)  # only to read the layout
        device_map = two_device_map(lm)
        del lm
        runs.append(run(args.model, "cuda", dtype, facts, device_map=device_map))
        runs[-1]["agrees_with_one_device"] = runs[-1]["efficacy"] == runs[0]["efficacy"]
        print(json.dumps(runs[-1]), flush=True)
    ok = all(r["rollback_ok"] and r["replay_ok"] and r["check_ok"] and r["applied"] == r["edits"] for r in runs)
    ok = ok and all(r.get("agrees_with_one_device", True) for r in runs)
    print(json.dumps({"ok": ok, "runs": runs}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
