"""What a repair pass bought: the facts it mended against the facts its own repairs undid.

A repair is a write like any other, and every write leaks into the keys of other facts
(romebatch/repair.py). The deeper the journal, the more facts that held a pass's repairs
knock off, until they undo nearly as many as they mend (benchmarks/RESULTS.md, "Issue 20,
session 24"). Nothing showed this: every repair reports success, since each holds when it
is made. So after its repairs a pass scores again a sample of the facts it found holding,
says how many of them were lost meanwhile, and, when that reaches half its repairs, that
the edited layer is near saturation.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# Facts that held when a pass was planned, scored again after its repairs: a fifth of what
# a full-span pass scores to plan, enough to estimate the share lost to within a few points.
YIELD_SAMPLE = 200
# Losses, as a share of the pass's repairs, from which its report says the layer is saturated.
SATURATED = 0.5


@dataclass
class PassReport:
    head: int  # the state the pass ended on
    checked: int  # facts scored to plan it
    repaired: int  # repairs committed
    held: int  # of the checked, those that held when it was planned
    sampled: int  # of those, scored again after its repairs
    lost_again: int  # of the sampled, those that no longer held

    @property
    def knocked_off(self) -> float:
        """The estimated number of the `held` facts that no longer hold after the pass."""
        return self.lost_again / self.sampled * self.held if self.sampled else 0.0

    @property
    def saturated(self) -> bool:
        return self.repaired > 0 and self.knocked_off >= SATURATED * self.repaired

    def line(self) -> str:
        return f"repair pass at edit {self.head}: {self.details()}"

    def details(self) -> str:
        text = f"{self.repaired} repaired of {self.checked} checked"
        if self.sampled:
            text += (
                f"; about {self.knocked_off:.0f} of the {self.held} that held were lost meanwhile "
                f"({self.lost_again} of {self.sampled} scored again)"
            )
        if self.saturated:
            text += (
                "; its repairs undid at least half as many facts as they mended: the edited layer is near "
                "saturation, and each repair now wins back half a fact or less"
            )
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "knocked_off": round(self.knocked_off, 1), "saturated": self.saturated}


def sample_held(held: list[str], seed: int, size: int = YIELD_SAMPLE) -> list[str]:
    """Up to `size` of the fact hashes in `held`, the same for the same pass (seeded by its state)."""
    ordered = sorted(held)
    return ordered if len(ordered) <= size else random.Random(seed).sample(ordered, size)
