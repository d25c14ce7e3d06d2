"""One-call functions that read a journal or a model and change nothing: log, check, verify,
trace, compare, curves. `romebatch.api` re-exports them; the CLI calls them through it."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path

from .editor import Editor
from .errors import UserError
from .hparams import HParams
from .journal import Journal, reads_journal
from .manifest import Manifest, load_manifest

# What each kind of public argument accepts, and how an error describes it. A kind ending in
# "?" also accepts None. Bools are not counts or numbers (True is an int to Python).
_KINDS: dict[str, str] = {
    "path": "a file or folder path (str or Path)",
    "manifest": "a manifest path (str or Path) or a Manifest",
    "model": "a model name or folder (str or Path)",
    "text": "text (str)",
    "count": "a whole number (int)",
    "number": "a finite number (int or float)",
    "flag": "True or False (bool)",
    "function": "a function",
    "mapping": "text (str) or a dict",
    "layer": "a layer number (int) or 'auto'",
}


def _fits(kind: str, value: object) -> bool:
    if kind in ("path", "model"):
        return isinstance(value, (str, os.PathLike))
    if kind == "manifest":
        return isinstance(value, (str, os.PathLike, Manifest))
    if kind == "text":
        return isinstance(value, str)
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "flag":
        return isinstance(value, bool)
    if kind == "function":
        return callable(value)
    if kind == "mapping":
        return isinstance(value, (str, dict))
    if kind == "layer":
        return value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
    raise ValueError(f"unknown argument kind {kind!r}")


def check_args(function: str, **arguments: tuple[object, str]) -> None:
    """Refuse a public function's argument of the wrong type with one line naming it:
    `check_args("apply", limit=(limit, "count?"))` -> "apply: limit must be a whole number (int), got str".
    """
    for name, (value, kind) in arguments.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        if not _fits(kind, value):
            got = type(value).__name__ if value is not None else "None"
            if kind == "number" and isinstance(value, float):
                got = repr(value)
            raise UserError(f"{function}: {name} must be {_KINDS[kind]}, got {got}")


def check_hparams(function: str, hparams: object) -> HParams | None:
    """`hparams` as an HParams: one already, a dict of its fields (checked like an --hparams file), or None."""
    if hparams is None or isinstance(hparams, HParams):
        return hparams
    if isinstance(hparams, dict):
        return HParams.from_dict(hparams, source=f"{function}: hparams")
    raise UserError(f"{function}: hparams must be an HParams or a dict of its fields, got {type(hparams).__name__}")


def _load_kwargs(log, device_map, max_memory) -> dict:
    """Editor's keyword arguments for loading: the log if given, and the device map (device_map.py)."""
    return {**({"log": log} if log else {}), "device_map": device_map, "max_memory": max_memory}


def _journal_meta(journal: str | Path) -> dict:
    """The stored model spec of an existing journal ({} if there is none yet)."""
    if not (Path(journal) / "journal.sqlite").exists():
        return {}
    with Journal(journal) as j:
        return {"model": j.get("model"), "module_template": j.get("module_template"), "dtype": j.get("dtype")}


@reads_journal
def log(
    journal: str | Path = "romebatch.journal",
    *,
    status: str | None = None,
    fact: str | None = None,
    since: int | None = None,
    limit: int | None = None,
) -> dict:
    """The journal's metadata, a summary, and its edits and rejections (no model needed).

    Filters (romebatch/logview.py): status applied | rolled_back | repaired | warned |
    rejected, one fact id, edits after `since`, the last `limit` (None: all).
    """
    from .logview import select

    check_args(
        "log",
        journal=(journal, "path"),
        status=(status, "text?"),
        fact=(fact, "text?"),
        since=(since, "count?"),
        limit=(limit, "count?"),
    )
    return select(_log_all(journal), status=status, fact=fact, since=since, limit=limit)


def _log_all(journal: str | Path) -> dict:
    with Journal(journal) as j:
        # A repair edits a fact already on its path (romebatch/repair.py).
        seen, repairs = set(), set()
        for seq, fact_hash in j.lineage_facts():
            if fact_hash in seen:
                repairs.add(seq)
            seen.add(fact_hash)
        status = j.status()
        return {
            "journal": str(j.directory),
            "head": j.head,
            "model": j.get("model"),
            "base_hash": j.get("base_hash"),
            "weights_hash": j.get("weights_hash"),  # None in journals written before it was recorded
            "tokenizer_hash": j.get("tokenizer_hash"),
            "edits": [
                {
                    "seq": r.seq,
                    "parent": r.parent,
                    "status": status[r.seq],
                    "repair": r.seq in repairs,
                    "fact_id": r.fact_id,
                    "subject": r.fact["subject"],
                    "target_new": r.fact["target_new"],
                    "layer": r.layer,
                    "update_norm": r.update_norm,
                    "denominator": r.denominator,
                    "p_new_before": r.p_new_before,
                    "p_new_after": r.p_new_after,
                    "p_true_after": r.p_true_after,
                    "seconds": r.seconds_total,
                    "created_at": r.created_at,
                    "warning": r.warning,
                    "p_true_before": r.p_true_before,
                    "neighborhood_drop": r.neighborhood_drop,
                    "probe_regression": r.probe_regression,
                    "retention": r.retention,
                    "v_steps": r.v_steps,
                    "fact": r.fact,
                }
                for r in j.edits()
            ],
            "rejections": [{k: v for k, v in row.items() if k != "fact_json"} for row in j.rejections()],
        }


@reads_journal
def check(
    journal: str | Path = "romebatch.journal",
    *,
    model: str | None = None,
    device: str = "cpu",
    log=None,
    lm=None,
    device_map=None,
    max_memory=None,
):
    """Verify the journal: the file itself (no model needed), then every edit's stored hashes by replay."""
    from .audit import audit, damaged_edits
    from .editor import CheckReport

    check_args(
        "check",
        journal=(journal, "path"),
        model=(model, "model?"),
        device=(device, "text"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    kwargs = _load_kwargs(log, device_map, max_memory)
    # The file itself first, without a model: damage is named in seconds, and replay runs
    # only when the rows it reads are sound enough to replay.
    with Journal(journal) as j:
        problems = audit(j.db)
        if problems:
            try:
                edits = j.db.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
                head, chain = j.head, j.chain()
            except (UserError, sqlite3.DatabaseError):
                edits, head, chain = 0, 0, None
    if not problems:
        with Editor(journal, model=model, device=device, write=False, verify=False, lm=lm, **kwargs) as editor:
            return editor.check()
    damaged = damaged_edits(problems)
    if chain is None or damaged is None:  # the tables or meta themselves: no state to go back to
        return CheckReport(
            journal=str(journal), edits=edits, head=head, problems=problems, last_good=0, structural=True
        )
    last_good = 0
    for seq in chain:
        if seq in damaged:
            break
        last_good = seq
    return CheckReport(
        journal=str(journal),
        edits=edits,
        head=head,
        problems=problems,
        last_good=last_good if damaged & set(chain) else head,
    )


@reads_journal
def verify(
    journal: str | Path = "romebatch.journal",
    *,
    manifest: str | Path | Manifest | None = None,
    thresholds=None,
    results: str | Path | None = None,
    model: str | None = None,
    device: str = "cpu",
    log=None,
    progress=None,
    device_map=None,
    max_memory=None,
):
    """Score the head against the base model on every applied fact; see `romebatch.specificity`.

    When nothing is scored (no edit on the head's path, or a `manifest` none of whose facts is
    applied there) the report is not ok, with a problem that says so: the CLI exits 1, as on
    a regression, never 0 with "0 facts within thresholds"."""
    from .report import check_results_path
    from .specificity import VerifyThresholds, score_head

    check_args(
        "verify",
        journal=(journal, "path"),
        manifest=(manifest, "manifest?"),
        results=(results, "path?"),
        model=(model, "model?"),
        device=(device, "text"),
        log=(log, "function?"),
        progress=(progress, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    check_results_path(results)
    loaded = load_manifest(manifest) if manifest else None
    facts = loaded.facts if loaded is not None else None
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        report = score_head(editor, thresholds or VerifyThresholds(), facts, progress=progress)
    if not report.rows:  # a gate that measured nothing must not pass ("0 facts, within thresholds")
        where = f"none of the facts of --manifest {loaded.path}" if loaded is not None else "no fact"
        report.problems.append(
            f"nothing was measured: {where} is applied on the head's path of journal {report.journal}"
        )
    if results:
        from .report import write_verify_results

        write_verify_results(report.rows, results)
    return report


def trace(
    prompt: str | None = None,
    subject: str | None = None,
    answer: str | None = None,
    *,
    facts_file: str | Path | Manifest | None = None,
    limit: int | None = None,
    model: str | None = None,
    device: str = "cpu",
    samples: int = 10,
    noise: float = 3.0,
    window: int = 10,
    kinds=("hidden", "mlp", "attn"),
    seed: int = 0,
    log=None,
    progress=None,
    journal: str | Path | None = None,
    device_map=None,
    max_memory=None,
):
    """Causal tracing: one fact (every cell, each kind), or the MLP effect averaged over a file of facts.

    The model: `model`, else `journal`'s model (if that journal exists), else the embedded one.

    Returns a TraceResult for one fact, or (effect by layer, recommended layer, results) for a file;
    the file form also caches the recommendation for `apply --layer auto`.
    """
    from .causal_trace import average_trace, trace_fact
    from .layer_cache import save_recommendation
    from .model import load_model
    from .trace_facts import check_trace_fact, read_trace_facts

    check_args(
        "trace",
        prompt=(prompt, "text?"),
        subject=(subject, "text?"),
        answer=(answer, "text?"),
        facts_file=(facts_file, "manifest?"),
        limit=(limit, "count?"),
        model=(model, "model?"),
        device=(device, "text"),
        samples=(samples, "count"),
        noise=(noise, "number"),
        window=(window, "count"),
        seed=(seed, "count"),
        log=(log, "function?"),
        progress=(progress, "function?"),
        journal=(journal, "path?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    kwargs = {"log": log} if log else {}
    if facts_file is None and (prompt is None or subject is None):
        raise UserError("give --prompt and --subject, or --facts FILE")
    # Everything the user gave is checked before the model loads (minutes on a large model).
    if facts_file is None:
        assert prompt is not None and subject is not None
        check_trace_fact(prompt, subject, answer)
        facts = []
    else:
        facts = read_trace_facts(facts_file, limit)
    stored = _journal_meta(journal) if journal is not None and model is None else {}
    lm = load_model(
        model or stored.get("model"),
        device=device,
        dtype=stored.get("dtype") or "float32",
        module_template=stored.get("module_template"),
        device_map=device_map,
        max_memory=max_memory,
        **kwargs,
    )
    if facts_file is None:
        assert prompt is not None and subject is not None  # refused above, before loading the model
        return trace_fact(
            lm, prompt, subject, answer, kinds=kinds, samples=samples, noise=noise, window=window, seed=seed
        )
    effect, layer, results = average_trace(
        lm, facts, samples=samples, noise=noise, window=window, seed=seed, progress=progress
    )
    save_recommendation(lm, layer, effect, len(facts))
    return effect, layer, results


def compare(
    journal: str | Path = "romebatch.journal",
    *,
    facts_file: str | Path | Manifest | None = None,
    fact_ids=(),
    prompts=(),
    at: int | None = None,
    max_new_tokens: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    results: str | Path | None = None,
    model: str | None = None,
    device: str = "cpu",
    log=None,
    device_map=None,
    max_memory=None,
):
    """Base model vs journal state `at` (default: the head), prompt by prompt; see `romebatch.comparison`.

    Selectors: a manifest (`facts_file`), journal fact ids, free `prompts`; none of them: a
    seeded sample of `sample` facts edited on the state's path.
    """
    from .comparison import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLE, select_facts
    from .comparison import compare as run_compare

    check_args(
        "compare",
        journal=(journal, "path"),
        facts_file=(facts_file, "manifest?"),
        at=(at, "count?"),
        max_new_tokens=(max_new_tokens, "count?"),
        sample=(sample, "count?"),
        seed=(seed, "count"),
        results=(results, "path?"),
        model=(model, "model?"),
        device=(device, "text"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    if isinstance(fact_ids, str) or isinstance(prompts, str):
        raise UserError("compare: fact_ids and prompts must be lists of text, not one str")
    if not all(isinstance(x, str) for x in [*fact_ids, *prompts]):
        raise UserError("compare: fact_ids and prompts must hold text (str) only")
    if facts_file is not None and fact_ids:
        raise UserError("choose --facts MANIFEST or --fact ID, not both")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if results is not None and Path(results).suffix not in (".parquet", ".csv"):
        raise UserError(f"--results {results}: use a .parquet or .csv file name")
    manifest_facts = load_manifest(facts_file).facts if facts_file else None
    # Everything the user named is checked before the model is loaded.
    with Journal(journal) as j:
        if at is not None and at != 0:
            if at < 0:
                raise UserError(f"--at {at}: give an edit number (0 = the base model)")
            j.edit(at)
        facts = select_facts(
            j,
            manifest_facts=manifest_facts,
            fact_ids=list(fact_ids),
            prompts=list(prompts),
            at=at,
            sample=DEFAULT_SAMPLE if sample is None else sample,
            seed=seed,
        )
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        report = run_compare(
            editor,
            facts,
            list(prompts),
            at=at,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
        )
    if results:
        from .comparison import write_compare_results

        write_compare_results(report, results)
    return report


def curves(journal: str | Path = "romebatch.journal", *, every: int = 100, out: str | Path | None = None) -> dict:
    """Scores, repairs, warnings and rejections per window of `every` edits, from the journal alone.

    `out` also draws them as a PNG. See romebatch/quality_curves.py for what each number is.
    """
    from .quality_curves import curves as read_curves
    from .quality_curves import save_png

    check_args("curves", journal=(journal, "path"), every=(every, "count"), out=(out, "path?"))
    if out is not None and Path(out).suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name")
    report = read_curves(journal, every)
    if out is not None:
        save_png(report, out)
    return report
