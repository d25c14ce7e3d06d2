"""Causal tracing on tiny models of every family, checked against first principles."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import FAMILIES, tiny_loaded

from romebatch.causal_trace import average_trace, restored_probability, trace_fact

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"


@pytest.fixture(params=FAMILIES)
def lm(request, tokenizer_for):
    return tiny_loaded(request.param, tokenizer_for(request.param))


def test_restoring_everything_gives_the_clean_probability_and_nothing_the_corrupted(lm):
    result = trace_fact(lm, PROMPT, SUBJECT, samples=3)
    tokens = list(range(len(result.tokens)))
    every_layer = {lm.name("layer", layer): tokens for layer in range(lm.n_layers)}
    assert restored_probability(lm, PROMPT, SUBJECT, result.answer_id, every_layer, samples=3) == pytest.approx(
        result.p_clean, rel=1e-5
    )
    assert restored_probability(lm, PROMPT, SUBJECT, result.answer_id, {}, samples=3) == pytest.approx(
        result.p_corrupt, rel=1e-6
    )
    # The noise really corrupts, and the batched grid agrees with the one-at-a-time restoration.
    assert result.p_corrupt != pytest.approx(result.p_clean, rel=1e-3)
    last_layer, last_token = lm.n_layers - 1, len(result.tokens) - 1
    assert result.scores["hidden"][last_token, last_layer] == pytest.approx(result.p_clean, rel=1e-5)
    for layer, token in [(0, result.subject_last), (lm.n_layers // 2, 1)]:
        single = restored_probability(
            lm, PROMPT, SUBJECT, result.answer_id, {lm.name("layer", layer): [token]}, samples=3
        )
        assert result.scores["hidden"][token, layer] == pytest.approx(single, rel=1e-4, abs=1e-7)


def test_mlp_window_restoration_matches_restoring_each_layer_of_the_window(tokenizer_for):
    lm = tiny_loaded("llama", tokenizer_for("llama"))
    result = trace_fact(lm, PROMPT, SUBJECT, kinds=("mlp",), samples=2, window=2)
    token = result.subject_last
    for layer in range(lm.n_layers):
        low, high = max(0, layer - 1), min(lm.n_layers - 1, layer)  # window 2 around `layer`
        restore = {lm.name("mlp", m): [token] for m in range(low, high + 1)}
        expected = restored_probability(lm, PROMPT, SUBJECT, result.answer_id, restore, samples=2)
        assert result.scores["mlp"][token, layer] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_subject_tokens_and_answer(tokenizer_for):
    lm = tiny_loaded("gpt2", tokenizer_for("gpt2"))
    result = trace_fact(lm, PROMPT, SUBJECT, kinds=("hidden",), samples=1)
    first, last = result.subject_tokens
    assert "".join(result.tokens[first : last + 1]).strip() == SUBJECT
    import torch

    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert result.answer_id == int(lm.model(ids).logits[0, -1].argmax())  # the model's own prediction
    with pytest.raises(ValueError):
        trace_fact(lm, PROMPT, "Eiffel", samples=1)


def test_average_recommends_the_layer_with_the_largest_mlp_effect(tokenizer_for):
    lm = tiny_loaded("llama", tokenizer_for("llama"))
    facts = [(PROMPT, SUBJECT, None), ("Big Ben is located in the city of", "Big Ben", None)]
    effect, layer, results = average_trace(lm, facts, samples=2)
    assert effect.shape == (lm.n_layers,) and layer == int(np.argmax(effect))
    manual = np.mean([r.effect("mlp")[r.subject_last] for r in results], axis=0)
    assert np.allclose(effect, manual)


def test_cli_writes_a_png_and_a_table_and_caches_the_layer(tiny_folder, tmp_path, monkeypatch):
    from romebatch.cli import main

    folder = tiny_folder("llama")
    png, table = tmp_path / "trace.png", tmp_path / "trace.csv"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "romebatch",
            "trace",
            "--model",
            str(folder),
            "--prompt",
            PROMPT,
            "--subject",
            SUBJECT,
            "--samples",
            "2",
            "--out",
            str(png),
            "--results",
            str(table),
        ],
    )
    main()
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import polars as pl

    frame = pl.read_csv(table)
    assert set(frame["kind"].unique()) == {"hidden", "mlp", "attn"}
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"known_id": 0, "subject": SUBJECT, "prompt": PROMPT, "attribute": "Seattle"}]))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "romebatch",
            "trace",
            "--model",
            str(folder),
            "--facts",
            str(known),
            "--samples",
            "2",
            "--out",
            str(tmp_path / "avg.png"),
            "--json",
        ],
    )
    main()
    from romebatch.layer_cache import load_recommendation
    from romebatch.model import load_model

    recommended = load_recommendation(load_model(str(folder)))
    assert recommended is not None and 0 <= recommended < 3
    assert (tmp_path / "avg.png").stat().st_size > 1000


def test_concurrent_layer_cache_writers_never_collide(tmp_path, monkeypatch):
    """Regression: every writer used the same `layers.tmp`, so two runs saving at once raced
    (one renamed the other's half-written file, or found its own gone)."""
    import threading
    from types import SimpleNamespace

    import numpy as np

    from romebatch.layer_cache import _read_layers, save_recommendation

    monkeypatch.setenv("ROMEBATCH_HOME", str(tmp_path))
    errors = []

    def writer(k):
        lm = SimpleNamespace(full_hash=lambda: f"sha256:{k}", spec=f"model-{k}")
        try:
            for _ in range(200):
                save_recommendation(lm, k, np.zeros(3), 1)
        except Exception as error:  # noqa: BLE001 - any failure is the defect
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = _read_layers(tmp_path / "layers.json")
    assert data and all(entry["layer"] == int(key.split(":")[1]) for key, entry in data.items())
    assert not list(tmp_path.glob("*.tmp"))
