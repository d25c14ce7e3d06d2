"""Regenerate the docs that would otherwise drift: `python docs/generate.py`.

- docs/cli.md: every command's --help page.
- docs/journal-schema.md: the journal's SQL schema, made by running the migrations on an
  in-memory database.

tests/test_docs.py fails when a committed file differs from what this script writes.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))


# Written by hand (here, so that cli.md stays one generated file); tests/test_conventions.py
# checks each convention through the CLI.
CONVENTIONS = """## Conventions

- `romebatch --version` prints the version; `romebatch --install-completion` installs shell
  completion (Typer's own; `--show-completion bash` prints it).
- `romebatch -q COMMAND` hides progress and status lines (stdlib logging, level WARNING);
  tables, reports, errors and `--json` still print. `romebatch -v apply ...` also prints
  every edit as it is made, above the live progress bar (without a terminal, those lines
  are always printed).
- A manifest of `-` is read from standard input, once, with the same 2 GiB cap as a file
  (`apply`, `tune`, `verify --manifest`, `compare --facts`, `trace --facts`); errors name it
  `<stdin>:ROW`. `--format csv|yaml|jsonl|json|counterfact|counterfact-flat|zsre` names the
  layout. For `-` it is needed unless the first line tells (`[` or `{`: JSON or JSONL, a CSV
  header, `- `/`facts:`: YAML); for a file it overrides the suffix. A terminal on stdin is
  refused rather than waited on: `romebatch apply - --format csv < facts.csv`.
- Environment defaults: `ROMEBATCH_JOURNAL` for `--journal`, `ROMEBATCH_MODEL` for `--model`
  (an option given on the command line wins). `ROMEBATCH_HOME` holds the caches,
  `ROMEBATCH_DEBUG=1` shows tracebacks.
- Thresholds that are shares are written as shares, 0..1, in every command:
  `apply --max-neighborhood-drop --max-probe-regression --min-retention`, `verify
  --min-retention --min-efficacy` (`--min-retention 0.9` is 90%). A value outside 0..1 is
  refused with exit code 2 before any model is loaded. `verify --max-ns-drop` is in points of
  NS (0..100).
- `apply --help` shows the default of every ROME setting (or what decides it: the layer
  and `--v-steps` depend on the model). A journal that exists keeps the settings it was made
  with. The settings' options are made from the fields of `romebatch.HParams` (and the
  regression thresholds' from `Thresholds`), so their defaults are the library's;
  `--set NAME=VALUE` (repeatable, in `apply` and `tune`) sets any field, over `--hparams`,
  checked against the field's type and range.
- dtype: a journal records the dtype it was computed in, and every command reopens it in
  that dtype (`--dtype` is needed only when creating one). `export --dtype bfloat16|float16`
  casts the weights as they are written. Every export carries `romebatch.json` (every edit,
  its weight hash) and a model card `README.md` (base model, number of edits, journal head,
  how it was made).
- Re-running a manifest skips facts already applied, and facts rejected by an earlier run
  unless `--retry-rejected`; facts whose edit was rolled back are applied again. `apply
  --dry-run` counts all three.
- `log` prints a summary and the last 20 edits (`-n 0`: all); `--json` prints every field of
  every edit unless `-n`, `--status`, `--fact` or `--since` narrow it.
- With `--on-regression warn` every warning is journaled with its edit (`log --status
  warned`, the results' `warning` column) and shown live and in the final report.
- The progress bar of `apply` shows elapsed time, ETA, seconds per edit, the fact being
  edited, and the probes' base answers and repair passes as stages of their own.
- Each repair pass ends with one line: what it repaired, and about how many of the facts
  that held when it began its own repairs undid (a sample of up to 200 of them scored
  again). From half as many as it repaired, the line says the edited layer is near
  saturation. `apply --json` lists the passes under `repair_passes`.
- A run's summary (`apply --json`, under `run`; the Parquet results table's `romebatch`
  metadata) names the model, its base hash, dtype, hyper-parameters, the romebatch, torch and
  transformers versions, the journal's head and the date.
- `trace` with no `--model` traces the model of `--journal` (default `./romebatch.journal`)
  when that journal exists, else the embedded model.
- User strings (subjects, prompts, ids) are printed literally, never read as rich markup.
- Python: `romebatch.edit(subject=..., prompt=..., target_new=...)` edits one fact in one
  call; `romebatch.compare`, `romebatch.curves` and `romebatch.log(status=..., limit=...)` are
  what `compare`, `report` and `log` print.
"""


def cli_markdown() -> str:
    from typer.testing import CliRunner

    from romebatch.cli import app

    runner = CliRunner()
    parts = ["# romebatch command reference\n\nGenerated by `python docs/generate.py`; do not edit.\n", CONVENTIONS]
    commands = [None] + sorted(c.name or c.callback.__name__ for c in app.registered_commands)
    for name in commands:
        args = ([name] if name else []) + ["--help"]
        result = runner.invoke(app, args, env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}, color=False)
        title = f"romebatch {name}" if name else "romebatch"
        parts.append(f"## {title}\n\n```\n{result.output.rstrip()}\n```\n")
    parts.append(exit_codes_markdown())
    return "\n".join(parts)


def exit_codes_markdown() -> str:
    from romebatch.errors import EXIT_CODES

    rows = "\n".join(f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items())
    return f"## Exit codes\n\n| code | meaning |\n| ---: | --- |\n{rows}\n"


def schema_markdown() -> str:
    from romebatch.journal_schema import MIGRATIONS, migrate

    db = sqlite3.connect(":memory:", isolation_level=None)
    migrate(db)
    lines = [
        "# Journal schema\n",
        "Generated by `python docs/generate.py` from the migrations "
        f"({', '.join(m.__name__ for m in MIGRATIONS)}); do not edit.\n",
        "```sql",
    ]
    for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type DESC, name"):
        lines.append(sql.strip() + ";\n")
    lines.append("```\n")
    return "\n".join(lines)


FILES = {"cli.md": cli_markdown, "journal-schema.md": schema_markdown}


if __name__ == "__main__":
    for name, make in FILES.items():
        (DOCS / name).write_text(make())
        print(f"wrote docs/{name}")
