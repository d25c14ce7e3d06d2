"""The one-pass LM head (rome/head.py) reads what the plain head reads, gradient included.

The plain reference forms the full (rows, vocab) logits and lets autograd differentiate the
log-softmax; the one-pass head never forms them and supplies its own gradient.
"""

from __future__ import annotations

import pytest
import torch

from romebatch.rome.head import one_pass_reads, reads_from_logits


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [128, 1000, 4096])  # ragged last chunk, one exact chunk, one chunk for all
def test_one_pass_matches_the_plain_head(softcap, with_bias, chunk):
    generator = torch.Generator().manual_seed(0)
    rows, d, vocab = 7, 16, 1000
    weight = torch.randn(vocab, d, generator=generator)
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    hidden = (2 * torch.randn(rows, d, generator=generator)).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    base = torch.randn(vocab, generator=generator).log_softmax(-1)
    # A loss that weighs every read differently, so a wrong row in the gradient shows.
    weights, kl_weight = torch.randn(rows, generator=generator), 0.7

    def plain_logits(h):
        z = torch.nn.functional.linear(h, weight, bias)
        return torch.tanh(z / softcap) * softcap if softcap else z

    want = reads_from_logits(plain_logits(hidden), targets, base)
    (want_grad,) = torch.autograd.grad((want.target_logp * weights).sum() + kl_weight * want.kl, hidden)
    got = one_pass_reads(hidden, weight, bias, targets, base, softcap, chunk=chunk)
    (got_grad,) = torch.autograd.grad((got.target_logp * weights).sum() + kl_weight * got.kl, hidden)

    assert float(want.kl.detach()) > 0.1  # the essence read really differs from the base distribution
    assert len(set((want.argmax // 128).tolist())) > 1  # the maxima sit in different chunks
    torch.testing.assert_close(got.target_logp, want.target_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.kl, want.kl, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax, want.argmax)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


def test_one_pass_kl_is_zero_at_the_base_distribution():
    generator = torch.Generator().manual_seed(1)
    weight, hidden = torch.randn(300, 8, generator=generator), torch.randn(3, 8, generator=generator)
    base = torch.nn.functional.linear(hidden[-1], weight).log_softmax(-1)
    reads = one_pass_reads(hidden.requires_grad_(True), weight, None, torch.zeros(3, dtype=torch.long), base, chunk=64)
    (grad,) = torch.autograd.grad(reads.kl, hidden)
    assert abs(float(reads.kl.detach())) < 1e-5
    assert float(grad.abs().max()) < 1e-5  # the KL is at its minimum: no pull on any row


def test_a_pass_without_a_base_reads_its_own_essence_as_the_base():
    generator = torch.Generator().manual_seed(2)
    weight, hidden = torch.randn(300, 8, generator=generator), torch.randn(3, 8, generator=generator)
    targets = torch.tensor([5, 7, 0])
    own = one_pass_reads(hidden.requires_grad_(True), weight, None, targets, None, chunk=64)
    base = torch.nn.functional.linear(hidden[-1], weight).log_softmax(-1)
    given = one_pass_reads(hidden, weight, None, targets, base, chunk=64)
    torch.testing.assert_close(own.essence_logits.log_softmax(-1), base, atol=1e-5, rtol=1e-5)
    assert float(own.kl.detach()) == 0.0
    torch.testing.assert_close(own.target_logp, given.target_logp)
    (kl_grad,) = torch.autograd.grad(own.kl, hidden, retain_graph=True)
    assert not kl_grad.any()  # no pull at all, not a rounding's worth
    (grad,) = torch.autograd.grad(own.kl + own.target_logp.sum(), hidden)
    (want,) = torch.autograd.grad(given.kl + given.target_logp.sum(), hidden)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)
