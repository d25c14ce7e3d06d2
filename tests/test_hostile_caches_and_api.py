"""Hostile caches in $ROMEBATCH_HOME and wrong-typed API arguments: each is named in one line,
never used silently and never a traceback (romebatch/rome/stats_cache.py, presets.py, layer_cache.py,
api.py, api_read.py, hparams.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

import romebatch
from romebatch import api
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.rome import stats_cache
from romebatch.rome.stats import load_or_compute_stats

STATS = dict(n_tokens=200, seq_len=32, seed=0, sampling="plain")


@pytest.fixture(scope="module")
def lm(bytelevel_tokenizer):
    return tiny_loaded("gpt2", bytelevel_tokenizer)


def _stats(lm, cache: Path, log=None):
    return load_or_compute_stats(lm, [1], "base", cache_dir=cache, log=log or (lambda m: None), **STATS)


def _cache_file(cache: Path) -> Path:
    (path,) = cache.glob("*.safetensors")
    return path


@pytest.fixture(scope="module")
def fresh(lm, tmp_path_factory):
    """The statistics of layer 1, computed once, and the cache file they were written to."""
    cache = tmp_path_factory.mktemp("stats")
    return _stats(lm, cache)[1], _cache_file(cache)


def _reload(lm, tmp_path, data: bytes):
    cache = tmp_path / "stats"
    cache.mkdir()
    path = cache / _fresh_name
    path.write_bytes(data)
    logged: list[str] = []
    result = _stats(lm, cache, logged.append)[1]
    return result, logged, path


_fresh_name = ""


@pytest.fixture(autouse=True)
def _name(fresh):
    global _fresh_name
    _fresh_name = fresh[1].name


def test_a_clean_cache_is_used_without_a_word(lm, fresh, tmp_path):
    result, logged, _ = _reload(lm, tmp_path, fresh[1].read_bytes())
    assert torch.equal(result.mom2, fresh[0].mom2) and logged == []


def test_two_flipped_bytes_in_the_tensor_data_are_detected_and_recomputed(lm, fresh, tmp_path):
    data = bytearray(fresh[1].read_bytes())
    for at in (len(data) - 40, len(data) - 400):  # inside mom2's data (the file ends with it)
        data[at] ^= 0x10
    result, logged, path = _reload(lm, tmp_path, bytes(data))
    assert torch.equal(result.mom2, fresh[0].mom2) and result.tokens == fresh[0].tokens
    assert len(logged) >= 2 and "checksum does not match" in logged[0] and path.name in logged[0]
    rewritten, problem = stats_cache.read_cached(path, 1, len(fresh[0].mom2), STATS["n_tokens"])
    assert (
        problem == "" and rewritten is not None and torch.equal(rewritten[0], fresh[0].mom2)
    )  # the good statistics replaced the bad file


def _forged(fresh, mom2=None, tokens=None, checksum=True) -> bytes:
    """A cache file with a valid checksum for bad contents (an attacker who rewrote it whole)."""
    from safetensors.torch import save as save_bytes

    good = fresh[0]
    tensors = {
        "mom2": (good.mom2 if mom2 is None else mom2).contiguous(),
        "tokens": torch.tensor([good.tokens if tokens is None else tokens]),
    }
    metadata = {"corpus": "x", "layer": "1", "base": "base"}
    if checksum:
        metadata |= stats_cache.checksum_metadata(tensors)
    return save_bytes(tensors, metadata=metadata)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("nan", "NaN"),
        ("shape", "shape (7, 7)"),
        ("float16", "float16"),
        ("tokens0", "token count 0"),
        ("old-nan", "NaN"),
    ],
)
def test_a_forged_or_old_cache_is_reported_and_recomputed(lm, fresh, tmp_path, case, expected):
    good = fresh[0].mom2
    forged = {
        "nan": lambda: _forged(fresh, mom2=torch.where(torch.eye(len(good), dtype=torch.bool), float("nan"), good)),
        "shape": lambda: _forged(fresh, mom2=torch.eye(7)),
        "float16": lambda: _forged(fresh, mom2=good.half()),
        "tokens0": lambda: _forged(fresh, tokens=0),
        "old-nan": lambda: _forged(fresh, mom2=good * float("nan"), checksum=False),
    }[case]()
    result, logged, _ = _reload(lm, tmp_path, forged)
    assert torch.equal(result.mom2, fresh[0].mom2)
    assert expected in logged[0], logged
    result.factor(1e-3)  # usable: no LinAlgError from a NaN C


def test_a_forged_cache_that_is_not_positive_definite_is_one_line_not_a_linalg_error(lm, fresh, tmp_path):
    # Finite, non-negative diagonal, a valid checksum: every file check passes, the factor cannot.
    good = fresh[0].mom2
    indefinite = good - 2 * torch.linalg.eigvalsh(good.double()).max().float() * torch.eye(len(good))
    indefinite.diagonal().clamp_(min=0.0)
    result, logged, _ = _reload(lm, tmp_path, _forged(fresh, mom2=indefinite))
    assert logged == [] and torch.equal(result.mom2, indefinite)
    with pytest.raises(UserError, match=r"key statistics C of layer 1 .* not positive definite") as caught:
        result.factor(1e-3)
    assert "stats" in (caught.value.hint or "")
    fresh[0].factor(1e-3)  # the real C factors


def test_an_old_cache_without_a_checksum_is_kept_when_sound_and_stamped(lm, fresh, tmp_path):
    # Journals were edited with it: recomputing it would change C under them. Its shape and
    # values are checked, then a checksum is recorded, so a later change to it is caught.
    old = fresh[0].mom2 * 2
    result, logged, path = _reload(lm, tmp_path, _forged(fresh, mom2=old, checksum=False))
    assert torch.equal(result.mom2, old)
    assert len(logged) == 1 and "without a checksum" in logged[0] and "kept" in logged[0]
    stamped, problem = stats_cache.read_cached(path, 1, len(old), STATS["n_tokens"])
    assert problem == "" and stamped is not None and torch.equal(stamped[0], old)
    data = bytearray(path.read_bytes())
    data[len(data) - 40] ^= 0x10
    path.write_bytes(bytes(data))
    assert (
        stats_cache.read_cached(path, 1, len(old), STATS["n_tokens"])[1] == "its checksum does not match its contents"
    )


def test_garbage_presets_json_is_one_line_naming_the_file(lm, tmp_path):
    from romebatch.presets import fill_defaults, presets_path

    path = presets_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text("[" * 100000)
        with pytest.raises(UserError) as caught:
            fill_defaults(HParams(), lm)
        assert str(path) in caught.value.message and "\n" not in caught.value.message
        # An entry for this model, out of range: blamed on the file, not on an option never given.
        path.write_text(json.dumps({lm.full_hash(): {"values": {"layer": 99}}}))
        with pytest.raises(UserError, match=r"preset for tiny-gpt2 in .*presets.json: layer 99"):
            fill_defaults(HParams(), lm)
        path.write_text(json.dumps({lm.full_hash(): {"values": {"clamp_norm_factor": float("nan")}}}))
        with pytest.raises(UserError, match=r"presets.json: clamp_norm_factor must be"):
            fill_defaults(HParams(), lm)
    finally:
        path.unlink(missing_ok=True)


def test_a_cached_layer_out_of_the_models_range_is_ignored_with_a_warning(lm):
    from romebatch.home import romebatch_home
    from romebatch.layer_cache import load_recommendation

    path = romebatch_home() / "layers.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        logged: list[str] = []
        path.write_text(json.dumps({lm.full_hash(): {"layer": 99}}))
        assert load_recommendation(lm, log=logged.append) is None
        assert len(logged) == 1 and "layer cache" in logged[0] and "layer 99" in logged[0]
        path.write_text("[" * 100000)
        assert load_recommendation(lm, log=logged.append) is None and "nested too deeply" in logged[1]
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files_in_place_of_the_json_caches_are_named_not_read(lm):
    # A FIFO would block the read forever; /dev/zero would be read until memory ran out.
    from romebatch.home import romebatch_home
    from romebatch.layer_cache import load_recommendation
    from romebatch.presets import fill_defaults, presets_path

    home = romebatch_home()
    home.mkdir(parents=True, exist_ok=True)
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        for make in (os.mkfifo, lambda p: os.symlink("/dev/zero", p)):
            for path in (presets_path(), home / "layers.json"):
                make(path)
            with pytest.raises(
                UserError, match=r"^presets file .*presets.json: is a (FIFO|device), not a regular file"
            ):
                fill_defaults(HParams(), lm)
            logged: list[str] = []
            assert load_recommendation(lm, log=logged.append) is None
            assert len(logged) == 1 and "layers.json: is a " in logged[0] and "tracing again" in logged[0]
            for path in (presets_path(), home / "layers.json"):
                path.unlink()
    finally:
        signal.alarm(0)
        for path in (presets_path(), home / "layers.json"):
            if path.is_symlink() or path.exists():
                path.unlink()


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda: api.apply("facts.jsonl", model=123), "apply: model must be a model name or folder"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", device=5), "apply: device must be text"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", limit="3"), "apply: limit must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", limit=True), "apply: limit must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", repair_every="x"), "apply: repair_every"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", hparams=[1]), "apply: hparams must be an HParams or a dict"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", hparams={"v_lr": "x"}), "apply: hparams: v_lr must be"),  # type: ignore[arg-type]
        (lambda: api.apply("facts.jsonl", hparams={"nope": 1}), "apply: hparams: unknown hyper-parameter"),  # type: ignore[arg-type]
        (lambda: api.rollback("j", to="1"), "rollback: to must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.curves("j", every="1"), "curves: every must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.log("j", limit="3"), "log: limit must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.verify("j", model=1.5), "verify: model must be"),  # type: ignore[arg-type]
        (lambda: api.trace("p {}", "s", samples="2"), "trace: samples must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.compare("j", at="1"), "compare: at must be a whole number"),  # type: ignore[arg-type]
        (lambda: api.edit(subject=1, prompt="{} is", target_new="x"), "edit: subject must be text"),  # type: ignore[arg-type]
    ],
)
def test_api_arguments_of_the_wrong_type_are_named(call, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        call()
    assert named in caught.value.message
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("fields", [{"v_lr": "x"}, {"layer": -5}, {"stats_tokens": True}, {"prefixes": "ab"}])
def test_hparams_are_checked_when_constructed(fields):
    with pytest.raises(UserError, match=f"HParams: {next(iter(fields))}"):
        HParams(**fields)


def test_verify_with_nothing_applied_does_not_pass(tmp_path, tiny_folder, monkeypatch, capsys):
    folder = tiny_folder("gpt2")
    journal = tmp_path / "J"
    quiet = lambda message: None  # noqa: E731
    romebatch.edit(
        subject="Big Ben",
        prompt="{} is located in the city of",
        target_new="Tokyo",
        target_true="London",
        journal=journal,
        model=str(folder),
        hparams=dict(TINY_HPARAMS),  # a dict is taken as the HParams fields
        log=quiet,
    )
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"id": "x", "subject": "The Eiffel Tower", "prompt": "{} is in", "target_new": "Rome"}) + "\n"
    )
    report = api.verify(journal, manifest=other, model=str(folder), log=quiet)
    assert not report.ok and report.rows == [] and "nothing was measured" in report.problems[0]
    from romebatch.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        ["romebatch", "verify", "--journal", str(journal), "--manifest", str(other), "--model", str(folder)],
    )
    with pytest.raises(SystemExit) as exit:
        main()
    captured = capsys.readouterr()
    assert exit.value.code == 1 and "Traceback" not in captured.err
    assert "nothing was measured: none of the facts of --manifest" in " ".join((captured.out + captured.err).split())
    assert api.verify(journal, model=str(folder), log=quiet).rows  # the applied fact itself is measured
