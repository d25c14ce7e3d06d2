"""One-call functions for Python users; the CLI calls exactly these."""

from __future__ import annotations

from pathlib import Path

from .editor import ApplyResult, Editor, StopRequest, stop_on_signals
from .hparams import HParams
from .journal import Journal
from .manifest import load_manifest
from .probes import Thresholds

DEFAULT_CHECKS = Thresholds()


def apply(
    manifest: str | Path,
    *,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    layer: int | None = None,
    limit: int | None = None,
    hparams: HParams | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    module_template: str | None = None,
    results: str | Path | None = None,
    checks=DEFAULT_CHECKS,
    on_regression: str = "warn",
    on_edit=None,
    stats_progress=None,
    log=None,
) -> ApplyResult:
    """Validate `manifest` (nothing is written if it is bad), then apply its pending facts."""
    from .model import load_model
    from .preflight import check_facts_for_model

    facts = load_manifest(manifest, limit=limit).facts
    kwargs = {"log": log} if log else {}
    # The model is loaded (and the facts checked against its tokenizer) before the journal
    # is created or locked: bad input writes nothing.
    stored = _journal_meta(journal)
    lm = load_model(model or stored.get("model"), device=device, dtype=dtype,
                    module_template=module_template or stored.get("module_template"), **kwargs)
    longest_prefix = max((n for n, _ in (hparams or HParams()).prefixes), default=0)
    check_facts_for_model(lm, facts, longest_prefix)
    with Editor(journal, lm=lm, module_template=module_template, hparams=hparams, **kwargs) as editor:
        editor.stats_progress = stats_progress
        stop = StopRequest()
        with stop_on_signals(stop, editor.log):
            result = editor.apply(facts, layer=layer, on_edit=on_edit, stop=stop, checks=checks,
                                  on_regression=on_regression)
    if results:
        from .report import write_results

        write_results(result.results, results)
    return result


def _journal_meta(journal: str | Path) -> dict:
    """The stored model spec of an existing journal ({} if there is none yet)."""
    if not (Path(journal) / "journal.sqlite").exists():
        return {}
    with Journal(journal) as j:
        return {"model": j.get("model"), "module_template": j.get("module_template")}


def rollback(journal: str | Path = "romebatch.journal", *, to: int | None = None, steps: int | None = None,
             fact: str | None = None, base: bool = False, prune: bool = False, model: str | None = None,
             device: str = "cpu", log=None) -> int:
    """Move the journal's head to an earlier (or another) state, checked by replay; returns the head."""
    kwargs = {"log": log} if log else {}
    with Editor(journal, model=model, device=device, **kwargs) as editor:
        head = editor.rollback(to=to, steps=steps, fact=fact, base=base)
        if prune:
            editor.prune()
        return head


def export(outdir: str | Path, *, journal: str | Path = "romebatch.journal", model: str | None = None,
           device: str = "cpu", force: bool = False, log=None) -> Path:
    """Write the journal's head state as a model folder that transformers loads."""
    kwargs = {"log": log} if log else {}
    with Editor(journal, model=model, device=device, **kwargs) as editor:
        return editor.export(outdir, force=force)


def log(journal: str | Path = "romebatch.journal") -> dict:
    """The journal's metadata and edits (no model needed)."""
    with Journal(journal) as j:
        return {
            "journal": str(j.directory), "head": j.head, "model": j.get("model"), "base_hash": j.get("base_hash"),
            "edits": [{
                "seq": r.seq, "parent": r.parent, "status": r.status, "fact_id": r.fact_id, "subject": r.fact["subject"],
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
        done = j.applied_hashes() | j.rejected_hashes()
    return [f for f in facts if f.hash not in done]


def check(journal: str | Path = "romebatch.journal", *, model: str | None = None, device: str = "cpu", log=None):
    """Verify the journal: schema, base model identity, and every edit's stored hashes by replay."""
    from .editor import CheckReport  # noqa: F401  (the return type)

    kwargs = {"log": log} if log else {}
    with Editor(journal, model=model, device=device, write=False, verify=False, **kwargs) as editor:
        return editor.check()


def verify(journal: str | Path = "romebatch.journal", *, manifest: str | Path | None = None, thresholds=None,
           results: str | Path | None = None, model: str | None = None, device: str = "cpu", log=None, progress=None):
    """Score the head against the base model on every applied fact; see `romebatch.verify`."""
    from .verify import VerifyThresholds, verify as run_verify

    facts = load_manifest(manifest).facts if manifest else None
    kwargs = {"log": log} if log else {}
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        report = run_verify(editor, thresholds or VerifyThresholds(), facts, progress=progress)
    if results:
        from .report import write_verify_results

        write_verify_results(report.rows, results)
    return report
