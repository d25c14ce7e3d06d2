"""Sequential-stability methods (romebatch/rome/preserve.py): the math, and through the Editor.

- Each method's u is checked against an independent float64 computation.
- On a tiny GPT-2, "nullspace" keeps an earlier edit's output at its key through later
  edits (to float32 rounding), where plain ROME visibly moves it.
- The running state survives rollback and reopening byte for byte.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.rome.preserve import Preserver

FACTS = [
    Fact(id="needle", subject="The Space Needle", prompt="{} is located in the city of", target_new="Paris"),
    Fact(id="eiffel", subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo"),
    Fact(id="darrieux", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="Spain"),
]
LAYER = 1


def quiet(message: str) -> None:
    pass


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_methods_match_an_independent_solution(seed):
    d, n = 12, 4
    c = random_spd(d, seed)
    g = torch.Generator().manual_seed(100 + seed)
    keys = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(c)

    plain = Preserver("none", chol, d)
    plain.rebuild(keys)
    torch.testing.assert_close(plain.u(k_star), torch.linalg.inv(c) @ k_star)

    weight = 7.0
    cov = Preserver("covariance", chol, d, weight)
    cov.rebuild(keys)
    augmented = c.clone()
    for k in keys:  # λ · (k̂ᵀ C k̂) · k̂ k̂ᵀ
        unit = k / k.norm()
        augmented += weight * (unit @ c @ unit) * torch.outer(unit, unit)
    torch.testing.assert_close(cov.u(k_star), torch.linalg.inv(augmented) @ k_star)

    null = Preserver("nullspace", chol, d)
    null.rebuild(keys)
    u = null.u(k_star)
    K = torch.stack(keys, dim=1)
    # The minimiser of uᵀ C u subject to Kᵀ u = 0 and uᵀ k* fixed, from the KKT system.
    inv = torch.linalg.inv(c)
    alpha = torch.linalg.solve(K.T @ inv @ K, K.T @ inv @ k_star)
    torch.testing.assert_close(u, inv @ (k_star - K @ alpha))
    assert (K.T @ u).abs().max() < 1e-9 * u.norm()
    assert float(u @ k_star) > 0  # the edit can still be made


def test_nullspace_survives_parallel_keys():
    d = 8
    chol = torch.linalg.cholesky(random_spd(d, 0))
    k = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    null = Preserver("nullspace", chol, d)
    null.rebuild([k, 2 * k])  # a singular Gram matrix
    u = null.u(k + torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert torch.isfinite(u).all() and abs(float(u @ k)) < 1e-9 * float(u.norm() * k.norm())


def layer_output(lm, key: torch.Tensor) -> torch.Tensor:
    module = lm.module("down_proj", LAYER)
    with torch.no_grad():
        return module(key[None])[0].clone()


def run(tmp_path, tokenizer, preserve: str, **extra):
    lm = tiny_loaded("gpt2", tokenizer)
    hp = HParams(**{**TINY_HPARAMS, "preserve": preserve, **extra})
    outputs = []  # after each edit: the layer's output at every applied key so far
    editor = Editor(tmp_path / f"journal-{preserve}", lm=lm, hparams=hp, log=quiet)

    def on_edit(row):
        keys = [torch.from_numpy(r.k_star.copy()) for r in editor.journal.lineage()]
        outputs.append([layer_output(lm, k) for k in keys])

    result = editor.apply(FACTS, on_edit=on_edit, checks=None, repair_every=0)
    assert [r.status for r in result.results] == ["applied"] * len(FACTS), [r.reason for r in result.results]
    return editor, outputs


def test_nullspace_keeps_earlier_edits_exactly_and_plain_rome_does_not(tmp_path, bytelevel_tokenizer):
    editor, outputs = run(tmp_path, bytelevel_tokenizer, "nullspace")
    editor.close()
    first_after_own_edit = outputs[0][0]
    for later in outputs[1:]:
        torch.testing.assert_close(later[0], first_after_own_edit, atol=1e-4, rtol=1e-5)
    # Every earlier edit, not just the first, is held through every later one.
    for i in range(len(FACTS)):
        for later in outputs[i + 1 :]:
            torch.testing.assert_close(later[i], outputs[i][i], atol=1e-4, rtol=1e-5)

    plain, plain_outputs = run(tmp_path, bytelevel_tokenizer, "none")
    plain.close()
    drift = max(float((later[0] - plain_outputs[0][0]).abs().max()) for later in plain_outputs[1:])
    assert drift > 1e-2  # without protection the first edit's output does move


def test_covariance_moves_earlier_edits_less_than_plain_rome(tmp_path, bytelevel_tokenizer):
    def drift(preserve, **extra):
        editor, outputs = run(tmp_path / preserve, bytelevel_tokenizer, preserve, **extra)
        editor.close()
        return sum(float((later[0] - outputs[0][0]).norm()) for later in outputs[1:])

    assert drift("covariance", preserve_weight=1000.0) < 0.2 * drift("none")


def state_bytes(preserver: Preserver) -> bytes:
    """The running state's bytes (what a rollback must restore exactly)."""
    parts = [torch.stack(preserver.keys) if preserver.keys else torch.zeros(0)]
    if preserver.matrix is not None:
        parts.append(preserver.matrix)
    parts.append(preserver.solved)
    return b"".join(p.contiguous().numpy().tobytes() for p in parts)


@pytest.mark.parametrize("preserve", ["covariance", "nullspace"])
def test_rollback_and_reopen_restore_the_running_state_byte_exactly(tmp_path, bytelevel_tokenizer, preserve):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    directory = tmp_path / "journal"
    states = {}
    with Editor(directory, lm=lm, hparams=HParams(**{**TINY_HPARAMS, "preserve": preserve}), log=quiet) as editor:

        def on_edit(row):
            states[row.seq] = state_bytes(editor.preserver(LAYER))

        editor.apply(FACTS, on_edit=on_edit, checks=None, repair_every=0)
        assert len(set(states.values())) == len(FACTS)  # the state really changes with each edit
        editor.rollback(to=2)
        assert state_bytes(editor.preserver(LAYER)) == states[2]
        # Re-applying the rolled-back facts rolls them forward: the state follows the head.
        editor.apply(FACTS, checks=None, repair_every=0)
        assert editor.head == 4 and state_bytes(editor.preserver(LAYER)) == states[4]
        editor.rollback(to=1)
    with Editor(directory, lm=tiny_loaded("gpt2", bytelevel_tokenizer), log=quiet) as reopened:
        assert reopened.hparams.preserve == preserve
        assert state_bytes(reopened.preserver(LAYER)) == states[1]
        # A new edit on the rolled-back state is computed from state 1, not state 4.
        reopened.apply([FACTS[3]], checks=None, repair_every=0)
        hp = reopened.hparams
        expected = Preserver(
            preserve,
            reopened.stats(LAYER).cholesky,
            reopened.preserver(LAYER).d_ff,
            hp.preserve_weight,
            hp.preserve_top_k,
            hp.norm_penalty,
        )
        expected.rebuild([torch.from_numpy(r.k_star.copy()) for r in reopened.journal.lineage()])
        assert state_bytes(reopened.preserver(LAYER)) == state_bytes(expected)


def test_a_journal_keeps_the_method_it_was_started_with(tmp_path, bytelevel_tokenizer):
    directory = tmp_path / "journal"
    with Editor(
        directory, lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=HParams(**TINY_HPARAMS), log=quiet
    ) as editor:
        editor.apply(FACTS[:1], checks=None, repair_every=0)
    with pytest.raises(UserError, match="preserve='none'"):
        Editor(
            directory,
            lm=tiny_loaded("gpt2", bytelevel_tokenizer),
            hparams=HParams(**{**TINY_HPARAMS, "preserve": "nullspace"}),
            log=quiet,
        )


# ----------------------------------------------------------------------------- collapse guard
def disabling_compute_edit(lm, layer, *args, **kwargs):
    """Stands in for ROME: an edit that adds one huge vector to every token's MLP output."""
    from romebatch.rome import compute_edit
    from romebatch.rome.update import RankOneEdit

    edit, k_star, value = compute_edit(lm, layer, *args, **kwargs)
    g = torch.Generator().manual_seed(0)
    lam = 300.0 * torch.randn(edit.lam.shape, generator=g)
    u = torch.full_like(edit.u, 1.0)  # keys are never all zero, so every token is hit
    return RankOneEdit(layer, lam, u, edit.denominator, float(lam.norm() * u.norm())), k_star, value


def test_collapse_guard_rejects_a_disabling_edit_and_leaves_the_weights(tmp_path, bytelevel_tokenizer, monkeypatch):
    from romebatch import pipeline as editor_module
    from romebatch.fluency import greedy_entropy
    from romebatch.model import weight_hash

    monkeypatch.setattr(editor_module, "compute_edit", disabling_compute_edit)
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    # A random tiny model's own samples are near-uniform text (~6.9 nats/token of 7.4 possible
    # here), so even total collapse adds only ~0.5 nats; on a trained model it adds several.
    hp = HParams(**{**TINY_HPARAMS, "guard_max_relative": 1e9, "guard_nll_rise": 0.25, "prefixes": ((3, 8),)})
    before = weight_hash(lm.weight(LAYER))
    with Editor(tmp_path / "guarded", lm=lm, hparams=hp, log=quiet) as editor:
        result = editor.apply(FACTS[:1], checks=None, repair_every=0)
        (row,) = result.results
        assert row.status == "rejected" and row.reason.startswith("collapse"), row.reason
        assert editor.head == 0 and editor.journal.rejections()[0]["reason"].startswith("collapse")
    assert weight_hash(lm.weight(LAYER)) == before

    # The same edit without the guard goes in, and the model really does collapse.
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    reference = greedy_entropy(lm)
    with Editor(tmp_path / "unguarded", lm=lm, hparams=hp.replace(guard_nll_rise=0.0), log=quiet) as editor:
        assert [r.status for r in editor.apply(FACTS[:1], checks=None, repair_every=0).results] == ["applied"]
        assert greedy_entropy(lm) < 0.5 * reference
