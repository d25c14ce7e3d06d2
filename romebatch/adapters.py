"""The adapter table: for each architecture family, where ROME's pieces live.

For each family, the dotted paths of the modules ROME and causal tracing touch, and the
weight orientation, stated (GPT-2's Conv1D keeps the down-projection as (d_ff, d_model);
`nn.Linear` keeps (d_model, d_ff)). This is the only file that knows a module path such as
"transformer.h". Built-in families go through `register`, as an external one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Adapter:
    """Where ROME's pieces live in one architecture family. `{}` stands for the layer."""

    family: str
    model_types: tuple[str, ...]
    down_proj: str  # the edited weight W: input = key k, output = value v
    layer: str  # one transformer block (its output is the residual stream)
    mlp: str  # the MLP block output restored by causal tracing
    attn: str  # the attention block output restored by causal tracing
    embed: str  # token embeddings, noised by causal tracing
    conv1d: bool  # True: weight stored (d_ff, d_model) as in GPT-2's Conv1D
    n_layers_attr: str = "num_hidden_layers"
    v_steps: int = 20  # EasyEdit uses 25 for Llama-style models

    def module(self, kind: str, layer: int) -> str:
        return getattr(self, kind).format(layer)


_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an architecture family (built-in ones go through here too)."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def _built_in(
    family: str,
    model_types: tuple[str, ...],
    blocks: str,
    parts: tuple[str, str, str],
    embed: str,
    **options: Any,
) -> None:
    """A built-in family whose per-layer modules sit below `blocks.{layer}`.

    `parts` is (down-projection, MLP output, attention output), each relative to the block.
    """
    block = blocks + ".{}"
    down_proj, mlp, attn = (f"{block}.{part}" for part in parts)
    options.setdefault("conv1d", False)
    register(Adapter(family, model_types, down_proj=down_proj, layer=block, mlp=mlp, attn=attn, embed=embed, **options))


# The table. A family that is a variant of one here needs only its model_type added.
_built_in(
    "gpt2",
    ("gpt2",),
    "transformer.h",
    ("mlp.c_proj", "mlp", "attn"),
    "transformer.wte",
    conv1d=True,
    n_layers_attr="n_layer",
)
_built_in("gptj", ("gptj",), "transformer.h", ("mlp.fc_out", "mlp", "attn"), "transformer.wte", n_layers_attr="n_layer")
_built_in("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("mlp.dense_4h_to_h", "mlp", "attention"), "gpt_neox.embed_in")
_built_in(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma", "gemma2", "gemma3_text"),
    "model.layers",
    ("mlp.down_proj", "mlp", "self_attn"),
    "model.embed_tokens",
    v_steps=25,
)
# OPT has no MLP module: fc2 is the down-projection and its output is the MLP output.
_built_in("opt", ("opt",), "model.decoder.layers", ("fc2", "fc2", "self_attn"), "model.decoder.embed_tokens")


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for_type(model_type: str) -> Adapter | None:
    """The built-in or registered adapter for a config's model_type, if any (checked before loading)."""
    return _ADAPTERS.get(model_type)


def adapter_for(model: PreTrainedModel, module_template: str | None = None) -> Adapter:
    """The adapter for `model`; `module_template` ("path.{}.to.down_proj") covers the rest."""
    model_type = getattr(model.config, "model_type", "?")
    if module_template is not None:
        return _adapter_from_template(model, module_template)
    if model_type not in _ADAPTERS:
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}",
            hint="pass --module-template 'path.{}.to.down_proj' to edit another architecture",
        )
    return _ADAPTERS[model_type]


def _adapter_from_template(model: PreTrainedModel, template: str) -> Adapter:
    from transformers.pytorch_utils import Conv1D

    if template.count("{}") != 1:
        raise UserError(f"--module-template {template!r} must contain exactly one '{{}}' for the layer")
    modules = dict(model.named_modules())
    first = template.format(0)
    if first not in modules:
        raise UserError(f"--module-template {template!r}: no module named {first!r} in this model")
    module = modules[first]
    if isinstance(module, Conv1D):
        conv1d = True
    elif isinstance(module, torch.nn.Linear):
        conv1d = False
    else:
        raise UserError(
            f"--module-template {template!r}: {first!r} is a {type(module).__name__}, not a Linear or Conv1D"
        )
    # The block containing the down-projection: strip the trailing attribute path after "{}".
    prefix = template.split("{}")[0] + "{}"
    mlp = template.rsplit(".", 1)[0]
    return Adapter(
        family="template",
        model_types=(),
        down_proj=template,
        layer=prefix,
        mlp=mlp,
        attn=mlp,
        embed=_embed_name(model),
        conv1d=conv1d,
    )


def _embed_name(model: PreTrainedModel) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)
