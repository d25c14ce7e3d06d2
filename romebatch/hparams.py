"""ROME hyper-parameters: one typed dataclass, defaults declared once, YAML or flags on top.

Published values (Meng et al. 2022, `hparams/ROME/gpt2-xl.json`) unless a comment says
otherwise. `None` means "the architecture's default", resolved by `resolve`.

Every entry point (the CLI's `apply` and `tune`, `romebatch.apply`, `Editor`) takes its
defaults from here: a field with `help` metadata is also an `apply` option of its own
(romebatch/cli_settings.py builds it from the field), and every field can be set with
`--set name=value`. Where each measured default comes from: benchmarks/RESULTS.md, "Where
the defaults come from".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypedDict

from .errors import UserError, one_line


# Measured defaults for models we ship or know, by (model_type, layers). The published clamp
# lets δ leak into neighbouring subjects on Gemma-3-270M, a deeper layer loses NS, and under
# sequential editing the drift grows with the size of each write, so the clamp is smaller
# still: the measurements are in benchmarks/RESULTS.md, "Where the defaults come from".
class _Measured(TypedDict, total=False):
    layer: int
    clamp_norm_factor: float


MEASURED: dict[tuple[str, int], _Measured] = {("gemma3_text", 18): {"layer": 1, "clamp_norm_factor": 0.5}}
PUBLISHED_CLAMP = 4.0
STATS_SAMPLINGS = ("plain", "encyclopedic")  # how the self-sampled statistics corpus starts (rome/corpus.py)
# A repair pass (romebatch/repair.py) after every this many edits and at the end of a run:
# often enough that worn edits come back, rarely enough to cost little of the edits' time
# (benchmarks/RESULTS.md, "Where the defaults come from"). 0 or None: never.
REPAIR_EVERY = 100
# How many facts on the path one repair pass checks, in rotation (0 or None: every fact). A
# pass costs a fixed share of each edit however deep the journal is, and every fact is still
# checked once every ceil(N / REPAIR_SPAN) passes; up to this many facts a pass checks them
# all, as every pass before this bound did (benchmarks/RESULTS.md, "Where the defaults come from").
REPAIR_SPAN = 1000


def _option(default, help: str):
    """A field that `apply` also offers as an option of its own; `help` is its --help text
    (`{default}` is replaced by the field's default)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class HParams:
    # Edited layer; None: the measured default, else ~1/4 of the depth (resolve).
    layer: int | None = _option(
        None,
        "Layer to edit, or 'auto' (traced once per model, cached); default: the model's measured default "
        "(1 on Gemma-3-270M), else a quarter of its depth.",
    )
    v_lr: float = _option(0.5, "Adam learning rate for v*; default {default:g}.")  # for δ
    # At most this many Adam steps; None: the architecture adapter's (EasyEdit's 25 for Llama).
    v_steps: int | None = _option(
        None, "Max Adam steps for v*; default 20, 25 for Llama-style models (Gemma included)."
    )
    v_loss_stop: float = 0.05  # stop early once the stopping term falls below this
    # "nll": the target NLL (the fit); "loss": the whole loss, as the original code. The norm
    # penalty ‖δ‖/‖v_init‖² scales with 1/‖v_init‖, so on a small model (small ‖v_init‖) the
    # whole loss may never fall below v_loss_stop: "loss" would never stop early there
    # (benchmarks/RESULTS.md, "Where the defaults come from").
    v_stop_on: str = "nll"
    # Weight of KL(p_δ || p_0) on the essence prompt "{} is a".
    kl_factor: float = _option(0.0625, "Weight of the essence KL term; default {default:g}.")
    v_weight_decay: float = 0.5  # weight of ‖δ‖ / ‖v_init‖², the original's norm penalty
    clamp_norm_factor: float | None = None  # ‖δ‖ ≤ factor · ‖v_init‖; None: measured default, else 4 (published)
    prefixes: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (max new tokens, count): 20 prefixes, N = 21
    prefix_top_k: int = 5  # top-k sampling of the context prefixes
    seed: int = 0  # seeds the prefixes and the default stats corpus
    # "second_moment": C = E[k kᵀ]; "identity": C = I (EasyEdit's mom2_adjustment: false).
    mom2: str = _option("second_moment", "{default} (default) or identity (C = I).")
    # Tokens of corpus the key statistics C are estimated from. More tokens place u = C⁻¹k*
    # better, with diminishing returns; sampling them is a one-time cost per model
    # (benchmarks/RESULTS.md, "Where the defaults come from").
    stats_tokens: int = _option(30_000, "Corpus tokens for the key statistics; default {default:,}.")
    # A text/JSONL file; None: text sampled from the model itself.
    stats_corpus: str | None = _option(None, "Text or JSONL corpus for the key statistics.")
    # How that text is sampled (rome/corpus.py): "encyclopedic" (after encyclopedic openers: C
    # then weighs the keys of fact-like prompts, and sequential edits leak less into them) or
    # "plain" (from the start token; every journal written before this option existed).
    stats_sampling: str = _option(
        "encyclopedic",
        "Without --stats-corpus, how the model's own text is sampled: {default} (default) or plain.",
    )
    stats_seq_len: int = 128  # tokens per corpus sequence
    ridge: float = 1e-3  # C + ridge · mean(diag C) · I, for a stable solve
    guard_factor: float = 10.0  # refuse an edit whose ‖ΔW‖ exceeds this × the median of accepted edits
    guard_min_edits: int = 5  # the guard compares only once this many edits are accepted
    guard_max_relative: float = 1.0  # refuse any edit with ‖ΔW‖ > this × ‖W‖ (a disabling edit)
    # Refuse an edit after which the base model's own sampled text (the context prefixes)
    # costs more than this many nats/token above the base (a disabling edit); 0: no check.
    guard_nll_rise: float = 1.0
    # Sequential stability (rome/preserve.py): "none" (plain ROME), "covariance" (earlier
    # edits' keys added to C with weight preserve_weight) or "nullspace" (u ⟂ earlier keys).
    preserve: str = _option(
        "none",
        "Keep earlier edits: none, covariance (their keys weigh in C) or nullspace (u orthogonal to them); "
        "default {default}.",
    )
    preserve_weight: float = _option(10.0, "λ for --preserve covariance; default {default:g}.")
    # Spread edits round-robin over this many consecutive layers from `layer` (1: one layer).
    # Kept for comparison: it measured worst of the sequential methods (RESULTS.md, `window`).
    spread_layers: int = _option(1, "Spread edits round-robin over this many layers from --layer; default {default}.")
    # True: optimise v* the plain way (every token, every layer, full logits at each step), as
    # the original code; False: the cached engine, which computes the same objective faster
    # (benchmarks/RESULTS.md, "Where the defaults come from").
    exact_protocol: bool = _option(
        False, "Optimise v* the plain way (all tokens, all layers, full logits): slower, same result."
    )
    # Toward 10,000 sequential edits (issue 20). Records written before these fields existed
    # read them as off (RECORDED_BEFORE). MPES (ENCORE's most-probable early stopping): stop
    # optimising v* at the first step where the target's first token is the argmax on every
    # rewrite prompt. On by default with norm_penalty: the pair edits in fewer steps and grows
    # W less than either alone, with the same scores (benchmarks/RESULTS.md, "Where the
    # defaults come from").
    v_stop_argmax: bool = True
    # MPES also asks the new object to beat the true one on the edit prompt as efficacy reads
    # it (length-normalised), when the fact names its true object (rome/values.py, Takes):
    # with the first token alone, a multi-token true object ("San Francisco") could keep the
    # lead after MPES stopped, and a repair pass could not move it (MPES stops it at step 0).
    v_stop_beats_true: bool = True
    # AlphaEdit-style soft null space: keep u orthogonal to the top-k principal directions of
    # C (the directions typical keys occupy), so W k moves little for typical keys; with
    # preserve "nullspace" the earlier edits' keys join the constrained set, with
    # "covariance" they stay the soft term AlphaEdit's sequential form uses. 0: off.
    preserve_top_k: int = 0
    # Bound on the edited matrix's growth: an edit that would make ‖W‖_F exceed
    # (1 + norm_growth_max) · ‖W_base‖_F is scaled down to reach the bound exactly. 0: off.
    norm_growth_max: float = 0.0
    # The soft form of that bound (ENCORE's norm constraint as a penalty, rome/preserve.py):
    # each u also minimises μ · mean(diag C) times the growth of ‖W‖²_F it causes, so edits
    # still take but choose the direction that grows W least (and may shrink it). 0: off;
    # μ from benchmarks/norm_penalty.py.
    norm_penalty: float = 0.01
    # The edit prompt's own key gets the whole write (rome/preserve.py, `level_direction`):
    # u also meets uᵀk_prompt = uᵀk*. k* is the mean over the prompt and its context
    # prefixes; where a subject opens its prompt, its key there can sit far from that mean
    # and an edit wrote a fifth of δ or less where the prompt reads it, failing on the very
    # prompt it was asked to change, repairs included (benchmarks/RESULTS.md, "Where the
    # defaults come from"). False: the published update, u from k* alone.
    write_prompt_key: bool = True
    # With MPES: scale the δ found to this many times the smallest share of it that still
    # takes (rome/values.py, `shrink`), at most all of it: smaller writes leak less. 0: off.
    # Off by default: MPES's δ is already nearly the smallest along its direction, so 1.25
    # left the drift of 100 edits as it was (benchmarks/RESULTS.md, "Issue 20, session 19").
    v_shrink: float = 0.0

    # Fields that do not change what an edit computes: a resumed run may change them freely.
    NON_DEFINING = ("guard_factor", "guard_min_edits", "guard_max_relative", "guard_nll_rise", "exact_protocol")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["prefixes"] = [list(pair) for pair in self.prefixes]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "hparams") -> HParams:
        bad_keys = [key for key in data if not isinstance(key, str)]
        if bad_keys:
            raise UserError(f"{source}: hyper-parameter names must be text, got {_short(bad_keys[0])}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown hyper-parameter {_short(unknown[0])}; known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "prefixes" in values and values["prefixes"] is not None:
            pairs = values["prefixes"]
            if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(x) and 0 < x <= MAX_PREFIX for x in p)
                for p in pairs
            ):
                raise UserError(
                    f"{source}: 'prefixes' must be a list of [max_tokens, count] pairs of whole numbers "
                    f"from 1 to {MAX_PREFIX}"
                ) from None
            values["prefixes"] = tuple((int(a), int(b)) for a, b in pairs)
        defaults = {f.name: f.default for f in fields(cls) if f.init}
        check_values({**defaults, **values}, source)  # named by `source`, before __post_init__ checks again
        return cls(**values)

    @classmethod
    def from_record(cls, data: dict, source: str) -> HParams:
        """The hyper-parameters a journal or bundle recorded. A record written before a field
        existed made its edits without it, so a missing field is read as RECORDED_BEFORE says,
        not as today's default (which may have changed since)."""
        return cls.from_dict({**RECORDED_BEFORE, **data}, source=source)

    def __post_init__(self) -> None:
        # Every HParams is valid from birth: `HParams(v_lr="x")` or `HParams(layer=-5)` is
        # refused here, not later in the middle of an edit. `from_dict` checks first, under
        # its own source's name, so this only names the class.
        self.validate("HParams")

    def validate(self, source: str = "hparams") -> None:
        """Every field's type and range, from its annotation: NaN, infinity, a bool for a number,
        a negative count or a huge integer are refused with the field's name."""
        check_values({f.name: getattr(self, f.name) for f in fields(self)}, source)

    def defining(self) -> dict:
        data = {k: v for k, v in self.to_dict().items() if k not in self.NON_DEFINING}
        if self.stats_corpus is not None:  # C comes from the file: how text would be sampled is moot
            del data["stats_sampling"]
        return data

    def stats_options(self) -> dict:
        """The keyword arguments of `rome.load_or_compute_stats` that these settings define.

        Stated once here, so every caller samples the same statistics for the same settings."""
        return {
            "n_tokens": self.stats_tokens,
            "seq_len": self.stats_seq_len,
            "seed": self.seed,
            "corpus": self.stats_corpus,
            "sampling": self.stats_sampling,
        }

    def value_options(self) -> dict:
        """The keyword arguments of `rome.optimise_value` that these settings define (the true
        object, which MPES may compare against, is the fact's, not a setting)."""
        return {
            "lr": self.v_lr,
            "steps": self.v_steps,
            "loss_stop": self.v_loss_stop,
            "stop_on": self.v_stop_on,
            "kl_factor": self.kl_factor,
            "weight_decay": self.v_weight_decay,
            "clamp_norm_factor": self.clamp_norm_factor,
            "engine": "exact" if self.exact_protocol else "cached",
            "stop_on_argmax": self.v_stop_argmax,
            "shrink": self.v_shrink,
        }

    def replace(self, **changes) -> HParams:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # validated on creation


def load_hparams(path: str | Path) -> HParams:
    """Read hyper-parameters from YAML (safe construction only: a file must not run code)."""
    import yaml

    from .manifest import manifest_yaml

    try:
        data = manifest_yaml(str(path)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        what = getattr(error, "problem", None) or (str(error).splitlines() or ["unreadable"])[0]
        raise UserError(f"{path}: cannot read hyper-parameters ({what})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: hyper-parameters must be a mapping of name: value")
    from .hparams_easyedit import from_easyedit, is_easyedit

    if is_easyedit(data):  # an EasyEdit ROME file (hparams/ROME/*.yaml), mapped field by field
        return from_easyedit(data, source=str(path))
    return HParams.from_dict(data, source=str(path))


# What every edit made before these fields existed was made with: plain edits, C from
# plainly sampled text, no sequential-stability mechanism. A record that lacks one of them
# means this value, whatever the field's default is now.
RECORDED_BEFORE = {
    "preserve": "none",
    "stats_sampling": "plain",
    "preserve_top_k": 0,
    "norm_growth_max": 0.0,
    "v_stop_argmax": False,
    "norm_penalty": 0.0,
    "write_prompt_key": False,
    "v_shrink": 0.0,
    "v_stop_beats_true": False,
}

# Range rules on top of each field's type (HParams.validate): these must be above zero; every
# other number must be zero or more.
POSITIVE = frozenset(
    {
        "v_lr",
        "v_steps",
        "clamp_norm_factor",
        "prefix_top_k",
        "stats_tokens",
        "stats_seq_len",
        "guard_factor",
        "guard_max_relative",
        "spread_layers",
    }
)
CHOICES = {
    "v_stop_on": ("nll", "loss"),
    "mom2": ("second_moment", "identity"),
    "stats_sampling": STATS_SAMPLINGS,
    "preserve": ("none", "covariance", "nullspace"),
}
MAX_INT = 2**31 - 1  # larger counts are typos, and would overflow torch's indices
MAX_PREFIX = 1000


def check_values(values: dict, source: str) -> None:
    """HParams.validate on a mapping of every field's value: refuses with the field's and `source`'s name."""
    for f in fields(HParams):
        value = values[f.name]
        if f.name == "prefixes":
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(x) and 0 < x <= MAX_PREFIX for x in p)
                for p in value
            ):
                raise UserError(
                    f"{source}: prefixes must be [max_tokens, count] pairs of whole numbers from 1 to {MAX_PREFIX}"
                )
            continue
        annotation = str(f.type)
        if value is None:
            if "None" not in annotation:
                raise UserError(f"{source}: {f.name} must be set")
            continue
        kind = annotation.replace("| None", "").strip()
        if kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"{source}: {f.name} must be true or false, got {_short(value)}")
        elif kind == "int":
            if not _is_int(value) or not (1 if f.name in POSITIVE else 0) <= value <= MAX_INT:
                low = "a positive" if f.name in POSITIVE else "a non-negative"
                raise UserError(f"{source}: {f.name} must be {low} whole number up to {MAX_INT}, got {_short(value)}")
        elif kind == "float":
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > 0 if f.name in POSITIVE else value >= 0)
            )
            if not ok:
                low = "a positive" if f.name in POSITIVE else "a non-negative"
                raise UserError(f"{source}: {f.name} must be {low} finite number, got {_short(value)}")
        elif kind == "str" and not isinstance(value, str):
            raise UserError(f"{source}: {f.name} must be text, got {_short(value)}")
    for name, choices in CHOICES.items():
        value = values.get(name)
        if value is not None and value not in choices:
            raise UserError(f"{source}: {name} must be one of {', '.join(choices)}, got {_short(value)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def resolve(hp: HParams, model_type: str, n_layers: int, adapter_v_steps: int) -> HParams:
    """Fill every `None` with the architecture's default, and check the layer exists."""
    measured = MEASURED.get((model_type, n_layers), {})
    layer = hp.layer
    if layer is None:
        layer = measured.get("layer", max(0, round(n_layers / 4)))
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer}: this model has layers 0..{n_layers - 1}")
    clamp = hp.clamp_norm_factor
    if clamp is None:
        clamp = measured.get("clamp_norm_factor", PUBLISHED_CLAMP)
    return dataclasses.replace(hp, layer=layer, v_steps=hp.v_steps or adapter_v_steps, clamp_norm_factor=clamp)


def check_repair_options(repair_every: int | None, repair_span: int | None) -> None:
    """`apply`'s repair settings (romebatch/repair.py): counts, 0 (or None) turning each off."""
    if repair_every is not None and repair_every < 0:
        raise UserError(f"--repair-every {repair_every}: give a number of edits, or 0 for no repairs")
    if repair_span is not None and repair_span < 0:
        raise UserError(f"--repair-span {repair_span}: give a number of facts, or 0 to check them all")


def check_share(option: str, value: float) -> None:
    """A threshold that is a share of prompts, probes or edits must lie in 0..1."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{option} {value:g}: give a share between 0 and 1 (0.9 for 90%)")


@dataclass(frozen=True)
class Thresholds:
    """The regression checks after each edit (romebatch/probes.py); declared here, torch-free,
    beside the other defaults, so that `apply --help` shows them without loading torch."""

    max_neighborhood_drop: float = _option(  # share of the fact's neighbourhood prompts it may break
        0.5, "Share of the fact's neighbourhood prompts an edit may flip to its new object."
    )
    max_probe_regression: float = _option(0.2, "Share of sampled probes that may lose half their probability.")
    min_retention: float = _option(0.8, "Share of sampled earlier edits that must still hold.")
    probe_budget: float = _option(0.25, "Share of an edit's time the checks may take.")
    min_sample: int = 4  # never check fewer probes / earlier edits than this

    def __post_init__(self):
        check_share("--max-neighborhood-drop", self.max_neighborhood_drop)
        check_share("--max-probe-regression", self.max_probe_regression)
        check_share("--min-retention", self.min_retention)
        if not self.probe_budget > 0:
            raise UserError(f"--probe-budget {self.probe_budget:g}: give a positive share of an edit's time")
