"""The cached v* engine computes what the plain one does, on every architecture.

The plain ("exact") engine runs every token through every layer with full logits at
every step, as the original ROME code; the cached one runs the tokens before each row's
subject once and steps only the rest. Their logits at the read positions, their gradients
with respect to δ, and the v* they converge to must agree.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_config

from romebatch.adapters import adapter_for
from romebatch.model import LoadedModel
from romebatch.rome import values as V
from romebatch.rome.head import one_pass_reads

PREFIXES = ["The city. ", "Therefore it is a long story about many things. ", "I. "]
# The tiny Gemma-2 and Gemma-3 configs have an 8-token sliding window, which these prompts
# exceed (the cached engine then falls back to the exact one); widen it to exercise the cache.
WIDENED = 64


def window_for(family):
    return WIDENED if family in ("gemma2", "gemma3_text") else None


def loaded(family, tokenizer, sliding_window=None):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, len(tokenizer))
    if sliding_window is not None:
        config.sliding_window = sliding_window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=f"tiny-{family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_matches_exact_logits_and_gradient(family, tokenizer_for):
    lm = loaded(family, tokenizer_for(family), sliding_window=window_for(family))
    rows = V.build_rows(lm, "{} is located in the city of", "The Space Needle", "Paris", PREFIXES)
    assert len({s for s in rows.subject_index}) > 1  # rows really are misaligned
    assert V.cached_hidden(lm, 0, rows) is not None  # the cache really runs (no fallback to exact)
    d_model = lm.config.hidden_size
    for layer in range(lm.n_layers):
        exact, cached = V.exact_forward(lm, layer, rows), V.cached_forward(lm, layer, rows)
        for seed in range(2):
            delta = (torch.randn(d_model, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
            a = exact(delta)
            (grad_a,) = torch.autograd.grad(a.log_softmax(-1)[:, 5].sum(), delta)
            b = cached(delta)
            (grad_b,) = torch.autograd.grad(b.log_softmax(-1)[:, 5].sum(), delta)
            assert a.shape == b.shape == (len(rows.read_rows), lm.config.vocab_size)
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grad_b, grad_a, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(cached(None), exact(None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_engine_reads_the_head_in_one_pass_as_the_exact_engine_reads_it(family, tokenizer_for, monkeypatch):
    lm = loaded(family, tokenizer_for(family), sliding_window=window_for(family))
    if family == "gemma3_text":
        lm.config.final_logit_softcapping = 5.0  # a tighter cap than gemma2's 30, through the one-pass head
    passes = []
    monkeypatch.setattr(V, "one_pass_reads", lambda *a, **k: passes.append(1) or one_pass_reads(*a, **k))
    rows = V.build_rows(lm, "{} is located in the city of", "The Space Needle", "Paris", PREFIXES, "Seattle")
    exact, cached = V.step_reads(lm, 1, rows, "exact"), V.step_reads(lm, 1, rows, "cached")
    delta = (10 * torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    weights = torch.randn(len(rows.read_rows), generator=torch.Generator().manual_seed(3))
    grads = []
    for reads in (exact(delta), cached(delta)):
        (grad,) = torch.autograd.grad((reads.target_logp * weights).sum() + 0.5 * reads.kl, delta)
        grads.append((reads, grad))
    (a, grad_a), (b, grad_b) = grads
    assert passes  # the cached engine did not fall back to the plain head
    assert float(grad_a.norm()) > 1e-3  # δ reaches the reads
    torch.testing.assert_close(b.target_logp, a.target_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.kl, a.kl, atol=1e-4, rtol=1e-3)
    assert torch.equal(b.argmax, a.argmax)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_engines_converge_to_the_same_value(family, tokenizer_for):
    lm = loaded(family, tokenizer_for(family))
    v_init = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    results = [
        V.optimise_value(
            lm,
            1,
            "{} is located in the city of",
            "The Space Needle",
            "Paris",
            PREFIXES,
            v_init,
            lr=1.0,
            steps=15,
            clamp_norm_factor=20.0,
            engine=engine,
        )
        for engine in V.ENGINES
    ]
    assert results[0].steps == results[1].steps > 0
    assert (results[0].v_star - v_init.float()).norm() > 0.1  # δ really moved
    torch.testing.assert_close(results[0].v_star, results[1].v_star, atol=1e-3, rtol=1e-3)


def test_unknown_engine_is_refused(tokenizer_for):
    lm = loaded("gpt2", tokenizer_for("gpt2"))
    with pytest.raises(ValueError, match="engine"):
        V.optimise_value(lm, 0, "{} is in", "Big Ben", "London", [], torch.zeros(32), engine="fast")
