"""Regression probes during `apply`: did this edit break what it should have left alone?

Before the first edit, the base model's answers are captured on a probe set: every fact's
neighbourhood prompts, and each fact's own prompt with its true object (a fact not yet
edited must not move when another one is). After each edit, three checks run:

- **neighbourhood**: the edited fact's own neighbourhood prompts, CounterFact style: the
  share of them where the expected answer beat o* on the base model but no longer does
  (`neighborhood_drop`, 0..1).
- **probe sample**: a rotating sample of the probe set; a probe regresses when its answer's
  length-normalised probability falls below half its base value (`probe_regression`, 0..1).
- **retention**: a sample of earlier edits on the path; an edit is retained while its new
  object still beats its true one (or keeps half its post-edit probability when no true
  object is known) (`retention`, 0..1).

The sample sizes adapt so the checks cost about `probe_budget` of an edit's time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .hparams import Thresholds, check_share  # noqa: F401 (declared with every other default)
from .manifest import Fact
from .model import LoadedModel
from .scores import answer_nll, edit_holds


@dataclass
class ProbeOutcome:
    neighborhood_drop: float | None = None
    probe_regression: float | None = None
    retention: float | None = None
    probes_checked: int = 0
    edits_checked: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Probe:
    prompt: str
    answer: str
    base_p: float
    own_of: str | None = None  # a fact's own prompt: valid only until that fact is edited


class RegressionProbes:
    def __init__(self, lm: LoadedModel, facts: list[Fact], thresholds: Thresholds = Thresholds()):
        self.lm = lm
        self.thresholds = thresholds
        self.facts = {f.hash: f for f in facts}
        self._probes: list[_Probe] = []
        self._neighborhood_base: dict[str, list[bool]] = {}
        self._cursor = 0
        self._sample = 16
        self._seconds_per_pair: float | None = None
        self.applied: set[str] = set()  # facts edited so far: their own prompts are meant to move

    def capture_base(self) -> None:
        """Score the probe set (and each fact's neighbourhood against its o*) on the base model."""
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[str, str, str, str]] = []  # (kind, fact hash, probe prompt, its answer)
        for fact in self.facts.values():
            for n in fact.neighborhood:
                pairs += [(n.prompt, n.answer), (n.prompt, fact.target_new)]
                owners.append(("neighbor", fact.hash, n.prompt, n.answer))
            if fact.target_true:
                pairs.append((fact.text, fact.target_true))
                owners.append(("own", fact.hash, fact.text, fact.target_true))
        started = time.perf_counter()
        nll = answer_nll(self.lm, pairs) if pairs else []
        if pairs:
            self._seconds_per_pair = (time.perf_counter() - started) / len(pairs)
        i = 0
        for kind, fact_hash, prompt, answer in owners:
            if kind == "neighbor":
                expected, competitor = nll[i], nll[i + 1]
                i += 2
                self._neighborhood_base.setdefault(fact_hash, []).append(expected < competitor)
                self._probes.append(_Probe(prompt, answer, math.exp(-expected)))
            else:
                self._probes.append(_Probe(prompt, answer, math.exp(-nll[i]), own_of=fact_hash))
                i += 1

    def check(self, fact: Fact, earlier: list[dict], edit_seconds: float) -> ProbeOutcome:
        """Run the three checks after `fact` was applied; `earlier` are previous edits' facts and P(new) after."""
        t = self.thresholds
        started = time.perf_counter()
        out = ProbeOutcome()
        # The fact was just applied: its own prompt is meant to move and is no probe any more
        # (a caller that rejects the edit discards it from `applied` again).
        self.applied.add(fact.hash)
        budget_pairs = self._budget_pairs(edit_seconds)

        pairs = []
        for n in fact.neighborhood:
            pairs += [(n.prompt, n.answer), (n.prompt, fact.target_new)]
        n_neighbors = len(fact.neighborhood)
        sample = self._next_sample(max(t.min_sample, budget_pairs // 2))
        pairs += [(p.prompt, p.answer) for p in sample]
        recent = earlier[-max(t.min_sample, budget_pairs // 4) :]
        for record in recent:
            pairs.append((record["text"], record["target_new"]))
            if record.get("target_true"):
                pairs.append((record["text"], record["target_true"]))
        nll = answer_nll(self.lm, pairs) if pairs else []

        base = self._neighborhood_base.get(fact.hash, [])
        if n_neighbors:
            now = [nll[2 * i] < nll[2 * i + 1] for i in range(n_neighbors)]
            broken = sum(b and not n for b, n in zip(base, now))
            out.neighborhood_drop = broken / n_neighbors
        i = 2 * n_neighbors
        if sample:
            regressed = sum(math.exp(-nll[i + j]) < 0.5 * p.base_p for j, p in enumerate(sample))
            out.probe_regression = regressed / len(sample)
            out.probes_checked = len(sample)
        i += len(sample)
        if recent:
            held = 0
            for record in recent:
                p_new = math.exp(-nll[i])
                i += 1
                p_true = None
                if record.get("target_true"):
                    p_true = math.exp(-nll[i])
                    i += 1
                held += edit_holds(p_new, p_true, record.get("p_new_after"))
            out.retention = held / len(recent)
            out.edits_checked = len(recent)

        if out.neighborhood_drop is not None and out.neighborhood_drop > t.max_neighborhood_drop:
            out.problems.append(
                f"broke {out.neighborhood_drop:.0%} of its neighbourhood prompts (max {t.max_neighborhood_drop:.0%})"
            )
        if out.probe_regression is not None and out.probe_regression > t.max_probe_regression:
            out.problems.append(
                f"{out.probe_regression:.0%} of {out.probes_checked} probes lost half their "
                f"probability (max {t.max_probe_regression:.0%})"
            )
        if out.retention is not None and out.retention < t.min_retention:
            out.problems.append(
                f"only {out.retention:.0%} of {out.edits_checked} earlier edits still hold (min {t.min_retention:.0%})"
            )
        out.seconds = time.perf_counter() - started
        if pairs:
            per_pair = out.seconds / len(pairs)
            self._seconds_per_pair = (
                per_pair if self._seconds_per_pair is None else 0.7 * self._seconds_per_pair + 0.3 * per_pair
            )
        return out

    def _budget_pairs(self, edit_seconds: float) -> int:
        if not self._seconds_per_pair:
            return 2 * self.thresholds.min_sample
        return int(self.thresholds.probe_budget * edit_seconds / self._seconds_per_pair)

    def _next_sample(self, size: int) -> list[_Probe]:
        """The next `size` probes, rotating through the whole set so every probe is checked in turn."""
        picked: list[_Probe] = []
        for _ in range(len(self._probes)):
            if len(picked) >= size:
                break
            probe = self._probes[self._cursor]
            self._cursor = (self._cursor + 1) % len(self._probes)
            if probe.own_of is None or probe.own_of not in self.applied:
                picked.append(probe)
        return picked
