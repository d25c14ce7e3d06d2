"""One-call functions for Python users; the CLI calls exactly these."""

from __future__ import annotations

from pathlib import Path

from .editor import ApplyResult, Editor, StopRequest, stop_on_signals
from .errors import UserError
from .hparams import HParams
from .journal import Journal
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
    dtype: str = "float32",
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
    lm = load_model(model or stored.get("model"), device=device, dtype=dtype,
                    module_template=module_template or stored.get("module_template"), device_map=device_map,
                    max_memory=max_memory, **kwargs)
    longest_prefix = max((n for n, _ in (hparams or HParams()).prefixes), default=0)
    check_facts_for_model(lm, facts, longest_prefix)
    if layer == "auto":
        layer = auto_layer(lm, facts, log=log)
    with Editor(journal, lm=lm, module_template=module_template, hparams=hparams, create=True, **kwargs) as editor:
        editor.stats_progress = stats_progress
        stop = StopRequest()
        with stop_on_signals(stop, editor.log):
            result = editor.apply(facts, layer=layer, on_edit=on_edit, stop=stop, checks=checks,
                                  on_regression=on_regression, repair_every=repair_every)
    if results:
        from .report import write_results

        write_results(result.results, results)
    return result


AUTO_LAYER_FACTS = 20


def auto_layer(lm, facts, log=None) -> int:
    """The traced edit layer for this model: cached, else traced once on up to 20 of the facts."""
    from .trace import average_trace, load_recommendation, save_recommendation

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
        return {"model": j.get("model"), "module_template": j.get("module_template")}


def rollback(journal: str | Path = "romebatch.journal", *, to: int | None = None, steps: int | None = None,
             fact: str | None = None, base: bool = False, prune: bool = False, model: str | None = None,
             device: str = "cpu", log=None, device_map=None, max_memory=None) -> int:
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


def export(outdir: str | Path, *, journal: str | Path = "romebatch.journal", model: str | None = None,
           device: str = "cpu", force: bool = False, log=None, device_map=None, max_memory=None) -> Path:
    """Write the journal's head state as a model folder that transformers loads."""
    from .editor import check_export_target

    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    check_export_target(Path(outdir), force)
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        return editor.export(outdir, force=force)


def log(journal: str | Path = "romebatch.journal") -> dict:
    """The journal's metadata and edits (no model needed)."""
    with Journal(journal) as j:
        # A repair edits a fact already on its path (romebatch/repair.py).
        seen, repairs = set(), set()
        for seq, fact_hash in j.path_facts():
            if fact_hash in seen:
                repairs.add(seq)
            seen.add(fact_hash)
        return {
            "journal": str(j.directory), "head": j.head, "model": j.get("model"), "base_hash": j.get("base_hash"),
            "edits": [{
                "seq": r.seq, "parent": r.parent, "status": r.status, "repair": r.seq in repairs,
                "fact_id": r.fact_id, "subject": r.fact["subject"],
                "target_new": r.fact["target_new"], "layer": r.layer, "update_norm": r.update_norm,
                "denominator": r.denominator, "p_new_before": r.p_new_before, "p_new_after": r.p_new_after,
                "p_true_after": r.p_true_after, "seconds": r.seconds_total, "created_at": r.created_at,
            } for r in j.edits()],
            "rejections": [{k: v for k, v in row.items() if k != "fact_json"} for row in j.rejections()],
        }


def pending_facts(facts, journal: str | Path):
    """Facts not yet applied (or rejected) in `journal`; all of them if it does not exist yet."""
    if not (Path(journal) / "journal.sqlite").exists():
        return list(facts)
    with Journal(journal) as j:
        settled = j.settled_hashes()
    return [f for f in facts if f.hash not in settled]


def check(journal: str | Path = "romebatch.journal", *, model: str | None = None, device: str = "cpu", log=None,
          device_map=None, max_memory=None):
    """Verify the journal: schema, base model identity, and every edit's stored hashes by replay."""
    from .audit import audit
    from .editor import CheckReport

    kwargs = _load_kwargs(log, device_map, max_memory)
    # The file itself first, without a model: a damaged journal is named in seconds, and
    # replay only ever runs on rows whose structure is sound.
    with Journal(journal) as j:
        problems = audit(j.db)
        if problems:
            edits = j.db.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
            head = j.db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
            return CheckReport(journal=str(j.directory), edits=edits, head=head[0] if head else 0, problems=problems,
                               last_good=0, structural=True)
    with Editor(journal, model=model, device=device, write=False, verify=False, **kwargs) as editor:
        return editor.check()


def verify(journal: str | Path = "romebatch.journal", *, manifest: str | Path | None = None, thresholds=None,
           results: str | Path | None = None, model: str | None = None, device: str = "cpu", log=None, progress=None,
           device_map=None, max_memory=None):
    """Score the head against the base model on every applied fact; see `romebatch.verify`."""
    from .verify import VerifyThresholds, verify as run_verify

    from .report import check_results_path

    check_results_path(results)
    facts = load_manifest(manifest).facts if manifest else None
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        report = run_verify(editor, thresholds or VerifyThresholds(), facts, progress=progress)
    if results:
        from .report import write_verify_results

        write_verify_results(report.rows, results)
    return report


def trace(prompt: str | None = None, subject: str | None = None, answer: str | None = None, *,
          facts_file: str | Path | None = None, limit: int | None = None, model: str | None = None,
          device: str = "cpu", samples: int = 10, noise: float = 3.0, window: int = 10, kinds=("hidden", "mlp", "attn"),
          seed: int = 0, log=None, progress=None, device_map=None, max_memory=None):
    """Causal tracing: one fact (every cell, each kind), or the MLP effect averaged over a file of facts.

    Returns a TraceResult for one fact, or (effect by layer, recommended layer, results) for a file;
    the file form also caches the recommendation for `apply --layer auto`.
    """
    from .errors import UserError
    from .model import load_model
    from .trace import average_trace, read_trace_facts, save_recommendation, trace_fact

    kwargs = {"log": log} if log else {}
    if facts_file is None and (prompt is None or subject is None):
        raise UserError("give --prompt and --subject, or --facts FILE")
    lm = load_model(model, device=device, device_map=device_map, max_memory=max_memory, **kwargs)
    if facts_file is None:
        if subject not in prompt:
            raise UserError(f"--subject {subject!r} does not occur in --prompt")
        return trace_fact(lm, prompt, subject, answer, kinds=kinds, samples=samples, noise=noise, window=window,
                          seed=seed)
    facts = read_trace_facts(facts_file, limit)
    effect, layer, results = average_trace(lm, facts, samples=samples, noise=noise, window=window, seed=seed,
                                           progress=progress)
    save_recommendation(lm, layer, effect, len(facts))
    return effect, layer, results
