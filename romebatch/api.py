"""One-call functions for Python users; the CLI calls exactly these. This module holds the ones
that write (apply, edit, rollback, export, bundle); `api_read` the ones that only look."""

from __future__ import annotations

from pathlib import Path

from .api_read import check_args, check_hparams
from .editor import ApplyResult, Editor, StopRequest, stop_on_signals
from .errors import UserError
from .hparams import REPAIR_EVERY, REPAIR_SPAN, HParams, check_repair_options
from .journal import Journal, check_new_location, reads_journal
from .manifest import Manifest, load_manifest
from .probes import Thresholds

DEFAULT_CHECKS = Thresholds()


def apply(
    manifest: str | Path | Manifest,
    *,
    journal: str | Path = "romebatch.journal",
    model: str | None = None,
    layer: int | str | None = None,
    limit: int | None = None,
    hparams: HParams | dict | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    module_template: str | None = None,
    results: str | Path | None = None,
    checks=DEFAULT_CHECKS,
    on_regression: str = "warn",
    repair_every: int | None = REPAIR_EVERY,
    repair_span: int | None = REPAIR_SPAN,
    on_edit=None,
    stats_progress=None,
    log=None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    retry_rejected: bool = False,
    on_stage=None,
) -> ApplyResult:
    """Validate `manifest` (nothing is written if it is bad), then apply its pending facts.

    `manifest`: a path ("-": standard input), or a Manifest already loaded (`load_manifest`),
    which is not read again; the CLI passes the one it validated.
    """
    from .model import load_model
    from .preflight import check_facts_for_model
    from .report import check_results_path

    check_args(
        "apply",
        manifest=(manifest, "manifest"),
        journal=(journal, "path"),
        model=(model, "model?"),
        layer=(layer, "layer?"),
        limit=(limit, "count?"),
        device=(device, "text"),
        dtype=(dtype, "text?"),
        module_template=(module_template, "text?"),
        results=(results, "path?"),
        on_regression=(on_regression, "text"),
        repair_every=(repair_every, "count?"),
        repair_span=(repair_span, "count?"),
        on_edit=(on_edit, "function?"),
        stats_progress=(stats_progress, "function?"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
        retry_rejected=(retry_rejected, "flag"),
        on_stage=(on_stage, "function?"),
    )
    hp = check_hparams("apply", hparams)
    if on_regression not in ("warn", "skip", "stop"):
        raise UserError(f"on_regression {on_regression!r}: choose warn, skip or stop")
    check_repair_options(repair_every, repair_span)  # before the journal is created
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
    longest_prefix = max((n for n, _ in (hp or HParams()).prefixes), default=0)
    check_facts_for_model(lm, facts, longest_prefix)
    if layer == "auto":
        layer = auto_layer(lm, facts, log=log)
    with Editor(journal, lm=lm, module_template=module_template, hparams=hp, create=True, **kwargs) as editor:
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
                repair_span=repair_span,
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

    cached = load_recommendation(lm, log=log)
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
    from .editor import check_rollback_selector, rollback_target

    check_args(
        "rollback",
        journal=(journal, "path"),
        to=(to, "count?"),
        steps=(steps, "count?"),
        fact=(fact, "text?"),
        base=(base, "flag"),
        prune=(prune, "flag"),
        model=(model, "model?"),
        device=(device, "text"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    check_rollback_selector(to=to, steps=steps, fact=fact, base=base)
    # A missing or damaged journal, or a selector naming no state, is refused before the model loads.
    with Journal(journal) as opened:
        rollback_target(opened, to=to, steps=steps, fact=fact, base=base)
    kwargs = _load_kwargs(log, device_map, max_memory)
    # The head need not replay: rolling back is how a damaged head is left behind, and the
    # target state is checked against its own stored hashes.
    with Editor(journal, model=model, device=device, create=False, verify=False, **kwargs) as editor:
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
    from .export_card import EXPORT_DTYPES
    from .model_export import check_export_target

    check_args(
        "export",
        outdir=(outdir, "path"),
        journal=(journal, "path"),
        model=(model, "model?"),
        device=(device, "text"),
        force=(force, "flag"),
        dtype=(dtype, "text?"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
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
    device_map=None,
    max_memory=None,
):
    """Write the journal's head as a PEFT LoRA adapter folder (romebatch/lora.py); returns its AdapterReport.

    The journal is replayed on its base model first, every stored hash checked, so an
    adapter is only ever made of edits that reproduce the journal's recorded weights.
    """
    from .lora import check_adapter_target, write_adapter

    check_args(
        "export_adapter",
        outdir=(outdir, "path"),
        journal=(journal, "path"),
        rank=(rank, "count?"),
        model=(model, "model?"),
        device=(device, "text"),
        force=(force, "flag"),
        log=(log, "function?"),
        device_map=(device_map, "mapping?"),
        max_memory=(max_memory, "mapping?"),
    )
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: give a rank of at least 1")
    with Journal(journal):  # a missing or damaged journal is refused before the model loads
        pass
    check_adapter_target(Path(outdir), force)
    kwargs = _load_kwargs(log, device_map, max_memory)
    with Editor(journal, model=model, device=device, write=False, **kwargs) as editor:
        provenance = editor.provenance()
        return write_adapter(
            outdir,
            editor.journal.lineage(),
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

    check_args("bundle", journal=(journal, "path"), out=(out, "path"), first=(first, "count?"), last=(last, "count?"))
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
    from .bundle_apply import apply_bundles

    check_args(
        "apply_bundle",
        bundle=(bundle, "path"),
        journal=(journal, "path"),
        model=(model, "model?"),
        device=(device, "text"),
        dry_run=(dry_run, "flag"),
        log=(log, "function?"),
    )
    return apply_bundles([bundle], journal, model=model, device=device, dry_run=dry_run, log=log)[0]


@reads_journal
def pending_facts(facts, journal: str | Path, retry_rejected: bool = False):
    """Facts not yet applied (or rejected, unless `retry_rejected`) in `journal`; all if it does not exist yet."""
    from .editor import pending_facts as pending

    if not (Path(journal) / "journal.sqlite").exists():
        check_new_location(journal)  # a run would refuse it: so does a dry run
        return list(facts)
    with Journal(journal) as j:
        return pending(facts, j, retry_rejected)


@reads_journal
def rerun_counts(facts, journal: str | Path) -> dict:
    """What a re-run does with `facts`: how many are applied already, rejected earlier, rolled back."""
    if not (Path(journal) / "journal.sqlite").exists():
        return {"applied": 0, "rejected": 0, "rolled_back": 0}
    with Journal(journal) as j:
        applied, rejected = j.applied_hashes(), j.rejected_hashes()
        rolled = j.rolled_back_hashes()
        rolled -= applied | rejected  # a rejection on the path still keeps a rolled-back fact out
    hashes = [f.hash for f in facts]
    return {
        "applied": sum(h in applied for h in hashes),
        "rejected": sum(h in rejected and h not in applied for h in hashes),
        "rolled_back": sum(h in rolled for h in hashes),
    }


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
    hparams: HParams | dict | None = None,
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

    check_args(
        "edit",
        subject=(subject, "text"),
        prompt=(prompt, "text"),
        target_new=(target_new, "text"),
        target_true=(target_true, "text?"),
        id=(id, "text?"),
        journal=(journal, "path"),
        model=(model, "model?"),
        device=(device, "text"),
        dtype=(dtype, "text?"),
        log=(log, "function?"),
    )
    hparams = check_hparams("edit", hparams)
    record = {"subject": subject, "prompt": prompt, "target_new": target_new, "source": "romebatch.edit"}
    if target_true is not None:
        record["target_true"] = target_true
    record["id"] = id if id is not None else "edit"
    fact = fact_from_dict(record)  # the manifest's validation: one clear error for a bad fact
    if id is None:  # named by its content, like the journal identifies it
        import dataclasses

        fact = dataclasses.replace(fact, id="edit-" + fact.hash.split(":")[-1][:8])
    one = Manifest(path="romebatch.edit", format="jsonl", facts=[fact], duplicates_dropped=0)
    # Exactly `apply` on a manifest of one fact, with no repair pass after it.
    result = apply(
        one,
        journal=journal,
        model=model,
        device=device,
        dtype=dtype,
        hparams=hparams,
        checks=checks,
        repair_every=0,
        log=log,
    )
    return result.results[0]


# The read-only functions live in api_read; `romebatch.api.X` stays the one place the CLI calls
# (and tests patch). Bound last, by assignment: `log` is also a parameter name above.
from . import api_read as _read  # noqa: E402

_journal_meta, _load_kwargs = _read._journal_meta, _read._load_kwargs
check, compare, curves, log, trace, verify = (
    _read.check,
    _read.compare,
    _read.curves,
    _read.log,
    _read.trace,
    _read.verify,
)
