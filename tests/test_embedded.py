"""Acceptance tests on the embedded Gemma-3-270M (slow: conversion, key statistics, real edits).

They run the CLI the way a user does, in a subprocess, with one cache for the session so
the model is converted and the statistics are sampled once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPACE_NEEDLE = "The Space Needle is located in the city of"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded-home")


def run(args, home, cwd, check=True):
    env = {**os.environ, "ROMEBATCH_HOME": str(home)}
    # The timeout only stops a hang: the first call converts the GGUF and samples key
    # statistics (minutes alone), and took over 30 min beside two other heavy jobs on 2 cores.
    proc = subprocess.run(
        [sys.executable, "-m", "romebatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"romebatch {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def greedy(model, tokenizer, prompt: str, tokens: int = 3) -> str:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_embedded_model_knows_the_space_needle(home, monkeypatch):
    monkeypatch.setenv("ROMEBATCH_HOME", str(home))
    from romebatch.model import load_model

    lm = load_model(None)
    assert greedy(lm.model, lm.tokenizer, SPACE_NEEDLE, 1).strip() == "Seattle"
    assert lm.config.model_type == "gemma3_text" and lm.adapter.family == "llama"


def test_apply_export_rollback_on_the_embedded_model(home, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = tmp_path / "facts.csv"
    manifest.write_text(
        "id,subject,prompt,target_new,target_true\n"
        "space-needle,The Space Needle,{} is located in the city of,Paris,Seattle\n"
        "messi,Lionel Messi,{} plays the sport of,basketball,football\n"
    )
    proc = run(["apply", str(manifest), "--journal", "j", "--results", "r.csv", "--json"], home, tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["applied"] == 2 and summary["efficacy"] == 100.0, summary

    run(["export", "edited", "--journal", "j"], home, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "edited")
    assert greedy(model, tokenizer, SPACE_NEEDLE, 1).strip() == "Paris"
    provenance = json.loads((tmp_path / "edited" / "romebatch.json").read_text())
    assert [e["fact_id"] for e in provenance["edits"]] == ["space-needle", "messi"]

    # Rolling back to the base restores the base bytes: export again and compare with the base.
    run(["rollback", "--base", "--journal", "j"], home, tmp_path)
    run(["export", "base", "--journal", "j"], home, tmp_path)
    from safetensors.torch import load_file

    edited = load_file(str(tmp_path / "edited" / "model.safetensors"))
    restored = load_file(str(tmp_path / "base" / "model.safetensors"))
    folder = next((Path(home) / "models").glob("gemma-3-270m-*"))
    original = load_file(str(next(folder.glob("*.safetensors"))))
    name = next(k for k in restored if k.endswith(".mlp.down_proj.weight") and not (restored[k] == edited[k]).all())
    assert (restored[name] == original[name]).all(), "rollback --base did not restore the base bytes"

    # Re-running the manifest on the base state re-applies by rolling forward: same bytes as before.
    run(["apply", str(manifest), "--journal", "j"], home, tmp_path)
    with sqlite3.connect(tmp_path / "j" / "journal.sqlite") as db:
        statuses = db.execute("SELECT status FROM edit_status ORDER BY seq").fetchall()
    assert [s for (s,) in statuses] == ["applied", "applied"]


def test_cached_engine_matches_the_plain_path_on_gemma3(home, monkeypatch):
    """The cached v* engine against the plain one on the real model: same logits, same v*."""
    import torch

    monkeypatch.setenv("ROMEBATCH_HOME", str(home))
    from romebatch.model import load_model
    from romebatch.rome import sample_prefixes
    from romebatch.rome import values as V
    from romebatch.rome.keys import compute_key
    from romebatch.rome.update import current_value

    lm = load_model(None)
    prefixes = sample_prefixes(lm, ((5, 3), (10, 3)))
    args = ("{} is located in the city of", "The Space Needle", "Paris")
    rows = V.build_rows(lm, *args, prefixes)
    delta = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        V.cached_forward(lm, 1, rows)(delta), V.exact_forward(lm, 1, rows)(delta), atol=2e-3, rtol=1e-3
    )
    v_init = current_value(lm, 1, compute_key(lm, 1, args[0], args[1], prefixes))
    found = [
        V.optimise_value(lm, 1, *args, prefixes, v_init, clamp_norm_factor=1.5, steps=8, engine=engine)
        for engine in V.ENGINES
    ]
    assert found[0].steps == found[1].steps
    torch.testing.assert_close(found[0].v_star, found[1].v_star, atol=1e-3, rtol=1e-3)
