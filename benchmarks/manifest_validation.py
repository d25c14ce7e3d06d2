"""Manifest validation speed and memory: 1,000 / 10,000 / 100,000-row CSV and JSONL manifests.

    python benchmarks/manifest_validation.py

Each size is validated in a fresh subprocess (so peak RSS is that run's own), and the
table gives wall time and peak RSS above the interpreter's baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from romebatch.manifest import load_manifest
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
m = load_manifest(sys.argv[2])
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(m.facts), seconds, (peak - base) / 1024)
"""


def write_csv(path: Path, rows: int) -> None:
    with path.open("w") as f:
        f.write("id,subject,prompt,target_new,target_true,paraphrases,neighborhood_prompts,neighborhood_answers\n")
        for i in range(rows):
            f.write(
                f"f{i},Subject number {i},{{}} is located in the city of,City{i % 977},Town{i % 991},"
                f"Where is Subject number {i}?|Subject number {i} stands in,"
                f"Landmark {i} is located in the city of,Town{(i + 1) % 991}\n"
            )


def write_jsonl(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "id": f"f{i}",
                        "subject": f"Subject number {i}",
                        "prompt": "{} is located in",
                        "target_new": f"City{i % 977}",
                        "target_true": f"Town{i % 991}",
                        "paraphrases": [f"Where is Subject number {i}?"],
                        "neighborhood": [{"prompt": f"Landmark {i} is in", "answer": "X"}],
                    }
                )
                + "\n"
            )


def main() -> None:
    print(f"{'format':<7} {'rows':>8} {'seconds':>8} {'peak RSS MiB':>13} {'MiB/1k rows':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, writer in (("csv", write_csv), ("jsonl", write_jsonl)):
            for rows in (1_000, 10_000, 100_000):
                path = Path(tmp) / f"m{rows}.{fmt}"
                writer(path, rows)
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(ROOT), str(path)], capture_output=True, text=True, check=True
                ).stdout.split()
                n, seconds, mib = int(out[0]), float(out[1]), float(out[2])
                assert n == rows
                print(f"{fmt:<7} {rows:>8} {seconds:>8.2f} {mib:>13.1f} {mib / rows * 1000:>12.2f}")


if __name__ == "__main__":
    main()
