"""Tests for the adapter table and one ROME edit on a tiny model of every family.

Module paths and weight orientation are checked functionally (the module's output against
`key @ W + b` / `W @ key + b`), and the edit against the closed form of ROME §3.1 computed
here independently from the key statistics.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from conftest import CORPUS, FAMILIES, TINY_HPARAMS, tiny_loaded

from romebatch import rome
from romebatch.adapters import adapter_for, supported_model_types
from romebatch.errors import UserError
from romebatch.hparams import HParams, resolve
from romebatch.lm import subject_last_index
from romebatch.model import LoadedModel
from romebatch.rome.keys import keys_at
from romebatch.rome.update import current_value
from romebatch.scores import answer_nll

KINDS = ("down_proj", "layer", "mlp", "attn", "embed")

# The subject is the last words before the answer: a tiny random model's attention is too
# diffuse to carry an edit at an earlier subject to the answer position.
TEMPLATE = "The landmark of Seattle is {}"
SUBJECT = "the Space Needle"
TARGET = "Paris"


def d_ff_of(config) -> int:
    if config.model_type in ("gpt2", "gptj"):
        return config.n_inner or 4 * config.hidden_size
    if config.model_type == "opt":
        return config.ffn_dim
    return config.intermediate_size


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def changed(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys()
    return sorted(name for name in before if not torch.equal(before[name], after[name]))


def hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def randomise_down_proj_biases(lm: LoadedModel, seed: int = 0) -> None:
    """Hugging Face initialises biases to zero, which would hide a dropped bias: make them count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            bias = lm.module("down_proj", layer).bias
            if bias is not None:
                bias.copy_(0.5 * torch.randn(bias.shape, generator=generator))


# ----------------------------------------------------------------------------- paths and orientation
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_paths_exist_for_every_layer(family, tokenizer_for):
    lm = tiny_loaded(family, tokenizer_for(family))
    modules = dict(lm.model.named_modules())
    assert lm.n_layers == 3  # the tiny configs have 3 layers: n_layers_attr reads the right field
    for layer in range(lm.n_layers):
        for kind in KINDS:
            assert lm.adapter.module(kind, layer) in modules, (kind, layer)
    assert lm.adapter.module("layer", lm.n_layers) not in modules  # no layer beyond n_layers
    assert modules[lm.adapter.embed] is lm.model.get_input_embeddings()
    # The layer path names the decoder blocks themselves, distinct per layer.
    blocks = {id(modules[lm.adapter.module("layer", i)]) for i in range(lm.n_layers)}
    assert len(blocks) == lm.n_layers
    # down_proj, mlp and attn of layer i live inside block i.
    for layer in range(lm.n_layers):
        block = lm.adapter.module("layer", layer)
        for kind in ("down_proj", "mlp", "attn"):
            assert lm.adapter.module(kind, layer).startswith(block + ".")


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_orientation_matches_adapter_functionally(family, tokenizer_for):
    lm = tiny_loaded(family, tokenizer_for(family))
    randomise_down_proj_biases(lm)
    d_model, d_ff = lm.config.hidden_size, d_ff_of(lm.config)
    assert lm.adapter.conv1d == (family == "gpt2")
    generator = torch.Generator().manual_seed(0)
    for layer in range(lm.n_layers):
        weight = lm.weight(layer)
        assert weight is lm.module("down_proj", layer).weight
        assert tuple(weight.shape) == ((d_ff, d_model) if lm.adapter.conv1d else (d_model, d_ff))
        module = lm.module("down_proj", layer)
        bias = module.bias if module.bias is not None else torch.zeros(d_model)
        key = torch.randn(d_ff, generator=generator)
        with torch.no_grad():
            out = module(key[None])[0]
            expected = key @ weight + bias if lm.adapter.conv1d else weight @ key + bias
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
        # current_value is the same computation.
        assert torch.allclose(current_value(lm, layer, key), expected, atol=1e-5, rtol=1e-5)
    # And the real keys the model feeds the module have d_ff entries.
    encoded, index = subject_last_index(lm.tokenizer, TEMPLATE, SUBJECT)
    assert keys_at(lm, 1, [encoded.ids], [index]).shape == (1, d_ff)


# ----------------------------------------------------------------------------- one edit per family
@pytest.fixture(scope="module", params=FAMILIES)
def edited(request, bytelevel_tokenizer, sentencepiece_tokenizer, tmp_path_factory):
    """One ROME edit per family, with snapshots around `compute_edit` and `apply_edit`."""
    from conftest import SENTENCEPIECE

    family = request.param
    tok = sentencepiece_tokenizer if family in SENTENCEPIECE else bytelevel_tokenizer
    lm = tiny_loaded(family, tok)
    randomise_down_proj_biases(lm)
    hp = resolve(HParams(**TINY_HPARAMS), lm.config.model_type, lm.n_layers, lm.adapter.v_steps)
    layer = hp.layer
    prefixes = rome.sample_prefixes(lm, hp.prefixes, hp.prefix_top_k, hp.seed)
    # cache_dir given: a module-scoped fixture runs outside the function-scoped ROMEBATCH_HOME patch.
    stats = rome.load_or_compute_stats(
        lm,
        [layer],
        lm.base_hash(),
        n_tokens=hp.stats_tokens,
        seq_len=hp.stats_seq_len,
        seed=0,
        cache_dir=tmp_path_factory.mktemp(f"stats-{family}"),
    )[layer].factor(hp.ridge)
    prompt = TEMPLATE.format(SUBJECT)
    nll_before = answer_nll(lm, [(prompt, TARGET)])[0]
    before = state(lm.model)
    edit, k_star, value = rome.compute_edit(lm, layer, TEMPLATE, SUBJECT, TARGET, prefixes, stats, hp)
    after_compute = state(lm.model)
    hooks_after_compute = hooks_left(lm.model)
    v_current = current_value(lm, layer, k_star)
    rome.apply_edit(lm, edit)
    after_apply = state(lm.model)
    nll_after = answer_nll(lm, [(prompt, TARGET)])[0]
    return types.SimpleNamespace(
        family=family,
        lm=lm,
        hp=hp,
        layer=layer,
        stats=stats,
        edit=edit,
        k_star=k_star,
        value=value,
        prefixes=prefixes,
        v_current=v_current,
        before=before,
        after_compute=after_compute,
        after_apply=after_apply,
        hooks_after_compute=hooks_after_compute,
        nll_before=nll_before,
        nll_after=nll_after,
    )


def test_compute_edit_changes_nothing(edited):
    assert edited.layer == 1  # round(3 / 4): the edit is not at a boundary layer
    assert changed(edited.before, edited.after_compute) == []
    assert edited.hooks_after_compute == 0
    assert not any(p.requires_grad for p in edited.lm.model.parameters())


def test_apply_edit_changes_only_the_layers_down_projection(edited):
    lm = edited.lm
    weight_name = f"param:{lm.name('down_proj', edited.layer)}.weight"
    assert changed(edited.before, edited.after_apply) == [weight_name]
    # The change is exactly Λ uᵀ in the stored layout.
    delta = edited.after_apply[weight_name] - edited.before[weight_name]
    expected = edited.edit.matrix(lm.adapter.conv1d)
    assert delta.shape == expected.shape == edited.before[weight_name].shape
    assert torch.allclose(delta, expected, atol=1e-5, rtol=1e-4)


def test_edited_layer_maps_k_star_to_v_star(edited):
    got = current_value(edited.lm, edited.layer, edited.k_star)
    v_star = edited.value.v_star
    relative = float((got - v_star).norm() / v_star.norm())
    assert relative < 1e-4
    # And the edit was not a no-op: v* was away from the old value.
    assert float((edited.v_current - v_star).norm() / v_star.norm()) > 1e-2


def test_edit_matches_closed_form_from_key_statistics(edited):
    # ROME §3.1 computed here with plain linear solves: u = (C + ridge·mean(diag C)·I)⁻¹ k*,
    # made to give the bare prompt's own key k_p the same write (the default write_prompt_key:
    # u = C⁻¹(k* − α d), dᵀu = 0, d = k_p − k*), Λ = (v* − (W k* + b)) / (uᵀ k*).
    assert edited.hp.write_prompt_key
    c = edited.stats.mom2.double()
    c = c + edited.hp.ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64)
    k = edited.k_star.double()
    d = prompt_keys(edited)[0].double() - k
    plain, along = torch.linalg.solve(c, k), torch.linalg.solve(c, d)
    u = plain - along * (d @ plain) / (d @ along)
    assert abs(float(edited.edit.u.double() @ (k + d)) / float(edited.edit.u.double() @ k) - 1) < 1e-4
    lam = (edited.value.v_star.double() - edited.v_current.double()) / (u @ k)
    assert torch.allclose(edited.edit.u.double(), u, rtol=1e-4, atol=1e-6 * float(u.abs().max()))
    assert torch.allclose(edited.edit.lam.double(), lam, rtol=1e-4, atol=1e-6 * float(lam.abs().max()))
    assert math.isclose(edited.edit.denominator, float(u @ k), rel_tol=1e-6)
    # v_init from the captured key equals the unedited module's output recomputed from the snapshot.
    lm, layer = edited.lm, edited.layer
    w = edited.before[f"param:{lm.name('down_proj', layer)}.weight"].double()
    bias_name = f"param:{lm.name('down_proj', layer)}.bias"
    b = edited.before[bias_name].double() if bias_name in edited.before else 0.0
    v0 = (k @ w if lm.adapter.conv1d else w @ k) + b
    assert torch.allclose(edited.v_current.double(), v0, atol=1e-4, rtol=1e-5)


def prompt_keys(edited) -> list[torch.Tensor]:
    """The key at the subject's last token of the bare prompt, then of each prefixed prompt:
    each prompt run alone, the key read with a plain PyTorch pre-hook."""
    lm = edited.lm
    module = lm.module("down_proj", edited.layer)
    keys = []
    for prefix in ["", *edited.prefixes]:
        encoded, index = subject_last_index(lm.tokenizer, TEMPLATE, SUBJECT, prefix)
        seen = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # noqa: B023 (the hook runs within this iteration)
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([encoded.ids]), use_cache=False)
        finally:
            handle.remove()
        keys.append(seen[0].reshape(len(encoded.ids), -1)[index])  # OPT flattens to (B*T, d_ff)
    return keys


def test_k_star_is_mean_key_over_bare_and_prefixed_prompts(edited):
    assert len(edited.prefixes) == sum(count for _, count in edited.hp.prefixes)
    reference = torch.stack(prompt_keys(edited)).mean(dim=0)
    assert torch.allclose(edited.k_star, reference, atol=1e-5, rtol=1e-5)


def test_edit_raises_target_probability(edited):
    p_before, p_after = math.exp(-edited.nll_before), math.exp(-edited.nll_after)
    assert p_after >= 2 * p_before, (edited.family, p_before, p_after, edited.value)


# ----------------------------------------------------------------------------- choosing an adapter
def test_unknown_model_type_raises_user_error_listing_supported(bytelevel_tokenizer):
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="mysterynet")
    with pytest.raises(UserError) as info:
        adapter_for(model)
    message = info.value.message
    assert "mysterynet" in message
    supported = supported_model_types()
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "opt"} <= set(
        supported
    )
    for model_type in supported:
        assert model_type in message
    assert info.value.hint and "--module-template" in info.value.hint


def test_every_supported_architecture_is_built_tiny_in_the_tests():
    # FAMILIES parametrizes the engine, head, journal and export tests: a model_type added to
    # the adapter table without a tiny config there would ship untested.
    assert set(supported_model_types()) == set(FAMILIES)


def test_unknown_model_type_real_model(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    lm.model.config.model_type = "mysterynet"
    assert lm.model.config.model_type == "mysterynet"
    with pytest.raises(UserError, match="mysterynet"):
        adapter_for(lm.model)


@pytest.mark.parametrize(
    "family, template, conv1d",
    [
        ("gpt2", "transformer.h.{}.mlp.c_proj", True),
        ("llama", "model.layers.{}.mlp.down_proj", False),
        ("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h", False),
    ],
)
def test_module_template_adapter(family, template, conv1d, tokenizer_for):
    lm = tiny_loaded(family, tokenizer_for(family))
    adapter = adapter_for(lm.model, template)
    assert adapter.conv1d is conv1d
    assert adapter.down_proj == template
    templated = dataclasses.replace(lm, adapter=adapter)
    modules = dict(lm.model.named_modules())
    for layer in range(lm.n_layers):
        # The same weight as the built-in adapter finds, and every derived path exists.
        assert templated.weight(layer) is lm.weight(layer)
        for kind in KINDS:
            assert adapter.module(kind, layer) in modules, (kind, adapter.module(kind, layer))
    assert adapter.layer == lm.adapter.layer
    assert modules[adapter.embed] is lm.model.get_input_embeddings()
    assert templated.n_layers == lm.n_layers
    # The templated adapter reads the same keys.
    encoded, index = subject_last_index(lm.tokenizer, TEMPLATE, SUBJECT)
    assert torch.equal(keys_at(templated, 1, [encoded.ids], [index]), keys_at(lm, 1, [encoded.ids], [index]))


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("transformer.h.0.mlp.c_proj", "{}"),  # no layer slot
        ("transformer.h.{}.mlp.{}", "{}"),  # two slots
        ("transformer.h.{}.mlp.down_proj", "no module"),  # a Llama path on GPT-2
        ("transformer.layers.{}.mlp.c_proj", "no module"),
        ("transformer.h.{}.mlp", "not a Linear"),  # exists, but is not a projection
    ],
)
def test_bad_module_template_raises_user_error(template, fragment, bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    with pytest.raises(UserError) as info:
        adapter_for(lm.model, template)
    assert fragment in info.value.message
    assert template in info.value.message


def test_loaded_model_built_with_template_edits_like_builtin(bytelevel_tokenizer):
    # A LoadedModel whose adapter came from a template computes the same key as the built-in.
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    templated = LoadedModel(
        model=lm.model, tokenizer=lm.tokenizer, adapter=adapter_for(lm.model, "transformer.h.{}.mlp.c_proj"), spec="t"
    )
    assert templated.lm_head_name == lm.lm_head_name
    prefixes = ["The city. "]
    assert torch.equal(
        rome.compute_key(templated, 1, TEMPLATE, SUBJECT, prefixes),
        rome.compute_key(lm, 1, TEMPLATE, SUBJECT, prefixes),
    )


# ----------------------------------------------------------------------------- key statistics per model
def test_stats_cache_is_not_reused_for_a_model_differing_below_the_layer(sentencepiece_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS), encoding="utf-8")
    lm = tiny_loaded("llama", sentencepiece_tokenizer)

    def stats(cache: str):
        return rome.load_or_compute_stats(
            lm, [1], lm.base_hash(), n_tokens=200, seq_len=16, seed=0, corpus=str(corpus), cache_dir=tmp_path / cache
        )[1].mom2

    from romebatch.model import LoadedModel

    original = stats("shared")
    base = lm.base_hash()
    with torch.no_grad():  # an attention-only change at layer 0, as an attention-only fine-tune makes
        lm.model.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(3.0)
        lm.model.get_submodule("model.layers.0.self_attn.v_proj").weight.mul_(3.0)
    assert lm.base_hash() == base  # no down-projection changed...
    # The fine-tuned model is loaded anew (a LoadedModel hashes its weights once, when first asked).
    lm = LoadedModel(model=lm.model, tokenizer=lm.tokenizer, adapter=lm.adapter, spec="fine-tuned")
    fresh = stats("fresh")
    assert not torch.allclose(fresh, original, rtol=1e-3, atol=1e-4)  # ...but the keys at layer 1 did
    assert torch.allclose(stats("shared"), fresh, rtol=1e-5, atol=1e-6)
