"""ROME (Meng et al. 2022, arXiv 2202.05262), section 3: one fact, one rank-one update.

Pure functions over a loaded model: computing an edit never changes the model
(`compute_edit` returns a `RankOneEdit`; `apply_edit` is the one function that writes).
"""

from .keys import compute_key, sample_prefixes
from .stats import KeyStats, load_or_compute_stats
from .update import RankOneEdit, apply_edit, compute_edit, rank_one_update
from .values import ValueResult, optimise_value

__all__ = [
    "KeyStats",
    "RankOneEdit",
    "ValueResult",
    "apply_edit",
    "compute_edit",
    "compute_key",
    "load_or_compute_stats",
    "optimise_value",
    "rank_one_update",
    "sample_prefixes",
]
