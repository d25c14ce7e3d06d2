"""One-call functions for Python users; the CLI calls exactly these."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .editor import ApplyResult, Editor, StopRequest, stop_on_signals
from .errors import UserError
from .hparams import HParams
from .journal import Journal, reads_journal
from .manifest import load_manifest
from .probes import Thresholds

DEFAULT_CHECKS = Thresholds()
# A repair pass (romebatch/repair.py) after every 100 edits and at the end of a run: at
# ~0.04 s a fact per check, it costs under 5% of the edits' time up to thousands of facts.
REPAIR_EVERY = 100


def apply(
    manifest: str | Path,
    *,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    layer: int | str | None = None,
    limit: int | None = None,
    hparams: HParams | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    module_template: str | None = None,
    results: str | Path | None = None,
    checks=DEFAULT_CHECKS,
    on_regression: str = "warn",
    repair_every: int | None = REPAIR_EVERY,
    on_edit=None,
    stats_progress=None,
    log=None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    retry_rejected: bool = False,
    on_stage=None,
) -> ApplyResult:
    """Validate `manifest` (nothing is written if it is bad), then apply its pending facts."""
    from .model import load_model
    from .preflight import check_facts_for_model
    from .report import check_results_path

    if on_regression not in ("warn", "skip", "stop"):
        raise UserError(f"on_regression {on_regression!r}: choose warn, skip or stop")
    check_results_path(results)
    facts = load_manifest(manifest, limit=limit).facts
    kwargs = {"log": log} if log else {}
    # The model is loaded (and the facts checked against its tokenizer) before the journal
    # is created or locked: bad input writes nothing.
    stored = _journal_meta(journal)
    lm = load_model(
        model or stored.get("model"),
        device=device,
        dtype=dtype or stored.get("dtype") or "float32",
        module_template=module_template or stored.get("module_template"),
        device_map=device_map,
        max_memory=max_memory,
        **kwargs,
    )
    longest_prefix = max((n for n, _ in (hparams or HParams()).prefixes), default=0)
    check_facts_for_model(lm, facts, longest_prefix)
    if layer == "auto":
        layer = auto_layer(lm, facts, log=log)
    with Editor(journal, lm=lm, module_template=module_template, hparams=hparams, create=True, **kwargs) as editor:
        editor.stats_progress = stats_progress
        editor.on_stage = on_stage
        stop = StopRequest()
        with stop_on_signals(stop, editor.log):
            result = editor.apply(
                facts,
                layer=layer,
                on_edit=on_edit,
                stop=stop,
                checks=checks,
                on_regression=on_regression,
                repair_every=repair_every,
                retry_rejected=retry_rejected,
            )
    if results:
        from .report import write_results

        write_results(result.results, results, metadata=result.summary())
    return result


AUTO_LAYER_FACTS = 20


def auto_layer(lm, facts, log=None) -> int:
    """The traced edit layer for this model: cached, else traced once on up to 20 of the facts."""
    from .causal_trace import average_trace
    from .layer_cache import load_recommendation, save_recommendation

    cached = load_recommendation(lm)
    if cached is not None:
        return cached
    sample = [(f.text, f.subject, f.target_true) for f in facts[:AUTO_LAYER_FACTS]]
    if log:
        log(f"--layer auto: causal tracing of {len(sample)} facts to find the edit layer (once, then cached)...")
    effect, layer, _ = average_trace(lm, sample)
    save_recommendation(lm, layer, effect, len(sample))
    if log:
        log(f"--layer auto: layer {layer} (MLP effect at the subject's last token)")
    return layer


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
def rollback(
    journal: str | Path = "romebatch.journal",
    *,
    to: int | None = None,
    steps: int | None = None,
    fact: str | None = None,
    base: bool = False,
    prune: bool = False,
    model: str | None = None,
    device: str = "cpu",
    log=None,
    device_map=None,
    max_memory=None,
) -> int:
    """Move the journal's head to an earlier (or another) state, checked by replay; returns the head."""
    from .editor import check_rollback_selector

    check_rollback_selector(to=to, steps=steps, fact=fact, base=base)
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, create=False, **kwargs) as editor:
        head = editor.rollback(to=to, steps=steps, fact=fact, base=base)
        if prune:
            editor.prune()
        return head


@reads_journal
def export(
    outdir: str | Path,
    *,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    device: str = "cpu",
    force: bool = False,
    dtype: str | None = None,
    log=None,
    device_map=None,
    max_memory=None,
) -> Path:
    """Write the journal's head state as a model folder that transformers loads (`dtype`: cast on writing)."""
    from .editor import check_export_target
    from .export_card import EXPORT_DTYPES

    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    check_export_target(Path(outdir), force)
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        return editor.export(outdir, force=force, dtype=dtype)


def export_adapter(
    outdir: str | Path,
    *,
    journal: str | Path = "romebatch.journal",
    rank: int | None = None,
    model: str | None = None,
    device: str = "cpu",
    force: bool = False,
    log=None,
):
    """Write the journal's head as a PEFT LoRA adapter folder (romebatch/lora.py); returns its AdapterReport.

    The journal is replayed on its base model first, every stored hash checked, so an
    adapter is only ever made of edits that reproduce the journal's recorded weights.
    """
    from .lora import write_adapter

    kwargs = {"log": log} if log else {}
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        provenance = editor.provenance()
        return write_adapter(
            outdir,
            editor.journal.path(),
            conv1d=editor.lm.adapter.conv1d,
            base_model=editor.journal.get("model"),
            base_hash=editor.base_hash,
            head=editor.head,
            journal=str(journal),
            rank=rank,
            force=force,
            provenance=provenance,
        )


def bundle(journal: str | Path, out: str | Path, *, first: int | None = None, last: int | None = None) -> dict:
    """Write edits `first`..`last` of the journal's head's path as one verified file (romebatch/bundle_file.py)."""
    from .bundle_file import write_bundle

    return write_bundle(journal, out, first=first, last=last)


def apply_bundle(
    bundle: str | Path,
    *,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    device: str = "cpu",
    dry_run: bool = False,
    log=None,
):
    """Append a bundle's edits to `journal` without recomputing them, every weight hash verified first."""
    from .bundle_file import apply_bundles

    return apply_bundles([bundle], journal, model=model, device=device, dry_run=dry_run, log=log)[0]


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

    return select(_log_all(journal), status=status, fact=fact, since=since, limit=limit)


def _log_all(journal: str | Path) -> dict:
    with Journal(journal) as j:
        # A repair edits a fact already on its path (romebatch/repair.py).
        seen, repairs = set(), set()
        for seq, fact_hash in j.path_facts():
            if fact_hash in seen:
                repairs.add(seq)
            seen.add(fact_hash)
        return {
            "journal": str(j.directory),
            "head": j.head,
            "model": j.get("model"),
            "base_hash": j.get("base_hash"),
            "edits": [
                {
                    "seq": r.seq,
                    "parent": r.parent,
                    "status": r.status,
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
def pending_facts(facts, journal: str | Path, retry_rejected: bool = False):
    """Facts not yet applied (or rejected, unless `retry_rejected`) in `journal`; all if it does not exist yet."""
    if not (Path(journal) / "journal.sqlite").exists():
        return list(facts)
    with Journal(journal) as j:
        settled = j.applied_hashes() if retry_rejected else j.settled_hashes()
    return [f for f in facts if f.hash not in settled]


@reads_journal
def rerun_counts(facts, journal: str | Path) -> dict:
    """What a re-run does with `facts`: how many are applied already, rejected earlier, rolled back."""
    if not (Path(journal) / "journal.sqlite").exists():
        return {"applied": 0, "rejected": 0, "rolled_back": 0}
    with Journal(journal) as j:
        applied, rejected = j.applied_hashes(), j.rejected_hashes()
        rolled = {h for (h,) in j.db.execute("SELECT fact_hash FROM edits WHERE status = 'rolled_back'")}
        rolled -= applied | rejected  # a rejection on the path still keeps a rolled-back fact out
    hashes = [f.hash for f in facts]
    return {
        "applied": sum(h in applied for h in hashes),
        "rejected": sum(h in rejected and h not in applied for h in hashes),
        "rolled_back": sum(h in rolled for h in hashes),
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
    from .errors import UserError

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
    manifest: str | Path | None = None,
    thresholds=None,
    results: str | Path | None = None,
    model: str | None = None,
    device: str = "cpu",
    log=None,
    progress=None,
    device_map=None,
    max_memory=None,
):
    """Score the head against the base model on every applied fact; see `romebatch.specificity`."""
    from .report import check_results_path
    from .specificity import VerifyThresholds, score_head

    check_results_path(results)
    facts = load_manifest(manifest).facts if manifest else None
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        report = score_head(editor, thresholds or VerifyThresholds(), facts, progress=progress)
    if results:
        from .report import write_verify_results

        write_verify_results(report.rows, results)
    return report


def trace(
    prompt: str | None = None,
    subject: str | None = None,
    answer: str | None = None,
    *,
    facts_file: str | Path | None = None,
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
    from .errors import UserError
    from .layer_cache import save_recommendation
    from .model import load_model
    from .trace_facts import read_trace_facts

    kwargs = {"log": log} if log else {}
    if facts_file is None and (prompt is None or subject is None):
        raise UserError("give --prompt and --subject, or --facts FILE")
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
        if subject not in prompt:
            raise UserError(f"--subject {subject!r} does not occur in --prompt")
        return trace_fact(
            lm, prompt, subject, answer, kinds=kinds, samples=samples, noise=noise, window=window, seed=seed
        )
    facts = read_trace_facts(facts_file, limit)
    effect, layer, results = average_trace(
        lm, facts, samples=samples, noise=noise, window=window, seed=seed, progress=progress
    )
    save_recommendation(lm, layer, effect, len(facts))
    return effect, layer, results


def compare(
    journal: str | Path = "romebatch.journal",
    *,
    facts_file: str | Path | None = None,
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
):
    """Base model vs journal state `at` (default: the head), prompt by prompt; see `romebatch.comparison`.

    Selectors: a manifest (`facts_file`), journal fact ids, free `prompts`; none of them: a
    seeded sample of `sample` facts edited on the state's path.
    """
    from .comparison import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLE, select_facts
    from .comparison import compare as run_compare
    from .errors import UserError

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
    kwargs = {"log": log} if log else {}
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
    from .errors import UserError
    from .quality_curves import curves as read_curves
    from .quality_curves import save_png

    if out is not None and Path(out).suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name")
    report = read_curves(journal, every)
    if out is not None:
        save_png(report, out)
    return report


def edit(
    subject: str,
    prompt: str,
    target_new: str,
    *,
    target_true: str | None = None,
    id: str | None = None,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    hparams: HParams | None = None,
    checks=DEFAULT_CHECKS,
    log=None,
):
    """One fact, one call (for notebooks): validate it, edit it into `journal`, return its FactResult.

        romebatch.edit(subject="The Space Needle", prompt="{} is located in the city of",
                       target_new="Paris", target_true="Seattle")

    `prompt` has "{}" where the subject goes, or contains the subject verbatim. The fact is
    journaled like any other: `log`, `compare`, `rollback` and `export` see it.
    """
    from .manifest import fact_from_dict
    from .model import load_model
    from .preflight import check_facts_for_model

    record = {"subject": subject, "prompt": prompt, "target_new": target_new, "source": "romebatch.edit"}
    if target_true is not None:
        record["target_true"] = target_true
    record["id"] = id if id is not None else "edit"
    fact = fact_from_dict(record)  # the manifest's validation: one clear error for a bad fact
    if id is None:  # named by its content, like the journal identifies it
        import dataclasses

        fact = dataclasses.replace(fact, id="edit-" + fact.hash.split(":")[-1][:8])
    kwargs = {"log": log} if log else {}
    stored = _journal_meta(journal)
    lm = load_model(
        model or stored.get("model"),
        device=device,
        dtype=dtype or stored.get("dtype") or "float32",
        module_template=stored.get("module_template"),
        **kwargs,
    )
    check_facts_for_model(lm, [fact], max((n for n, _ in (hparams or HParams()).prefixes), default=0))
    with Editor(journal, lm=lm, hparams=hparams, **kwargs) as editor:
        result = editor.apply([fact], checks=checks)
    return result.results[0]
