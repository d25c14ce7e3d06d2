"""`write_prompt_key`: the edit prompt's own key receives the whole write, not a share of it.

k* is the mean key over the bare prompt and its context prefixes; an edit Λ uᵀ writes
Λ (uᵀk) at a key k, so the prompt itself gets ρ = uᵀk_p / uᵀk* of the write. Levelling adds
the constraint uᵀ(k_p − k*) = 0 to whatever else u solves. Checked here against dense KKT
solves written out from the objective, and through the Editor against the prompt's key read
by a plain forward pass of the prompt text.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HPARAMS, dense_u, kkt_u, random_spd, tiny_loaded

from romebatch.editor import Editor
from romebatch.hooks import Hook, attach
from romebatch.hparams import RECORDED_BEFORE, HParams
from romebatch.lm import subject_last_index
from romebatch.manifest import Fact
from romebatch.rome.preserve import Preserver, level_direction, levelled_u
from romebatch.rome.update import growth_pull

LAYER = 1


@pytest.mark.parametrize(
    "method,top_k,mu", [("none", 0, 0.0), ("none", 3, 0.0), ("covariance", 0, 0.0), ("nullspace", 3, 0.0),
                        ("none", 0, 0.7), ("covariance", 3, 0.7), ("nullspace", 0, 0.7)]
)  # fmt: skip
def test_levelled_u_solves_the_constrained_problem(method, top_k, mu):
    d_model, d, n = 5, 12, 2
    c = random_spd(d, 1)
    g = torch.Generator().manual_seed(9)
    keys = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    k_prompt = k_star + 0.8 * torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d_model, d, generator=g, dtype=torch.float64)
    r = torch.randn(d_model, generator=g, dtype=torch.float64)
    pres = Preserver(method, torch.linalg.cholesky(c), d, 7.0, top_k=top_k, norm_penalty=mu)
    pres.rebuild(keys)
    pull = growth_pull(w.float(), False, r) if mu else None
    u = pres.u(k_star, pull, k_prompt)
    # The prompt key gets exactly what k* gets ...
    assert float(u @ k_prompt) == pytest.approx(float(u @ k_star), rel=1e-9)
    # ... and u is the optimum of the method's objective under that one more constraint.
    expected = dense_u(method, c, keys, k_star, top_k, mu, w, r, levelled_to=k_prompt)
    torch.testing.assert_close(u / float(u @ k_star), expected, rtol=1e-6, atol=1e-9)
    # Without the prompt key the same method gives another u, one that misses the prompt.
    other = pres.u(k_star, pull)
    assert abs(float(other @ k_prompt) / float(other @ k_star) - 1) > 1e-2


def test_levelled_u_without_a_preserver_is_the_plain_method_levelled():
    d = 10
    c = random_spd(d, 4)
    g = torch.Generator().manual_seed(2)
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    k_prompt = k_star + torch.randn(d, generator=g, dtype=torch.float64)
    u = levelled_u(k_star.float(), k_prompt.float(), torch.linalg.cholesky(c))
    assert u is not None
    expected = kkt_u(2 * c, torch.zeros(d, dtype=torch.float64),
                     torch.stack([k_star.float().double(), (k_prompt.float() - k_star.float()).double()], 1),
                     torch.tensor([1.0, 0.0], dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(u / float(u @ k_star.float().double()), expected, rtol=1e-5, atol=1e-7)
    # C = I (mom2 identity): u is k* with its component along k_p − k* taken out.
    u_identity = levelled_u(k_star, k_prompt, None)
    assert u_identity is not None
    assert float(u_identity @ (k_prompt - k_star)) == pytest.approx(0.0, abs=1e-9)


def test_nothing_to_level_leaves_u_as_published():
    d = 8
    k = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert level_direction(k, None).shape == (d, 0)
    assert level_direction(k, k.clone()).shape == (d, 0)  # no context prefixes: k_p = k*
    assert level_direction(k, 3 * k).shape == (d, 0)  # parallel: no u could meet uᵀk* = uᵀk_p
    assert levelled_u(k, k.clone(), None) is None
    assert level_direction(k, k + torch.ones(d, dtype=torch.float64)).shape == (d, 1)


# ------------------------------------------------------------------------- through the Editor
FACTS = [
    Fact(id="needle", subject="The Space Needle", prompt="{} is located in the city of", target_new="Paris"),
    Fact(id="darrieux", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="Spain"),
]


def quiet(message: str) -> None:
    pass


def prompt_key(lm, fact: Fact) -> torch.Tensor:
    """The down-projection's input at the subject's last token of the bare prompt, from one plain forward pass."""
    encoded, index = subject_last_index(lm.tokenizer, fact.prompt, fact.subject)
    captured = []
    hook = Hook(lm.name("down_proj", LAYER), lambda x: captured.append(x[0, index].double()), on="input", stop=True)
    with torch.no_grad(), attach(lm.model, [hook]):
        lm.model(input_ids=torch.tensor([encoded.ids]))
    return captured[0]


@pytest.mark.parametrize("norm_penalty", [0.0, 0.01])
def test_every_edit_writes_its_whole_update_at_its_prompt(tmp_path, bytelevel_tokenizer, norm_penalty):
    shares = {}
    for levelled in (False, True):
        lm = tiny_loaded("gpt2", bytelevel_tokenizer)
        hp = HParams(**{**TINY_HPARAMS, "norm_penalty": norm_penalty, "write_prompt_key": levelled})
        with Editor(tmp_path / f"j{levelled}", lm=lm, hparams=hp, log=quiet) as editor:
            result = editor.apply(FACTS, checks=None, repair_every=0)
            assert all(r.status == "applied" for r in result.results), [r.reason for r in result.results]
            records = editor.journal.lineage()
        shares[levelled] = []
        for fact, record in zip(FACTS, records):
            u = torch.from_numpy(record.u.copy()).double()
            k = torch.from_numpy(record.k_star.copy()).double()
            shares[levelled].append(float(u @ prompt_key(lm, fact)) / float(u @ k))
    assert shares[True] == pytest.approx([1.0] * len(FACTS), rel=1e-4)
    assert max(abs(s - 1) for s in shares[False]) > 0.05  # the scenario has prompts a plain edit misses


def test_records_from_before_the_option_read_it_as_off():
    assert RECORDED_BEFORE["write_prompt_key"] is False
    assert HParams.from_record({}, source="old journal").write_prompt_key is False
    assert HParams().write_prompt_key is True
