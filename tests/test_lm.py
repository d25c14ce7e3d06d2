"""Tests for romebatch.lm: subject token indices, padding, head-only logits, answer tokens.

References are computed another way: tokenising the text up to the subject's end, running
a prompt alone instead of in a padded batch, and the model's own full `.logits`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FAMILIES, tiny_loaded

import romebatch.rome.keys as keys_module
from romebatch.hooks import Hook, attach
from romebatch.lm import (
    Encoded,
    answer_ids,
    encode,
    head_inputs,
    last_token_in_span,
    logits,
    make_batch,
    model_inputs,
    subject_last_index,
)
from romebatch.rome.keys import keys_at

TOKENIZERS = ["bytelevel_tokenizer", "sentencepiece_tokenizer"]

# (prefix, template, subject): the subject first, in the middle, last, and after a prefix.
SUBJECT_CASES = [
    ("", "{} is located in the city of", "The Space Needle"),
    ("", "{} is in London.", "Big Ben"),
    ("", "The mother tongue of {} is", "Danielle Darrieux"),
    ("", "Where is {} located? It is in", "the Space Needle"),
    ("", "The landmark of Seattle is {}", "the Space Needle"),
    ("Therefore, because I think you might know. ", "{} is located in the city of", "The Eiffel Tower"),
    ("The quick brown fox. ", "The mother tongue of {} is", "Michel Rocard"),
]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("prefix, template, subject", SUBJECT_CASES)
def test_subject_last_index_points_at_subjects_last_token(tok_name, prefix, template, subject, request):
    tok = request.getfixturevalue(tok_name)
    encoded, index = subject_last_index(tok, template, subject, prefix)
    text = prefix + template.format(subject)
    start = len(prefix) + template.index("{}")
    end = start + len(subject)
    assert text[start:end] == subject

    assert encoded.ids == encode(tok, text).ids
    assert 0 <= index < len(encoded.ids)
    bos = tok.bos_token_id
    assert encoded.ids[index] != bos  # BOS (or any special) is never chosen
    assert encoded.offsets[index][1] > encoded.offsets[index][0]
    if tok_name == "sentencepiece_tokenizer":
        assert encoded.ids[0] == bos  # the case this tokenizer exists for: indices shifted by BOS

    # Decoded up to the chosen token, the text ends with the subject; one token less, it does not.
    upto = tok.decode(encoded.ids[: index + 1], skip_special_tokens=True)
    assert upto.endswith(subject), (upto, subject)
    assert not tok.decode(encoded.ids[:index], skip_special_tokens=True).endswith(subject)
    # No token up to the chosen one starts after the subject; the next token starts at or after its end.
    assert all(s < end for s, e in encoded.offsets[: index + 1] if e > s)
    if index + 1 < len(encoded.ids):
        assert encoded.offsets[index + 1][0] >= end
    # Reference: the subject is followed by a space/punctuation, so tokenising the text up to the
    # subject's end gives the same tokens, and its last one is the subject's last.
    reference = encode(tok, text[:end]).ids
    assert reference == encoded.ids[: index + 1]
    assert index == len(reference) - 1


def test_token_running_past_subject_is_still_its_last(sentencepiece_tokenizer):
    # SentencePiece splits on spaces only: "Needle?" is one token running past the subject's end.
    tok = sentencepiece_tokenizer
    encoded, index = subject_last_index(tok, "Where is {}? It is in", "the Space Needle")
    end = len("Where is the Space Needle")
    start, stop = encoded.offsets[index]
    assert start < end < stop  # the merged token: it covers the subject's last character and more
    assert tok.decode(encoded.ids[: index + 1], skip_special_tokens=True) == "Where is the Space Needle?"
    assert encoded.offsets[index - 1][1] < end


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_subject_at_start_is_right_after_bos_or_at_zero(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    one_token_subject = "The"  # a single token in both vocabularies
    encoded, index = subject_last_index(tok, "{} Space Needle is in", one_token_subject)
    has_bos = encoded.ids[0] == tok.bos_token_id
    assert has_bos == (tok_name == "sentencepiece_tokenizer")
    assert index == (1 if has_bos else 0)


def test_last_token_in_span_on_handmade_offsets():
    # <bos> "The" " Space" " Needle's" " is" <eos>: specials have empty spans.
    enc = Encoded(ids=[1, 10, 11, 12, 13, 2], offsets=[(0, 0), (0, 3), (3, 9), (9, 18), (18, 21), (0, 0)])
    assert last_token_in_span(enc, 0, 3) == 1  # BOS shares start 0 but is never chosen
    assert last_token_in_span(enc, 4, 16) == 3  # "Space Needle": token 3 runs past the span, still counts
    assert last_token_in_span(enc, 4, 9) == 2
    assert last_token_in_span(enc, 19, 21) == 4  # EOS (empty span) after it is skipped
    with pytest.raises(ValueError):
        last_token_in_span(enc, 30, 35)
    with pytest.raises(ValueError):
        last_token_in_span(Encoded(ids=[1], offsets=[(0, 0)]), 0, 1)


# ----------------------------------------------------------------------------- batching
def test_make_batch_layout_and_positions():
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    right = make_batch(seqs, pad_id=0, side="right")
    left = make_batch(seqs, pad_id=0, side="left")
    assert right.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert left.input_ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8], [9, 10, 11, 12, 13]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert left.attention_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1] * 5]
    assert right.offsets.tolist() == [0, 0, 0]
    assert left.offsets.tolist() == [2, 4, 0]
    for batch in (left, right):
        for row, seq in enumerate(seqs):
            cols = [batch.column(row, i) for i in range(len(seq))]
            assert batch.input_ids[row, cols].tolist() == seq
            assert batch.position_ids[row, cols].tolist() == list(range(len(seq)))


@pytest.mark.parametrize("family", FAMILIES)  # GPT-2/OPT: absolute positions; the rest: rotary
def test_key_at_subject_is_independent_of_padding_side(family, tokenizer_for, monkeypatch):
    tok = tokenizer_for(family)
    lm = tiny_loaded(family, tok)
    encoded, index = subject_last_index(tok, "The landmark of Seattle is {}", "the Space Needle")
    longer = encode(tok, "Therefore, because I think you might know the answer, it is a tower in a city.").ids
    shorter = encode(tok, "Big Ben").ids
    assert len(shorter) < len(encoded.ids) < len(longer)

    alone = keys_at(lm, 1, [encoded.ids], [index])[0]
    for side in ("left", "right"):
        batch = make_batch([longer, encoded.ids, shorter], lm.pad_id, side=side)
        assert int(batch.attention_mask[1].sum()) < batch.input_ids.shape[1]  # the row is really padded
        monkeypatch.setattr(keys_module, "make_batch", functools.partial(make_batch, side=side))
        batched = keys_at(lm, 1, [longer, encoded.ids, shorter], [3, index, len(shorter) - 1])
        monkeypatch.undo()
        assert torch.allclose(batched[1], alone, atol=1e-5, rtol=1e-5), (side, (batched[1] - alone).abs().max())
        # The other rows too: each equals its own unbatched key.
        assert torch.allclose(batched[0], keys_at(lm, 1, [longer], [3])[0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(batched[2], keys_at(lm, 1, [shorter], [len(shorter) - 1])[0], atol=1e-5, rtol=1e-5)


def test_left_padding_without_explicit_positions_would_differ(bytelevel_tokenizer):
    # Control for the test above: GPT-2 needs the explicit position ids, so the test can fail.
    tok = bytelevel_tokenizer
    lm = tiny_loaded("gpt2", tok)
    encoded, index = subject_last_index(tok, "The landmark of Seattle is {}", "the Space Needle")
    longer = encode(tok, "Therefore, because I think you might know the answer, it is a tower in a city.").ids
    batch = make_batch([longer, encoded.ids], lm.pad_id, side="left")
    captured = []
    hook = Hook(lm.name("down_proj", 1), lambda x: captured.append(x[1, batch.column(1, index)]), on="input")
    with attach(lm.model, [hook]), torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    alone = keys_at(lm, 1, [encoded.ids], [index])[0]
    assert not torch.allclose(captured[0], alone, atol=1e-3)


# ----------------------------------------------------------------------------- head-only logits
def _check_head_logits(lm, tok):
    prompts = ["The Space Needle is located in the city of", "Big Ben is", "Where is the Eiffel Tower? It is in"]
    seqs = [encode(tok, p).ids for p in prompts]
    for side in ("right", "left"):
        batch = make_batch(seqs, lm.pad_id, side=side)
        picks = [(0, 0), (0, len(seqs[0]) - 1), (1, len(seqs[1]) - 1), (2, 2), (2, len(seqs[2]) - 1), (1, 1)]
        rows = torch.tensor([r for r, _ in picks])
        cols = torch.tensor([batch.column(r, i) for r, i in picks])
        with torch.no_grad():
            got = logits(lm, head_inputs(lm, batch, rows, cols))
            full = lm.model(**model_inputs(lm, batch), use_cache=False).logits
        assert got.shape == (len(picks), full.shape[-1])
        assert got.dtype == torch.float32
        assert torch.allclose(got, full[rows, cols].float(), atol=1e-5, rtol=1e-5), (got - full[rows, cols]).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_inputs_and_logits_equal_model_logits(family, tokenizer_for):
    tok = tokenizer_for(family)
    lm = tiny_loaded(family, tok)  # gemma2's logits are soft-capped: the head must cap them too
    _check_head_logits(lm, tok)


def test_head_logits_apply_gemma2_final_softcapping(sentencepiece_tokenizer):
    from transformers import AutoModelForCausalLM, Gemma2Config

    from romebatch.adapters import adapter_for
    from romebatch.model import LoadedModel

    tok = sentencepiece_tokenizer
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        head_dim=16,
        sliding_window=8,
        query_pre_attn_scalar=16,
        final_logit_softcapping=3.0,
    )
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=tok, adapter=adapter_for(model), spec="tiny-gemma2")
    assert lm.adapter.family == "llama"
    _check_head_logits(lm, tok)

    # Control: with the cap this small, the raw head output differs, so the cap is really applied.
    batch = make_batch([encode(tok, "Big Ben is").ids], lm.pad_id)
    rows, cols = torch.tensor([0, 0]), torch.tensor([1, 3])
    hidden = head_inputs(lm, batch, rows, cols)
    raw = model.get_output_embeddings()(hidden)
    capped = logits(lm, hidden)
    assert raw.abs().max() > 3.0
    assert capped.abs().max() <= 3.0
    assert torch.allclose(capped, torch.tanh(raw / 3.0) * 3.0, atol=1e-6)


# ----------------------------------------------------------------------------- answers
ANSWER_CASES = [
    ("The Space Needle is located in the city of", "Seattle"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Where is the Space Needle? It is in", "Seattle, Washington"),
    ("Big Ben is located in the city of", "Tokyo"),
    ("Toko Yasuda plays the", "guitar."),
    ("The city of ", "Berlin"),  # a prompt ending in a space
]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("prompt, answer", ANSWER_CASES)
def test_answer_ids_continue_the_prompt_tokenisation(tok_name, prompt, answer, request):
    tok = request.getfixturevalue(tok_name)
    got = answer_ids(tok, prompt, answer)
    assert got
    assert tok.bos_token_id not in got
    assert encode(tok, prompt).ids + got == encode(tok, prompt + " " + answer).ids
    assert tok.decode(got).strip() == answer
