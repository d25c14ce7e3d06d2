"""Issue 20's mechanisms for long sequential runs, each against a reference computed another way.

- MPES: v* optimisation stops at the first step where the target's first token is the
  argmax on every rewrite prompt; the reference replays the un-stopped optimisation step by
  step and reads each step's argmax from a plain forward pass of the prompt texts.
- Soft null space (`preserve_top_k`): u ⟂ C's top-k eigenvectors, so W k is unchanged for
  keys in their span (and, with "nullspace", for earlier edits' keys) through the Editor.
- Norm bound (`norm_growth_max`): ‖W‖_F never exceeds (1 + g) ‖W_base‖_F, and it bites.
- Norm penalty (`norm_penalty`): u solves the penalised problem (checked against a dense KKT
  solve), and through the Editor ‖W‖_F grows less while every edit still reaches its v*.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HPARAMS, dense_u, random_spd, tiny_loaded

from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hooks import Hook, attach
from romebatch.hparams import HParams
from romebatch.lm import answer_ids, subject_last_index
from romebatch.manifest import Fact
from romebatch.rome import values as V
from romebatch.rome.head import reads_from_logits
from romebatch.rome.preserve import Preserver
from romebatch.rome.update import RankOneEdit, bound_norm, current_value, growth_pull, rank_one_update

# The subject ends the prompt, so δ reaches the next-token logits on a random tiny model.
TEMPLATE, SUBJECT, TARGET = "It is in {}", "the city", "Seattle"
PREFIXES = ["The city. ", "Therefore it is a long story about many things. ", "I. "]
LAYER = 1
FACTS = [
    Fact(id="needle", subject="The Space Needle", prompt="{} is located in the city of", target_new="Paris"),
    Fact(id="eiffel", subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo"),
    Fact(id="darrieux", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="Spain"),
    Fact(id="rocard", subject="Michel Rocard", prompt="{} is a native speaker of", target_new="London"),
]

MPES_FACTS = [
    Fact(id=f"m{i}", subject=s, prompt="It is in {}", target_new=t)
    for i, (s, t) in enumerate([("the city", "Seattle"), ("the tower", "Rome"), ("the river", "Tokyo")])
]


def quiet(message: str) -> None:
    pass


# ------------------------------------------------------------------------------------ MPES
def argmax_on_every_prompt(lm, delta: torch.Tensor) -> bool:
    """Whether, with δ added at the subject's last token, the target's first token is the
    argmax of the next-token logits on every rewrite prompt: one plain forward pass per
    prompt text, no batching, no cache, nothing shared with the optimiser's engines."""
    tok = lm.tokenizer
    first = answer_ids(tok, TEMPLATE.replace("{}", SUBJECT, 1), TARGET)[0]
    for prefix in ["", *PREFIXES]:
        encoded, index = subject_last_index(tok, TEMPLATE, SUBJECT, prefix)

        def add(output, index=index):
            output = output.clone()
            output[0, index] += delta
            return output

        with torch.no_grad(), attach(lm.model, [Hook(lm.name("down_proj", LAYER), add)]):
            out = lm.model(input_ids=torch.tensor([encoded.ids]))
        if int(out.logits[0, -1].argmax()) != first:
            return False
    return True


@pytest.mark.parametrize("engine", V.ENGINES)
def test_mpes_stops_at_the_first_step_the_target_is_the_argmax_everywhere(bytelevel_tokenizer, engine):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    v_init = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    kwargs = dict(lr=0.5, clamp_norm_factor=20.0, loss_stop=0.0, engine=engine)  # no NLL stop
    cap = 30
    # The reference: the un-stopped trajectory, k Adam steps for k = 0, 1, ... (Adam from δ = 0
    # is deterministic, so `steps=k` is the trajectory's k-th point), judged independently.
    expected = None
    for k in range(cap + 1):
        delta = (
            V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, steps=k, **kwargs).v_star - v_init
        )
        if argmax_on_every_prompt(lm, delta):
            expected, expected_delta = k, delta
            break
    assert expected is not None and 2 <= expected < cap  # the test exercises a real stop
    stopped = V.optimise_value(
        lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, steps=cap, stop_on_argmax=True, **kwargs
    )
    assert stopped.steps == expected
    torch.testing.assert_close(stopped.v_star - v_init, expected_delta, atol=1e-6, rtol=0)
    assert not argmax_on_every_prompt(
        lm,
        V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, steps=expected - 1, **kwargs).v_star
        - v_init,
    )
    # Without MPES the same run goes on to the cap.
    plain = V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, steps=cap, **kwargs)
    assert plain.steps == cap


def test_mpes_reads_the_true_object_as_efficacy_does(bytelevel_tokenizer):
    """The true object's row scores exactly what efficacy scores (scores.answer_nll on the prompt),
    and the criterion needs both the argmax on every prompt and the new object ahead."""
    from romebatch.scores import answer_nll

    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    true = "Tokyo and Berlin"  # several tokens: the case the first token alone misreads
    rows = V.build_rows(lm, TEMPLATE, SUBJECT, TARGET, PREFIXES, true)
    assert len(rows.true_targets) > 1 and len(rows.sequences) == len(PREFIXES) + 3
    logp = V.cached_forward(lm, LAYER, rows)(None).float().log_softmax(-1)
    prompt = TEMPLATE.replace("{}", SUBJECT)
    want_new, want_true = answer_nll(lm, [(prompt, TARGET), (prompt, true)])
    m, reads = rows.answer_len, len(rows.targets)
    got_new = -logp[:m].gather(1, torch.tensor(rows.targets[:m])[:, None]).mean()
    got_true = -logp[reads : reads + len(rows.true_targets)].gather(1, torch.tensor(rows.true_targets)[:, None]).mean()
    assert float(got_new) == pytest.approx(want_new, abs=1e-4)
    assert float(got_true) == pytest.approx(want_true, abs=1e-4)
    # The decision, on read log-probabilities set by hand: the first tokens all argmax, then
    # the new object ahead of the true one on the bare prompt, or not.
    takes = V.Takes(rows, "cpu")
    targets = V.read_targets(rows, "cpu")

    def head(logp, targets=targets):  # what the decision reads, through the plain head
        return reads_from_logits(logp, targets, torch.zeros(logp.shape[-1]))

    first = [i * m for i in range(rows.n_prompts)]
    flat = torch.full((len(rows.read_rows), lm.config.vocab_size), -20.0)
    flat[torch.arange(reads), torch.tensor(rows.targets)] = -1.0  # every target token likely
    flat[torch.arange(reads, reads + len(rows.true_targets)), torch.tensor(rows.true_targets)] = -0.5
    assert not takes(head(flat))  # argmax everywhere, but the true object reads likelier
    flat[torch.arange(reads, reads + len(rows.true_targets)), torch.tensor(rows.true_targets)] = -2.0
    assert takes(head(flat))
    flat[first[-1], rows.targets[first[-1]]] = -30.0  # one prompt's first token no longer the argmax
    assert not takes(head(flat))
    # Without the true object's rows the first tokens decide alone, as ENCORE's check.
    plain = V.Takes(V.build_rows(lm, TEMPLATE, SUBJECT, TARGET, PREFIXES), "cpu")
    flat[first[-1], rows.targets[first[-1]]] = -1.0
    assert plain(head(torch.cat([flat[:reads], flat[-1:]]), torch.cat([targets[:reads], targets[-1:]])))


@pytest.mark.parametrize("beats_true", [True, False])
def test_apply_and_repairs_hand_mpes_the_true_object(tmp_path, bytelevel_tokenizer, monkeypatch, beats_true):
    seen = []
    real = V.optimise_value

    def spy(*args, **kwargs):
        seen.append(kwargs.get("true_target"))
        return real(*args, **kwargs)

    monkeypatch.setattr(V, "optimise_value", spy)
    facts = [Fact(id="a", subject="the city", prompt="It is in {}", target_new="Seattle", target_true="Rome"),
             Fact(id="b", subject="the tower", prompt="It is in {}", target_new="Tokyo")]  # fmt: skip
    hp = HParams(**{**TINY_HPARAMS, "v_stop_beats_true": beats_true})
    with Editor(tmp_path / "j", lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet) as editor:
        editor.apply(facts, checks=None, repair_every=0)
    assert seen == (["Rome", None] if beats_true else [None, None])
    assert HParams.from_record({}, source="old").v_stop_beats_true is False  # older journals: off


def test_shrink_keeps_the_smallest_share_of_delta_that_still_takes(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    v_init = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    kwargs = dict(lr=0.5, clamp_norm_factor=20.0, loss_stop=0.0, steps=30, stop_on_argmax=True)
    found = V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, **kwargs)
    delta = found.v_star - v_init
    shrunk = V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, shrink=1.0, **kwargs)
    assert shrunk.steps == found.steps and 0 < shrunk.share < 1  # the same δ, then less of it
    torch.testing.assert_close(shrunk.v_star - v_init, shrunk.share * delta, atol=1e-6, rtol=1e-5)
    # Judged by the plain per-prompt reference: the share kept takes, one bisection step less does not.
    assert argmax_on_every_prompt(lm, shrunk.share * delta)
    assert not argmax_on_every_prompt(lm, (shrunk.share - 2**-V.SHRINK_BISECTIONS) * delta)
    # Headroom multiplies the share, never past the whole δ.
    roomy = V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, shrink=1.5, **kwargs)
    assert roomy.share == pytest.approx(min(1.0, 1.5 * shrunk.share))
    whole = V.optimise_value(lm, LAYER, TEMPLATE, SUBJECT, TARGET, PREFIXES, v_init, shrink=1e6, **kwargs)
    assert whole.share == 1.0
    torch.testing.assert_close(whole.v_star, found.v_star)


def test_mpes_through_the_editor_takes_fewer_steps_and_the_edits_still_take(tmp_path, bytelevel_tokenizer):
    steps = {}
    for mpes in (False, True):
        hp = HParams(**{**TINY_HPARAMS, "v_lr": 0.5, "v_stop_argmax": mpes})
        with Editor(
            tmp_path / f"j{mpes}", lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet
        ) as editor:
            result = editor.apply(MPES_FACTS, checks=None, repair_every=0)
            steps[mpes] = [r.v_steps for r in result.results]
            assert all(r.status == "applied" for r in result.results), [r.reason for r in result.results]
            if mpes:
                assert all(r.p_new_after > r.p_new_before for r in result.results)
    assert sum(steps[True]) < sum(steps[False])


# ------------------------------------------------------------------------------ null space
@pytest.mark.parametrize("method", ["none", "covariance", "nullspace"])
def test_top_k_projection_matches_an_independent_solution(method):
    d, k, n = 12, 3, 2
    c = random_spd(d, 0)
    g = torch.Generator().manual_seed(5)
    keys = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    pres = Preserver(method, torch.linalg.cholesky(c), d, 7.0, top_k=k)
    pres.rebuild(keys)
    u = pres.u(k_star)
    evals, evecs = torch.linalg.eigh(c)
    top = evecs[:, -k:]
    m = c.clone()
    if method == "covariance":
        for key in keys:
            unit = key / key.norm()
            m += 7.0 * (unit @ c @ unit) * torch.outer(unit, unit)
    a = torch.cat([top, torch.stack(keys, dim=1)], dim=1) if method == "nullspace" else top
    inv = torch.linalg.inv(m)
    alpha = torch.linalg.solve(a.T @ inv @ a, a.T @ inv @ k_star)  # the KKT system
    torch.testing.assert_close(u, inv @ (k_star - a @ alpha))
    if method == "none":  # for M = C the constrained u is the Euclidean projection of C⁻¹k*
        torch.testing.assert_close(u, (torch.eye(d, dtype=torch.float64) - top @ top.T) @ inv @ k_star)
    assert (a.T @ u).abs().max() < 1e-9 * u.norm()


def layer_output(lm, key: torch.Tensor) -> torch.Tensor:
    module = lm.module("down_proj", LAYER)
    with torch.no_grad():
        return module(key[None].to(module.weight.dtype))[0].double()


@pytest.mark.parametrize("preserve", ["none", "nullspace"])
def test_null_space_edits_leave_preserved_keys_unchanged(tmp_path, bytelevel_tokenizer, preserve):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    hp = HParams(**{**TINY_HPARAMS, "preserve": preserve, "preserve_top_k": 8})
    with Editor(tmp_path / "j", lm=lm, hparams=hp, log=quiet) as editor:
        pres = editor.preserver(LAYER)
        top = pres.principal.float()  # (d_ff, 8): C's top-8 eigenvectors
        g = torch.Generator().manual_seed(3)
        preserved = top @ (3 * torch.randn(8, 6, generator=g))  # typical keys: in their span
        before = [layer_output(lm, preserved[:, i]) for i in range(preserved.shape[1])]
        outputs = []  # after each edit: the output at every earlier edit's key

        def on_edit(row):
            keys = [torch.from_numpy(r.k_star.copy()) for r in editor.journal.lineage()]
            outputs.append([layer_output(lm, k) for k in keys])

        result = editor.apply(FACTS, on_edit=on_edit, checks=None, repair_every=0)
        assert all(r.status == "applied" for r in result.results), [r.reason for r in result.results]
        # The edits really write (W changes, and most raise their new object's probability).
        assert all(r.update_norm > 1e-2 for r in result.results)
        assert sum(r.p_new_after > r.p_new_before for r in result.results) >= 3
        for i in range(preserved.shape[1]):
            after = layer_output(lm, preserved[:, i])
            assert float((after - before[i]).abs().max()) < 1e-5 * max(1.0, float(before[i].abs().max()))
        if preserve == "nullspace":  # the earlier edits' keys are in the preserved set too
            for i in range(len(FACTS)):
                for later in outputs[i + 1 :]:
                    scale = max(1.0, float(outputs[i][i].abs().max()))
                    assert float((later[i] - outputs[i][i]).abs().max()) < 1e-5 * scale
    # Without the projection the same keys do move: the check above can fail.
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    with Editor(tmp_path / "plain", lm=lm, hparams=HParams(**TINY_HPARAMS), log=quiet) as editor:
        before = [layer_output(lm, preserved[:, i]) for i in range(preserved.shape[1])]
        editor.apply(FACTS, checks=None, repair_every=0)
        moved = max(float((layer_output(lm, preserved[:, i]) - before[i]).abs().max()) for i in range(len(before)))
    assert moved > 1e-3


# ------------------------------------------------------------------------------ norm bound
def test_bound_norm_meets_the_bound_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g)
    lam, u = torch.randn(6, generator=g), torch.randn(9, generator=g)
    edit = RankOneEdit(0, lam, u, 1.0, float(lam.norm() * u.norm()))
    after = float((w.double() + torch.outer(lam, u).double()).norm())
    limit = 0.5 * (float(w.double().norm()) + after) if after > w.norm() else None
    assert limit is not None
    scaled, s = bound_norm(edit, w, False, limit)
    assert 0 < s < 1
    norm = float((w.double() + torch.outer(scaled.lam, scaled.u).double()).norm())
    assert norm <= limit and norm > limit * (1 - 1e-5)
    # Transposed storage (GPT-2's Conv1D) gives the same scale.
    assert bound_norm(edit, w.T.contiguous(), True, limit)[1] == pytest.approx(s, rel=1e-9)
    unchanged, one = bound_norm(edit, w, False, 2 * after)
    assert one == 1.0 and unchanged is edit


def test_norm_growth_bound_holds_through_a_sequential_run(tmp_path, bytelevel_tokenizer):
    def run(growth):
        lm = tiny_loaded("gpt2", bytelevel_tokenizer)
        base = float(lm.weight(LAYER).double().norm())
        hp = HParams(**{**TINY_HPARAMS, "norm_growth_max": growth})
        norms = []
        with Editor(tmp_path / f"j{growth}", lm=lm, hparams=hp, log=quiet) as editor:
            result = editor.apply(
                FACTS,
                checks=None,
                on_edit=lambda row: norms.append(float(lm.weight(LAYER).double().norm())),
                repair_every=0,
            )
        return base, norms, result

    base, free, _ = run(0.0)
    growth = 0.5 * (free[-1] / base - 1)  # half the growth the unbounded run reaches
    assert growth > 0
    base, bounded, result = run(growth)
    limit = (1 + growth) * base
    assert all(n <= limit * (1 + 1e-6) for n in bounded)
    assert max(bounded) > limit * (1 - 1e-3)  # the bound really bites ...
    assert bounded[-1] < free[-1]
    assert result.results[0].status == "applied"  # ... and the first edits are whole


# ---------------------------------------------------------------------------- norm penalty
@pytest.mark.parametrize(
    "method,top_k", [("none", 0), ("none", 3), ("covariance", 3), ("nullspace", 0), ("nullspace", 3)]
)
def test_norm_penalty_u_solves_the_penalised_problem(method, top_k):
    d_model, d, n, mu = 5, 12, 2, 0.7
    c = random_spd(d, 1)
    g = torch.Generator().manual_seed(9)
    keys = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d_model, d, generator=g, dtype=torch.float64)
    r = torch.randn(d_model, generator=g, dtype=torch.float64)
    pres = Preserver(method, torch.linalg.cholesky(c), d, 7.0, top_k=top_k, norm_penalty=mu)
    pres.rebuild(keys)
    u = pres.u(k_star, growth_pull(w.float(), False, r))
    expected = dense_u(method, c, keys, k_star, top_k, mu, w, r)  # the objective, one dense KKT solve
    torch.testing.assert_close(u / float(u @ k_star), expected, rtol=1e-6, atol=1e-9)
    # The penalty changes the answer: without it u is another direction.
    plain = Preserver(method, torch.linalg.cholesky(c), d, 7.0, top_k=top_k)
    plain.rebuild(keys)
    other = plain.u(k_star)
    assert float((other / float(other @ k_star) - expected).abs().max()) > 1e-3


def test_norm_penalty_with_nothing_to_write_gives_a_finite_u_and_no_change():
    # MPES stops at step 0 when the target is already the argmax: v* = v(k*), r = 0. Plain
    # ROME then writes ΔW = 0; the penalised u must not turn 0/0 into NaN (a refused edit).
    d_model, d = 5, 12
    c = random_spd(d, 3)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(d_model, d, generator=g)
    k_star = torch.randn(d, generator=g, dtype=torch.float64)
    v = torch.randn(d_model, generator=g)
    pull = growth_pull(w, False, v - v)
    assert torch.equal(pull, torch.zeros(d, dtype=torch.float64))
    u = Preserver("none", torch.linalg.cholesky(c), d, norm_penalty=1.0).u(k_star, pull)
    assert torch.isfinite(u).all() and float(u @ k_star) > 0
    edit = rank_one_update(LAYER, k_star, v, v, torch.linalg.cholesky(c), u)
    assert edit.norm == 0.0 and torch.isfinite(edit.u).all()


def test_norm_penalty_needs_the_pull():
    c = random_spd(6, 2)
    with pytest.raises(ValueError, match="pull"):
        Preserver("none", torch.linalg.cholesky(c), 6, norm_penalty=1.0).u(torch.ones(6, dtype=torch.float64))


def test_norm_penalty_grows_the_weight_less_and_every_edit_still_takes(tmp_path, bytelevel_tokenizer):
    def run(mu):
        lm = tiny_loaded("gpt2", bytelevel_tokenizer)
        base = float(lm.weight(LAYER).double().norm())
        # u from k* alone: this scenario's five edits were built to show the penalty's cut in
        # growth by itself; with the prompt key levelled too, its solution is checked against
        # the dense KKT solve in tests/test_prompt_key.py.
        hp = HParams(**{**TINY_HPARAMS, "norm_penalty": mu, "write_prompt_key": False})
        with Editor(tmp_path / f"j{mu}", lm=lm, hparams=hp, log=quiet) as editor:
            first = []  # the first edit's key and the layer's output there, right after it

            def on_edit(row):
                if not first:
                    k = torch.from_numpy(editor.journal.lineage()[-1].k_star.copy())
                    first.extend([k, current_value(lm, LAYER, k).double()])

            result = editor.apply(FACTS, checks=None, on_edit=on_edit, repair_every=0)
        return base, float(lm.weight(LAYER).double().norm()), result, first

    base, plain, plain_result, (k_plain, v_plain) = run(0.0)
    _, penalised, result, (k_pen, v_pen) = run(1.0)
    assert all(r.status == "applied" for r in result.results), [r.reason for r in result.results]
    assert penalised - base < 0.8 * (plain - base)  # a real cut in the growth ...
    # ... while the first edit (same base weights, so the same k* and v*) writes the same v*
    # at its key by another u, and the edits raise their new objects as often as plain ROME's.
    torch.testing.assert_close(k_pen, k_plain)
    torch.testing.assert_close(v_pen, v_plain, rtol=1e-4, atol=1e-4)
    won = sum(r.p_new_after > r.p_new_before for r in result.results)
    assert won >= 3 and won >= sum(r.p_new_after > r.p_new_before for r in plain_result.results) - 1
    assert result.results[0].update_norm != pytest.approx(plain_result.results[0].update_norm, rel=1e-3)


def test_new_options_are_checked():
    with pytest.raises(UserError, match="preserve_top_k"):
        HParams(preserve_top_k=-1).validate()
    with pytest.raises(UserError, match="norm_growth_max"):
        HParams(norm_growth_max=-0.1).validate()
    with pytest.raises(UserError, match="norm_penalty"):
        HParams(norm_penalty=float("nan")).validate()
    with pytest.raises(UserError, match="v_stop_argmax"):
        HParams(v_stop_argmax="yes").validate()
    # On by default since issue 20's ablation (benchmarks/RESULTS.md, "Where the defaults come from").
    assert HParams().defining()["v_stop_argmax"] is True and HParams().norm_penalty == 0.01


def test_a_record_from_before_the_mechanisms_resumes_without_them(tmp_path, bytelevel_tokenizer):
    """A journal or bundle written before these fields existed made its edits without them: it
    is read as written (all off), whatever the defaults are now, and refuses to mix with edits
    made with them."""
    from romebatch.bundle_apply import apply_bundles
    from romebatch.bundle_file import write_bundle
    from romebatch.bundle_read import read_bundle

    def lm():  # each editor loads the base model afresh (an open editor leaves its edits in place)
        return tiny_loaded("gpt2", bytelevel_tokenizer)

    mechanisms = ("v_stop_argmax", "norm_penalty", "preserve_top_k", "norm_growth_max")
    old = tmp_path / "old"
    with Editor(old, lm=lm(), hparams=HParams(**TINY_HPARAMS), log=quiet) as editor:
        editor.apply(FACTS[:1], checks=None, repair_every=0)
        stored = editor.journal.get("hparams")
        for key in mechanisms:
            del stored[key]  # as a journal written before they existed
        editor.journal.set_many({"hparams": stored})
    with Editor(old, lm=lm(), log=quiet) as editor:
        assert [getattr(editor.hparams, key) for key in mechanisms] == [False, 0.0, 0, 0.0]
    with pytest.raises(UserError, match="v_stop_argmax=False"):
        Editor(old, lm=lm(), hparams=HParams(**{**TINY_HPARAMS, "v_stop_argmax": True}), log=quiet)

    bundle = tmp_path / "old.rbundle"
    write_bundle(old, bundle, first=1, last=1)
    assert not set(mechanisms) & set(read_bundle(bundle).meta["hparams"])
    apply_bundles([bundle], tmp_path / "copy", lm=lm())  # into a new journal: read as written
    with Editor(tmp_path / "copy", lm=lm(), log=quiet) as editor:
        assert editor.head == 1 and [getattr(editor.hparams, key) for key in mechanisms] == [False, 0.0, 0, 0.0]
    with Editor(tmp_path / "mpes", lm=lm(), hparams=HParams(**{**TINY_HPARAMS, "norm_penalty": 0.01}), log=quiet):
        pass
    with pytest.raises(UserError, match="norm_penalty"):
        apply_bundles([bundle], tmp_path / "mpes", lm=lm())
