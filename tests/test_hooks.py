"""Tests for romebatch.hooks.attach: reading, patching, stopping, nesting, cleanup.

Every captured or patched value is compared with what plain PyTorch hooks or a manual
computation give, and every test that attaches hooks checks that none are left behind.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_loaded

from romebatch.hooks import Hook, StopForward, attach
from romebatch.lm import encode

TEXT = "The Space Needle is located in the city of Seattle."
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks + forward pre-hooks registered on any module of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_no_hooks(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), f"{name or '<root>'}.{attr} still holds {getattr(module, attr)}"


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def gpt2(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    assert_no_hooks(lm.model)  # a hook left from building the model would make every check below vacuous
    return lm


@pytest.fixture
def llama(sentencepiece_tokenizer):
    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    assert_no_hooks(lm.model)
    return lm


def ids_for(lm, text=TEXT):
    return torch.tensor([encode(lm.tokenizer, text).ids])


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_read_input_and_output_match_plain_hook_and_manual_computation(which, request):
    lm = request.getfixturevalue(which)
    ids = ids_for(lm)
    name = lm.name("down_proj", 1)
    module = lm.model.get_submodule(name)

    plain = {}
    handle = module.register_forward_hook(lambda m, args, out: plain.update(input=args[0].clone(), output=out.clone()))
    try:
        run(lm.model, ids)
    finally:
        handle.remove()

    got = {}
    with attach(
        lm.model,
        [
            Hook(name, lambda x: got.update(input=x.clone()), on="input"),
            Hook(name, lambda y: got.update(output=y.clone()), on="output"),
        ],
    ):
        assert hook_count(lm.model) == 2
        run(lm.model, ids)
    assert_no_hooks(lm.model)

    assert torch.equal(got["input"], plain["input"])
    assert torch.equal(got["output"], plain["output"])
    # Manually: the down-projection applied to the captured input gives the captured output.
    weight, bias = module.weight, module.bias
    manual = got["input"] @ weight if lm.adapter.conv1d else got["input"] @ weight.T
    if bias is not None:
        manual = manual + bias
    assert torch.allclose(manual, got["output"], atol=1e-5, rtol=1e-5)


def test_read_output_of_tuple_returning_module_gets_first_element(gpt2):
    # GPT-2's attention returns (attn_output, attn_weights): the hook sees attn_output.
    ids = ids_for(gpt2)
    name = gpt2.name("attn", 0)
    plain = {}
    handle = gpt2.model.get_submodule(name).register_forward_hook(lambda m, a, out: plain.update(out=out))
    try:
        run(gpt2.model, ids)
    finally:
        handle.remove()
    assert isinstance(plain["out"], tuple)

    got = []
    with attach(gpt2.model, [Hook(name, got.append)]):
        run(gpt2.model, ids)
    assert len(got) == 1
    assert torch.equal(got[0], plain["out"][0])


# ----------------------------------------------------------------------------- patching
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_output_patch_changes_model_and_is_undone_after_block(which, request):
    lm = request.getfixturevalue(which)
    ids = ids_for(lm)
    name = lm.name("down_proj", 1)
    clean = run(lm.model, ids)

    # Not a constant shift: LayerNorm after the residual would cancel that.
    shift = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with attach(lm.model, [Hook(name, lambda out: out + shift)]):
        patched = run(lm.model, ids)
    after = run(lm.model, ids)
    assert_no_hooks(lm.model)

    # Reference: the same patch as a plain PyTorch forward hook returning the new output.
    handle = lm.model.get_submodule(name).register_forward_hook(lambda m, a, out: out + shift)
    try:
        reference = run(lm.model, ids)
    finally:
        handle.remove()

    assert not torch.allclose(patched, clean, atol=1e-3)
    assert torch.equal(patched, reference)
    assert torch.equal(after, clean)


def test_input_patch_matches_plain_pre_hook_and_is_undone(llama):
    ids = ids_for(llama)
    name = llama.name("down_proj", 0)
    clean = run(llama.model, ids)

    with attach(llama.model, [Hook(name, lambda x: x * 0.5, on="input")]):
        patched = run(llama.model, ids)
    after = run(llama.model, ids)

    handle = llama.model.get_submodule(name).register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    try:
        reference = run(llama.model, ids)
    finally:
        handle.remove()

    assert not torch.allclose(patched, clean, atol=1e-3)
    assert torch.equal(patched, reference)
    assert torch.equal(after, clean)
    assert_no_hooks(llama.model)


def test_patch_of_tuple_output_replaces_first_element_only(gpt2):
    ids = ids_for(gpt2)
    name = gpt2.name("attn", 0)
    clean = run(gpt2.model, ids)
    with attach(gpt2.model, [Hook(name, torch.zeros_like)]):
        patched = run(gpt2.model, ids)

    def plain(module, args, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])

    handle = gpt2.model.get_submodule(name).register_forward_hook(plain)
    try:
        reference = run(gpt2.model, ids)
    finally:
        handle.remove()
    assert not torch.allclose(patched, clean, atol=1e-3)
    assert torch.equal(patched, reference)
    assert torch.equal(run(gpt2.model, ids), clean)


# ----------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("on", ["input", "output"])
def test_stop_ends_forward_and_skips_rest_of_body(gpt2, on):
    ids = ids_for(gpt2)
    calls = {"later": 0, "head": 0}
    later = gpt2.model.get_submodule(gpt2.name("layer", 2))
    head = gpt2.model.get_submodule(gpt2.lm_head_name)
    h1 = later.register_forward_pre_hook(lambda m, a: calls.__setitem__("later", calls["later"] + 1))
    h2 = head.register_forward_pre_hook(lambda m, a: calls.__setitem__("head", calls["head"] + 1))
    try:
        run(gpt2.model, ids)  # control: without the stop, both later modules run once
        assert calls == {"later": 1, "head": 1}
        calls.update(later=0, head=0)

        captured, reached = [], []
        with attach(gpt2.model, [Hook(gpt2.name("down_proj", 0), captured.append, on=on, stop=True)]):
            run(gpt2.model, ids)
            reached.append("after the model call")  # must be skipped
        reached.append("after the block")
    finally:
        h1.remove()
        h2.remove()

    assert calls == {"later": 0, "head": 0}
    assert reached == ["after the block"]
    assert len(captured) == 1  # the stopping hook itself ran, exactly once
    assert_no_hooks(gpt2.model)

    # What was captured before stopping equals the value in a full run.
    plain = {}
    module = gpt2.model.get_submodule(gpt2.name("down_proj", 0))
    handle = module.register_forward_hook(lambda m, a, out: plain.update(input=a[0], output=out))
    try:
        run(gpt2.model, ids)
    finally:
        handle.remove()
    assert torch.equal(captured[0], plain[on])


def test_stop_forward_is_not_raised_outside_attach(gpt2):
    # StopForward is internal: it must never escape a block, even when the stop hook ran.
    ids = ids_for(gpt2)
    try:
        with attach(gpt2.model, [Hook(gpt2.name("down_proj", 0), lambda x: None, stop=True)]):
            run(gpt2.model, ids)
    except StopForward:  # pragma: no cover - the failure branch
        pytest.fail("StopForward escaped the attach block")
    assert_no_hooks(gpt2.model)


# ----------------------------------------------------------------------------- nesting and cleanup
def test_nested_blocks_with_exception_leave_no_hooks(llama):
    ids = ids_for(llama)
    clean = run(llama.model, ids)
    outer = [
        Hook(llama.name("down_proj", 0), lambda x: None, on="input"),
        Hook(llama.name("mlp", 1), lambda y: y * 2.0),
    ]
    inner = [Hook(llama.name("down_proj", 2), lambda y: y * 3.0), Hook(llama.name("attn", 1), lambda y: None)]
    with pytest.raises(RuntimeError, match="boom"):
        with attach(llama.model, outer):
            assert hook_count(llama.model) == 2
            with attach(llama.model, inner):
                assert hook_count(llama.model) == 4
                run(llama.model, ids)
                raise RuntimeError("boom")
    assert_no_hooks(llama.model)
    assert torch.equal(run(llama.model, ids), clean)


def test_exception_inside_hook_function_leaves_no_hooks(llama):
    ids = ids_for(llama)

    def broken(x):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        with attach(
            llama.model,
            [Hook(llama.name("down_proj", 0), lambda y: None), Hook(llama.name("down_proj", 1), broken, on="input")],
        ):
            run(llama.model, ids)
    assert_no_hooks(llama.model)


def test_outer_patch_still_active_after_inner_block_stopped(gpt2):
    ids = ids_for(gpt2)
    patch_name = gpt2.name("down_proj", 0)
    with attach(gpt2.model, [Hook(patch_name, lambda y: y * 3.0)]):
        reference = run(gpt2.model, ids)  # patched, outer hook only
        seen = []
        with attach(gpt2.model, [Hook(gpt2.name("down_proj", 2), seen.append, on="input", stop=True)]):
            run(gpt2.model, ids)
        assert len(seen) == 1
        assert hook_count(gpt2.model) == 1  # the inner hook is gone, the outer one stays
        again = run(gpt2.model, ids)
    assert torch.equal(again, reference)
    assert_no_hooks(gpt2.model)
    assert not torch.allclose(run(gpt2.model, ids), reference, atol=1e-3)


# ----------------------------------------------------------------------------- missing modules
@pytest.mark.parametrize(
    "hooks",
    [
        [Hook("transformer.h.99.mlp.c_proj", lambda x: None)],
        [Hook("transformer.h.0.mlp.c_proj", lambda x: None), Hook("no.such.module", lambda x: None, on="input")],
        [
            Hook("transformer.h.0.mlp.c_proj", lambda x: None, on="input"),
            Hook("transformer.h.1.mlp", lambda x: None),
            Hook("transformer.h.1.mlp.down_proj", lambda x: None),
        ],
    ],
)
def test_missing_module_raises_key_error_and_attaches_nothing(gpt2, hooks):
    body_ran = []
    with pytest.raises(KeyError):
        with attach(gpt2.model, hooks):
            body_ran.append(True)
    assert body_ran == []
    assert_no_hooks(gpt2.model)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", FAMILIES)
def test_noop_hooks_on_every_down_proj_leave_logits_identical(family, tokenizer_for):
    lm = tiny_loaded(family, tokenizer_for(family))
    ids = ids_for(lm)
    clean = run(lm.model, ids)
    names = [lm.name("down_proj", layer) for layer in range(lm.n_layers)]
    calls = []

    def noop(x):
        calls.append(x.shape)
        return None

    hooks = [Hook(n, noop, on="input") for n in names] + [Hook(n, noop) for n in names]
    hooks += [Hook(n, lambda y: y) for n in names]  # returning the very tensor is a no-op too
    with attach(lm.model, hooks):
        hooked = run(lm.model, ids)
    assert len(calls) == 2 * lm.n_layers  # every hook ran
    assert torch.equal(hooked, clean)
    assert_no_hooks(lm.model)
