"""Reading EasyEdit's ROME hyper-parameter YAML (`hparams/ROME/*.yaml`) as romebatch HParams.

Users arrive with EasyEdit files written per model by hand. Each EasyEdit field is mapped
here, one by one, onto romebatch's `HParams`, or checked against what romebatch does anyway
(the fact token, the module paths), or accepted as belonging to the run rather than the
method (the model path, the GPU index; romebatch takes those as flags). Everything else is
refused with one line naming the field, so a setting is never silently dropped. The table
users read is docs/easyedit-hparams.md; keep the two in step.
"""

from __future__ import annotations

import math

from .errors import UserError

# Keys that only EasyEdit's files use: one of them marks a file as EasyEdit's.
MARKERS = (
    "alg_name",
    "layers",
    "v_num_grad_steps",
    "rewrite_module_tmp",
    "mom2_adjustment",
    "context_template_length_params",
    "mom2_n_samples",
    "fact_token",
    "v_loss_layer",
)

# Fields about where and how EasyEdit runs, not about what an edit computes: accepted and
# not used (the flag that does the job in romebatch is named in docs/easyedit-hparams.md).
RUN_FIELDS = (
    "model_name",
    "device",
    "stats_dir",
    "fp16",
    "ln_f_module",
    "lm_head_module",
    "mom2_dataset",
    "model_parallel",
    "batch_size",
    "max_length",
)

# EasyEdit samples `mom2_n_samples` Wikipedia texts; romebatch counts corpus tokens. One text
# is taken as one romebatch corpus sequence of `stats_seq_len` tokens (HParams default 128).
TOKENS_PER_SAMPLE_DEFAULT = 128


def is_easyedit(data: dict) -> bool:
    return any(key in data for key in MARKERS)


def from_easyedit(data: dict, source: str = "hparams"):
    """An `HParams` equivalent to EasyEdit ROME fields `data`; UserError on anything without one."""
    from .hparams import HParams

    def fail(field: str, why: str):
        raise UserError(
            f"{source}: EasyEdit field {field!r} {why}",
            hint="see docs/easyedit-hparams.md for how each EasyEdit field maps",
        )

    for key in data:
        if not isinstance(key, str):
            fail(repr(key), "is not a field name")
    out: dict = {}
    handlers = {}

    def field(name):
        def register(fn):
            handlers[name] = fn
            return fn

        return register

    def number(name, value, *, integer=False, positive=False):
        if isinstance(value, str) and not integer:
            # PyYAML reads YAML 1.1, where `5e-1` (no dot) is a string; EasyEdit's files write
            # v_lr and v_weight_decay so, and mean the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            fail(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            fail(name, f"must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
        return value

    @field("alg_name")
    def _(value):
        if not isinstance(value, str) or value.upper() != "ROME":
            fail("alg_name", f"is {value!r}: romebatch reads ROME hyper-parameters only")

    @field("layers")
    def _(value):
        if not isinstance(value, list) or len(value) != 1:
            fail("layers", f"must list exactly one layer (ROME edits one), got {value!r}")
        out["layer"] = number("layers", value[0], integer=True)

    @field("fact_token")
    def _(value):
        # romebatch's k* is read at the subject's last token, as the paper and EasyEdit's files do.
        if value != "subject_last":
            fail(
                "fact_token", f"is {value!r}: romebatch reads the key at the subject's last token only ('subject_last')"
            )

    @field("v_num_grad_steps")
    def _(value):
        out["v_steps"] = number("v_num_grad_steps", value, integer=True, positive=True)

    @field("v_lr")
    def _(value):
        out["v_lr"] = number("v_lr", value, positive=True)

    @field("v_loss_layer")
    def _(value):
        # EasyEdit reads the target's loss at this layer's output through the LM head; its files
        # always name the last layer, which is what romebatch does (the model's own logits).
        number("v_loss_layer", value, integer=True)

    @field("v_weight_decay")
    def _(value):
        # Same term in both: v_weight_decay · ‖δ‖ / ‖v_init‖².
        out["v_weight_decay"] = number("v_weight_decay", value)

    @field("clamp_norm_factor")
    def _(value):
        out["clamp_norm_factor"] = number("clamp_norm_factor", value, positive=True)

    @field("kl_factor")
    def _(value):
        out["kl_factor"] = number("kl_factor", value)

    @field("mom2_adjustment")
    def _(value):
        if not isinstance(value, bool):
            fail("mom2_adjustment", f"must be true or false, got {value!r}")
        out["mom2"] = "second_moment" if value else "identity"

    @field("mom2_n_samples")
    def _(value):
        out["_mom2_n_samples"] = number("mom2_n_samples", value, integer=True, positive=True)

    @field("mom2_dtype")
    def _(value):
        if value != "float32":
            fail("mom2_dtype", f"is {value!r}: romebatch accumulates the key statistics in float32 only")

    @field("context_template_length_params")
    def _(value):
        ok = isinstance(value, list) and all(
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)
            for pair in value
        )
        if not ok:
            fail("context_template_length_params", f"must be a list of [max_tokens, count] pairs, got {value!r}")
        out["prefixes"] = tuple((a, b) for a, b in value)

    for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
        handlers[name] = lambda value, name=name: _check_template(name, value, fail)

    for name, value in data.items():
        if name in RUN_FIELDS:
            if name == "model_parallel" and value not in (False, None):
                fail("model_parallel", "is true: use romebatch's --device-map to spread a model over devices")
            continue
        if name not in handlers:
            fail(name, "has no romebatch equivalent")
        handlers[name](value)
    n_samples = out.pop("_mom2_n_samples", None)
    if n_samples is not None:
        out["stats_tokens"] = n_samples * TOKENS_PER_SAMPLE_DEFAULT
    layer_loss = data.get("v_loss_layer")
    if layer_loss is not None and out.get("layer") is not None and layer_loss < out["layer"]:
        fail("v_loss_layer", f"is {layer_loss}, before the edited layer {out['layer']}")
    return HParams.from_dict(out, source=source)


_TEMPLATE_KIND = {
    "rewrite_module_tmp": "down_proj",
    "layer_module_tmp": "layer",
    "mlp_module_tmp": "mlp",
    "attn_module_tmp": "attn",
}


def _check_template(name: str, value, fail) -> None:
    """Module paths come from romebatch's adapter table; a file's own must agree with one family's."""
    from .adapters import _ADAPTERS

    kind = _TEMPLATE_KIND[name]
    known = sorted({getattr(adapter, kind) for adapter in _ADAPTERS.values()})
    if not isinstance(value, str) or value not in known:
        hint = " (pass --module-template to edit another down-projection)" if kind == "down_proj" else ""
        fail(name, f"is {value!r}, a path no built-in architecture has{hint}; built in: {', '.join(known)}")
