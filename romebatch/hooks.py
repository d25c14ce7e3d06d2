"""One scoped way to read, patch or stop at any module of a model.

Every activation capture and patch in romebatch goes through `attach`: keys for ROME
(the input of the MLP down-projection), the δ added to its output while optimising v*,
the hidden states restored in causal tracing, and the input of the LM head (read and
then stopped, so that logits are computed only where a loss reads them).

Keeps what ROME's `util/nethook.py` got right (hook any module by dotted name, capture
input or output, stop the forward early) and fixes its lifetime bugs: hooks are attached
on `__enter__`, always removed in `finally`, and contexts nest safely.

    with attach(model, [Hook("model.layers.3.mlp.down_proj", keep, on="input")]):
        model(input_ids)

A hook function receives the module's first positional input (on="input") or its output
tensor (on="output"); it returns None to leave it alone, or a tensor to replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once the needed activation is read.

    It carries the context that asked for the stop, so an inner `attach` never swallows
    a stop requested by an outer one.
    """

    def __init__(self, owner: object = None):
        super().__init__()
        self.owner = owner


@dataclass(frozen=True)
class Hook:
    module: str
    fn: Callable[[torch.Tensor], torch.Tensor | None]
    on: Literal["input", "output"] = "output"
    stop: bool = False  # end the forward pass right after this hook ran


def _first_tensor(value):
    # Decoder layers may return a tuple (hidden, attn_weights, ...); patching acts on hidden.
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    if isinstance(value, tuple):
        return (new,) + tuple(value[1:])
    return new


def _make_input_hook(hook: Hook, owner: object):
    def pre_hook(module, args):
        result = hook.fn(args[0])
        if hook.stop:
            raise StopForward(owner)
        if result is not None:
            return (result,) + tuple(args[1:])
        return None

    return pre_hook


def _make_output_hook(hook: Hook, owner: object):
    def post_hook(module, args, output):
        result = hook.fn(_first_tensor(output))
        if hook.stop:
            raise StopForward(owner)
        if result is not None:
            return _replace_first(output, result)
        return None

    return post_hook


@contextmanager
def attach(model: torch.nn.Module, hooks: list[Hook]) -> Iterator[None]:
    """Attach `hooks` for the duration of the block; a StopForward ends the block quietly.

    A forward pass stopped by a hook raises StopForward out of the model call: the rest of
    the `with` body is skipped, which is what the callers that stop want (they read what
    the hook captured after the block).
    """
    modules = dict(model.named_modules())
    missing = [h.module for h in hooks if h.module not in modules]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in {type(model).__name__}")
    handles = []
    owner = object()  # identifies this context's stops
    try:
        for hook in hooks:
            module = modules[hook.module]
            if hook.on == "input":
                handles.append(module.register_forward_pre_hook(_make_input_hook(hook, owner)))
            else:
                handles.append(module.register_forward_hook(_make_output_hook(hook, owner)))
        yield
    except StopForward as stop:
        if stop.owner is not owner:
            raise  # an enclosing context asked for this stop
    finally:
        for handle in handles:
            handle.remove()
