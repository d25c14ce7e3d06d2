"""What `romebatch tune` measures and how it chooses (romebatch/tuning.py runs the measurements).

A setting is an edit layer and a clamp factor; each fact edited alone with it gives a row of
ES, PS and NS. The rule (tuning.py's docstring, step 5): settings whose single-edit NS is no
more than `ns_tolerance` points below the unedited model's are eligible (all are, if none
is); the `seq_top` with the highest S go through the sequential check, and the one that
loses the least NS there wins (ties: the higher single-edit S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import fmean, harmonic_mean

from .manifest import Fact, Neighbor

DEFAULT_CLAMPS = (0.5, 1.0, 2.0, 4.0)
NEIGHBOURS_PER_FACT = 5


@dataclass
class Setting:
    layer: int
    clamp: float
    rows: list[dict] = field(default_factory=list)  # one per fact: ES, PS, NS (0..1 or None)
    seq_ns_loss: float | None = None  # NS points lost after the sequential check
    seq_es: float | None = None
    eligible: bool = False

    @property
    def key(self) -> str:
        return f"L{self.layer}-c{self.clamp:g}"

    def score(self) -> dict:
        return aggregate(self.rows)


@dataclass
class TuneResult:
    model: str
    model_hash: str
    unedited: dict
    settings: list[Setting]
    chosen: Setting
    rule: str
    seq_unedited_ns: float | None
    trace_effect: list[float]
    preset_path: Path | None
    seconds: float

    def table(self) -> list[dict]:
        out = []
        for s in self.settings:
            score = s.score()
            out.append(
                {
                    "setting": s.key,
                    "layer": s.layer,
                    "clamp": s.clamp,
                    **score,
                    "eligible": s.eligible,
                    "seq_ns_loss": s.seq_ns_loss,
                    "seq_ES": s.seq_es,
                    "chosen": s is self.chosen,
                }
            )
        return out

    def summary(self) -> dict:
        return {
            "model": self.model,
            "model_hash": self.model_hash,
            "unedited": self.unedited,
            "table": self.table(),
            "chosen": {"layer": self.chosen.layer, "clamp_norm_factor": self.chosen.clamp},
            "rule": self.rule,
            "seq_unedited_NS": self.seq_unedited_ns,
            "mlp_effect_by_layer": self.trace_effect,
            "preset": str(self.preset_path) if self.preset_path else None,
            "seconds": round(self.seconds, 1),
        }


RULE = (
    "eligible: single-edit NS no more than {tol:g} points below the unedited model's; of those, the "
    "{top} with the highest S go through {seq} sequential edits; the least NS loss there wins (ties: higher S)"
)


def aggregate(rows: list[dict]) -> dict:
    """ES / PS / NS in percent over the facts that have each, and S, their harmonic mean."""

    def pct(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return 100.0 * fmean(values) if values else None

    es, ps, ns = pct("ES"), pct("PS"), pct("NS")
    parts = [x for x in (es, ps, ns) if x is not None]
    s = harmonic_mean(parts) if parts and all(x > 0 for x in parts) else (0.0 if parts else None)
    return {"ES": es, "PS": ps, "NS": ns, "S": s, "n": len(rows)}


def choose(settings: list[Setting], unedited_ns: float | None, ns_tolerance: float, seq_top: int) -> list[Setting]:
    """The settings to check sequentially, best first (marks `eligible`); see the module docstring."""
    for s in settings:
        ns = s.score()["NS"]
        s.eligible = unedited_ns is None or ns is None or ns >= unedited_ns - ns_tolerance
    pool = [s for s in settings if s.eligible] or settings
    return sorted(pool, key=lambda s: -(s.score()["S"] or 0.0))[:seq_top]


def pick(candidates: list[Setting]) -> Setting:
    """Of the sequentially checked candidates: least NS loss, then the higher single-edit S."""
    return min(
        candidates, key=lambda s: (math.inf if s.seq_ns_loss is None else s.seq_ns_loss, -(s.score()["S"] or 0.0))
    )


def with_relation_neighbours(facts: list[Fact], per_fact: int = NEIGHBOURS_PER_FACT) -> list[Fact]:
    """Facts without neighbourhood prompts get other subjects' prompts of the same relation.

    The relation is the prompt template; a neighbour's answer is its own true object (the
    prompt must keep it after the edit), as in CounterFact's construction.
    """
    by_relation: dict[str, list[tuple[Fact, str]]] = {}  # each fact with its (known) true object
    for fact in facts:
        if fact.target_true is not None:
            by_relation.setdefault(fact.prompt, []).append((fact, fact.target_true))
    out = []
    for fact in facts:
        if fact.neighborhood:
            out.append(fact)
            continue
        others = [
            (o, true)
            for o, true in by_relation.get(fact.prompt, [])
            if o.subject != fact.subject and true != fact.target_new
        ][:per_fact]
        out.append(replace(fact, neighborhood=tuple(Neighbor(o.text, true) for o, true in others)))
    return out


def candidate_layers(effect, n_layers: int, top: int, also: tuple[int, ...] = ()) -> list[int]:
    """The `top` layers by traced MLP effect, depth/4 (the published rule) and `also` (a measured default)."""
    ranked = sorted(range(len(effect)), key=lambda i: -effect[i])[:top]
    return sorted(set(ranked) | {max(0, min(n_layers - 1, round(n_layers / 4)))} | set(also))


def fact_row(fact: Fact, scores) -> dict:
    """One fact's ES, PS and NS (0..1 or None) from its scores, as the results file keeps them."""
    return {"id": fact.id, "ES": scores.efficacy, "PS": scores.paraphrase_success, "NS": scores.neighborhood_success}
