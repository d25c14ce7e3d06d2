"""`romebatch tune`: measure the edit layer and clamp for the user's own model, on their own facts.

The defaults were measured on one model (RESULTS.md); every other model falls back to the
published GPT-2 XL values, which on Gemma-3-270M leaked into neighbours and drifted fast
under sequential editing. Tuning answers "which layer, which clamp?" by measurement:

1. A seeded sample of the manifest's facts (`sample`); the facts after it in the same
   shuffled order are kept apart for the sequential check (and for causal tracing).
2. Candidate layers: the causal trace's MLP effect at the subject's last token (the top
   `top_layers`), depth/4 (the published rule) and the measured default where the model
   has one (hparams.MEASURED), so tuning can only confirm or beat it. Clamp factors: `clamps`.
3. Grid: each fact is edited alone on the base weights, scored (ES, PS, NS) and rolled back
   byte for byte. A fact without neighbourhood prompts gets other facts' prompts of the same
   relation (the same template) with their true objects, as CounterFact builds them.
4. The best `seq_top` settings by the rule below go through a short sequential check:
   `seq_edits` facts applied one after another in a scratch journal, then NS scored.
5. The rule: settings whose single-edit NS is no more than `ns_tolerance` points below the
   unedited model's are eligible (all are, if none is); the `seq_top` with the highest S
   (harmonic mean of ES, PS, NS) are checked sequentially, and the one that loses the least
   NS there wins (ties: the higher single-edit S). Single-edit specificity does not predict
   sequential drift (layer 4 against layer 1 on Gemma), hence step 4.
6. The choice is saved as a preset keyed by the model's full hash (romebatch/presets.py);
   `apply` on that model then uses it where no flag or file says otherwise.

Every grid row and sequential result is appended to a JSONL results file as it is
computed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError, located
from .files import open_regular_file
from .hparams import MEASURED, HParams, resolve
from .manifest import Fact, Manifest

# The settings, the rule and its parts live in tuning_rule; named here too (tests, users).
from .tuning_rule import (  # noqa: F401
    DEFAULT_CLAMPS,
    NEIGHBOURS_PER_FACT,
    RULE,
    Setting,
    TuneResult,
    aggregate,
    candidate_layers,
    choose,
    fact_row,
    pick,
    with_relation_neighbours,
)


def _read_results(path: Path) -> list[dict]:
    """The rows an earlier `tune` appended to `path` (none if it does not exist yet), checked to be
    this command's rows before any model is loaded."""
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise UserError(f"--results {path}: the folder {path.parent} does not exist")
        return []
    with open_regular_file(str(path)) as handle:
        text = handle.read()
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a line cut short by a crash: it is recomputed
            continue
        if not (
            isinstance(row, dict) and isinstance(row.get("kind"), str) and isinstance(row.get("model_hash", ""), str)
        ):
            raise UserError(
                located(path, number, None, "not a row `romebatch tune` wrote (an object with a 'kind')"),
                hint="give another --results file",
            )
        rows.append(row)
    return rows


def tune(
    manifest: str | Path | Manifest,
    *,
    model: str | None = None,
    sample: int = 30,
    seed: int = 0,
    clamps: tuple[float, ...] = DEFAULT_CLAMPS,
    top_layers: int = 2,
    trace_facts: int = 10,
    seq_top: int = 2,
    seq_edits: int = 50,
    ns_tolerance: float = 2.0,
    hparams: HParams | None = None,
    results: str | Path | None = None,
    save: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    device_map=None,
    max_memory=None,
    lm=None,
    log: Callable[[str], None] = lambda message: None,
    progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Measure (layer, clamp) on `manifest`'s facts and save the winner as the model's preset."""
    from .causal_trace import average_trace
    from .layer_cache import save_recommendation
    from .manifest import load_manifest
    from .model import load_model
    from .presets import check_presets_file, save_preset
    from .rome import apply_edit, compute_edit, load_or_compute_stats, sample_prefixes
    from .scores import score_facts

    started = time.perf_counter()
    if sample < 1 or seq_edits < 1 or seq_top < 1 or top_layers < 0 or not clamps:
        raise UserError("tune: --sample, the sequential edits and candidates must be positive, and clamps non-empty")
    if any(not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0) for c in clamps):
        raise UserError(f"tune: clamp factors must be positive numbers, got {list(clamps)}")
    loaded = load_manifest(manifest)  # a path, or a Manifest read already (stdin)
    facts = loaded.facts
    if save:
        check_presets_file()  # a damaged presets file is refused now, not after minutes of tuning
    results_path = Path(results) if results else None
    done = _read_results(results_path) if results_path else []
    lm = lm or load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, log=log)
    base = hparams or HParams()
    model_hash = lm.full_hash()
    order = list(facts)
    random.Random(seed).shuffle(order)
    grid_facts = with_relation_neighbours(order)[:sample]
    held_out = order[sample:]
    # The sequential check edits facts the grid did not score, where the manifest has them.
    seq_facts = with_relation_neighbours(order)[sample : sample + seq_edits] if held_out else grid_facts[:seq_edits]
    for stored in done:
        if stored.get("model_hash") not in (None, model_hash):
            raise UserError(
                f"{results_path}: written for another model ({stored['model_hash'][:19]}…)",
                hint="give another --results file",
            )
    # Rows measured with other hyper-parameters, or on another sample, are not reused.
    config = hashlib.sha256(json.dumps(base.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    grid_ids, seq_ids = [f.id for f in grid_facts], [f.id for f in seq_facts]
    done = [
        r
        for r in done
        if r.get("kind") == "trace"
        or (r.get("kind") == "unedited" and r.get("ids") == grid_ids and r.get("seq_ids") == seq_ids)
        or (r.get("kind") == "single" and r.get("config") == config)
        or (r.get("kind") == "sequential" and r.get("config") == config and r.get("seq_ids") == seq_ids)
    ]
    written = open(results_path, "a", encoding="utf-8") if results_path else None

    def record(row: dict) -> None:
        row = {"model_hash": model_hash, "seed": seed, **row}
        done.append(row)
        if written:
            written.write(json.dumps(row) + "\n")
            written.flush()

    try:
        # -- candidate layers, from causal tracing on facts kept apart where there are any
        traced = next((r for r in done if r.get("kind") == "trace"), None)
        if traced is None:
            pool = (held_out or order)[:trace_facts]
            log(f"tune: causal tracing of {len(pool)} facts for the candidate layers...")
            effect, best, _ = average_trace(lm, [(f.text, f.subject, f.target_true) for f in pool])
            save_recommendation(lm, best, effect, len(pool))
            traced = {"kind": "trace", "effect": [float(x) for x in effect], "facts": len(pool)}
            record(traced)
        measured = MEASURED.get((lm.config.model_type, lm.n_layers), {}).get("layer")
        layers = candidate_layers(traced["effect"], lm.n_layers, top_layers, () if measured is None else (measured,))
        log(
            f"tune: layers {layers} (MLP effect top {top_layers}, depth/4, and any measured default) x clamps "
            f"{list(clamps)} "
            f"on {len(grid_facts)} facts"
        )

        unedited = next((r for r in done if r.get("kind") == "unedited"), None)
        if unedited is None:
            rows = [fact_row(f, s) for f, s in zip(grid_facts, score_facts(lm, grid_facts))]
            seq_rows = [fact_row(f, s) for f, s in zip(seq_facts, score_facts(lm, seq_facts))]
            unedited = {"kind": "unedited", "rows": rows, "seq_rows": seq_rows, "ids": grid_ids, "seq_ids": seq_ids}
            record(unedited)
        unedited_score = aggregate(unedited["rows"])
        seq_unedited_ns = aggregate(unedited["seq_rows"])["NS"]

        # -- the grid: each fact alone, rolled back byte for byte
        settings = [Setting(layer, float(clamp)) for layer in layers for clamp in clamps]
        have = {(r["layer"], r["clamp"], r["id"]): r for r in done if r.get("kind") == "single"}
        total = len(settings) * len(grid_facts)
        count = sum(1 for s in settings for f in grid_facts if (s.layer, s.clamp, f.id) in have)
        hp0 = resolve(base, lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
        prefixes = sample_prefixes(lm, hp0.prefixes, hp0.prefix_top_k, hp0.seed)
        stats = {}
        pending = sorted({s.layer for s in settings for f in grid_facts if (s.layer, s.clamp, f.id) not in have})
        if hp0.mom2 != "identity" and pending:
            # All missing layers in one pass: sampling the corpus is the expensive part.
            stats = load_or_compute_stats(
                lm,
                pending,
                lm.base_hash(),
                **hp0.stats_options(),
                log=log,
            )
            for layer_stats in stats.values():
                layer_stats.factor(hp0.ridge)
        t_grid = time.perf_counter()
        computed = 0
        for setting in settings:
            hp = resolve(
                base.replace(layer=setting.layer, clamp_norm_factor=setting.clamp),
                lm.config.model_type,
                lm.n_layers,
                lm.adapter.v_steps,
            )
            for fact in grid_facts:
                row = have.get((setting.layer, setting.clamp, fact.id))
                if row is None:
                    weight = lm.weight(setting.layer)
                    saved = weight.detach().clone()
                    t = time.perf_counter()
                    edit, _, value = compute_edit(
                        lm,
                        setting.layer,
                        fact.prompt,
                        fact.subject,
                        fact.target_new,
                        prefixes,
                        stats.get(setting.layer),
                        hp,
                        target_true=fact.target_true,
                    )
                    apply_edit(lm, edit)
                    try:
                        scores = score_facts(lm, [fact])[0]
                    finally:
                        with torch.no_grad():
                            weight.copy_(saved)  # single-edit mode: the base bytes come back
                    row = {
                        "kind": "single",
                        "config": config,
                        "layer": setting.layer,
                        "clamp": setting.clamp,
                        "id": fact.id,
                        **fact_row(fact, scores),
                        "norm": edit.norm,
                        "steps": value.steps,
                        "seconds": round(time.perf_counter() - t, 3),
                    }
                    record(row)
                    computed += 1
                    count += 1
                    if progress:
                        progress(count, total)
                    if computed % 10 == 0:
                        rate = (time.perf_counter() - t_grid) / computed
                        log(f"tune: {count}/{total} single edits, ETA {rate * (total - count) / 60:.1f} min")
                setting.rows.append(row)

        # -- the rule, then the sequential check of the best few
        candidates = choose(settings, unedited_score["NS"], ns_tolerance, seq_top)
        for setting in candidates:
            previous = next(
                (
                    r
                    for r in done
                    if r.get("kind") == "sequential" and r["layer"] == setting.layer and r["clamp"] == setting.clamp
                ),
                None,
            )
            if previous is None:
                log(f"tune: sequential check of {setting.key}: {len(seq_facts)} edits...")
                previous = {
                    **_sequential(lm, base, setting, seq_facts, seq_unedited_ns),
                    "config": config,
                    "seq_ids": seq_ids,
                }
                record(previous)
            setting.seq_ns_loss, setting.seq_es = previous["ns_loss"], previous["ES"]
        chosen = pick(candidates)
    finally:
        if written:
            written.close()
    rule = RULE.format(tol=ns_tolerance, top=seq_top, seq=len(seq_facts))
    result = TuneResult(
        model=lm.spec,
        model_hash=model_hash,
        unedited=unedited_score,
        settings=settings,
        chosen=chosen,
        rule=rule,
        seq_unedited_ns=seq_unedited_ns,
        trace_effect=traced["effect"],
        preset_path=None,
        seconds=time.perf_counter() - started,
    )
    if save:
        result.preset_path = save_preset(
            lm,
            {"layer": chosen.layer, "clamp_norm_factor": chosen.clamp},
            source={
                "manifest": loaded.path,
                "sample": len(grid_facts),
                "seed": seed,
                "rule": rule,
                "table": result.table(),
                "unedited": unedited_score,
            },
        )
    return result


def _sequential(lm, base: HParams, setting: Setting, facts: list[Fact], unedited_ns: float | None) -> dict:
    """Apply `facts` one after another in a scratch journal, score NS at the end, restore the base."""
    from .editor import Editor
    from .scores import score_facts

    hp = base.replace(layer=setting.layer, clamp_norm_factor=setting.clamp)
    with (
        tempfile.TemporaryDirectory(prefix="romebatch-tune-") as tmp,
        Editor(Path(tmp) / "journal", lm=lm, hparams=hp, log=lambda m: None) as editor,
    ):
        applied = editor.apply(facts, checks=None, repair_every=0)
        kept = sum(r.status == "applied" for r in applied.results)
        # Every fact is scored, a refused edit too: its neighbours still count, its ES fails.
        score = aggregate([fact_row(f, s) for f, s in zip(facts, score_facts(lm, facts))])
        editor.rollback(base=True)  # the model leaves as it came: base weights, checked by hash
    loss = None if unedited_ns is None or score["NS"] is None else unedited_ns - score["NS"]
    return {
        "kind": "sequential",
        "layer": setting.layer,
        "clamp": setting.clamp,
        "edits": len(facts),
        "applied": kept,
        "ES": score["ES"],
        "NS": score["NS"],
        "ns_loss": loss,
    }
