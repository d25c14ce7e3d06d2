"""`--device cuda` end to end on a tiny model: skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.model import weight_hash
from romebatch.rome import values as V

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FACTS = [
    Fact(id="needle", subject="The Space Needle", prompt="{} is located in the city of", target_new="Paris"),
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo"),
]


def on_cuda(family, tokenizer):
    lm = tiny_loaded(family, tokenizer)
    lm.model.to("cuda")
    return lm


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engines_agree_on_cuda(family, tokenizer_for):
    lm = on_cuda(family, tokenizer_for(family))
    rows = V.build_rows(lm, "{} is located in the city of", "The Space Needle", "Paris", ["The city. ", "I. "])
    delta = torch.randn(lm.config.hidden_size, device="cuda")
    torch.testing.assert_close(
        V.cached_forward(lm, 1, rows)(delta), V.exact_forward(lm, 1, rows)(delta), atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("preserve", ["none", "nullspace"])
def test_apply_rollback_replay_on_cuda(tmp_path, bytelevel_tokenizer, preserve):
    lm = on_cuda("gpt2", bytelevel_tokenizer)
    base = weight_hash(lm.weight(1))
    with Editor(
        tmp_path / "journal", lm=lm, hparams=HParams(**{**TINY_HPARAMS, "preserve": preserve}), log=lambda m: None
    ) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert [r.status for r in result.results] == ["applied", "applied"]
        assert all(r.p_new_after > r.p_new_before for r in result.results)
        head = weight_hash(lm.weight(1))
        editor.rollback(base=True)
        assert weight_hash(lm.weight(1)) == base
        editor.replay(2)
        assert weight_hash(lm.weight(1)) == head


# Issue 20's mechanisms together, with repair passes, on the Gemma-3 path: every tensor they
# touch (C's eigenvectors, the earlier keys, the norm pull, the argmax stop) lives on the CPU
# in float64 or on the model's device, and a mix-up shows only on a real GPU.
SEQUENTIAL = {"preserve": "covariance", "preserve_top_k": 4, "norm_penalty": 0.01, "v_stop_argmax": True}


def test_sequential_mechanisms_on_cuda(tmp_path, tokenizer_for):
    lm = on_cuda("gemma3_text", tokenizer_for("gemma3_text"))
    base = weight_hash(lm.weight(1))
    with Editor(
        tmp_path / "journal", lm=lm, hparams=HParams(**{**TINY_HPARAMS, **SEQUENTIAL}), log=lambda m: None
    ) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=1)
        assert {r.status for r in result.results} <= {"applied", "repaired"}
        head, state = weight_hash(lm.weight(1)), editor.head
        assert head != base
        editor.rollback(base=True)
        assert weight_hash(lm.weight(1)) == base
        editor.replay(state)
        assert weight_hash(lm.weight(1)) == head
