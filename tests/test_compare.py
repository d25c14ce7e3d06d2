"""`romebatch compare`: base model vs a journal state, prompt by prompt (romebatch/comparison.py, api, CLI).

A real journal is built on the tiny GPT-2 of conftest (saved as a model folder, so the CLI
can open it with `--model`). The references are computed another way: the base folder and
an exported head loaded with plain transformers, continued by an argmax loop over full
forward passes, and probabilities from a softmax over the full logits.
"""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
from conftest import TINY_HPARAMS
from typer.testing import CliRunner

from romebatch import api
from romebatch.cli import app
from romebatch.comparison import COMPARE_SCHEMA, select_facts
from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.journal import Journal
from romebatch.manifest import Fact, Neighbor
from romebatch.model import load_model

# On this random model the edit flips Big Ben's prompt from London to Tokyo and changes its
# greedy text; Darrieux's prompt shares no subject with it and keeps its text.
BEN = Fact(
    id="ben",
    subject="Big Ben",
    prompt="{} is located in the city of",
    target_new="Tokyo",
    target_true="London",
    paraphrases=("Where is Big Ben? It is in",),
    neighborhood=(Neighbor("The mother tongue of Danielle Darrieux is", "French"),),
)
ROCARD = Fact(
    id="rocard", subject="Michel Rocard", prompt="{} is a native speaker of", target_new="English", target_true="French"
)
TOKENS = 4


def quiet(_message):
    pass


@pytest.fixture
def built(tmp_path, tiny_folder):
    """(journal, base folder, {state: exported folder}) after editing BEN (state 1) then ROCARD (2)."""
    folder = tiny_folder("gpt2")
    journal = tmp_path / "j"
    with Editor(journal, lm=load_model(str(folder), log=quiet), hparams=HParams(**TINY_HPARAMS), log=quiet) as ed:
        (first,) = ed.apply([BEN], checks=None, repair_every=0).results
        assert first.status == "applied" and first.success
        ed.export(tmp_path / "s1")
        (second,) = ed.apply([ROCARD], checks=None, repair_every=0).results
        assert second.status == "applied"
        ed.export(tmp_path / "s2")
    return journal, folder, {1: tmp_path / "s1", 2: tmp_path / "s2"}


def reference(folder, prompt: str, answers: list[str]) -> tuple[str, list[float]]:
    """Greedy text (argmax loop over full forward passes) and length-normalised P of each answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = list(ids)
        for _ in range(TOKENS):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
        text = tok.decode(out[len(ids) :], skip_special_tokens=True)
        probs = []
        for answer in answers:
            full = tok(prompt + " " + answer)["input_ids"]
            assert full[: len(ids)] == ids
            target = full[len(ids) :]
            logp = torch.softmax(model(torch.tensor([full])).logits[0].double(), -1).log()
            # logits at position t predict token t + 1
            token_logp = [float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target)]
            probs.append(math.exp(sum(token_logp) / len(token_logp)))
    return text, probs


def test_compare_matches_a_plain_transformers_reference_on_both_states(built):
    journal, folder, exported = built
    for at in (1, None):  # edit 1, and the head (edit 2)
        report = api.compare(journal, fact_ids=["ben"], at=at, max_new_tokens=TOKENS, model=str(folder), log=quiet)
        assert report.state == (at or 2)
        assert [(r.kind, r.prompt) for r in report.rows] == [
            ("prompt", BEN.text),
            ("paraphrase", BEN.paraphrases[0]),
            ("neighborhood", BEN.neighborhood[0].prompt),
        ]
        for row in report.rows:
            for side, where in (("base", folder), ("state", exported[report.state])):
                text, (p_new, p_true) = reference(where, row.prompt, [row.target_new, row.target_true])
                assert getattr(row, f"{side}_text") == text, (at, side, row.kind)
                assert getattr(row, f"p_new_{side}") == pytest.approx(p_new, rel=1e-4, abs=1e-7), (at, side, row.kind)
                assert getattr(row, f"p_true_{side}") == pytest.approx(p_true, rel=1e-4, abs=1e-7), (at, side, row.kind)

    # At Big Ben's own edit:
    own, _, neighbour = api.compare(
        journal, fact_ids=["ben"], at=1, max_new_tokens=TOKENS, model=str(folder), log=quiet
    ).rows
    # the edit really changed what the model says on its prompt ...
    assert own.base_text != own.state_text and own.changed
    assert own.p_new_base < own.p_true_base and own.p_new_state > own.p_true_state
    assert own.p_new_state > 2 * own.p_new_base
    # ... and left the neighbour's continuation as it was, its answer still ahead of " Tokyo".
    assert neighbour.base_text == neighbour.state_text and not neighbour.changed
    assert neighbour.p_true_state > neighbour.p_new_state


def test_compare_at_an_earlier_state_and_the_base(built):
    journal, folder, _ = built
    first = api.compare(journal, fact_ids=["ben"], at=1, max_new_tokens=TOKENS, model=str(folder), log=quiet)
    head = api.compare(journal, fact_ids=["ben"], max_new_tokens=TOKENS, model=str(folder), log=quiet)
    base = api.compare(journal, fact_ids=["ben"], at=0, max_new_tokens=TOKENS, model=str(folder), log=quiet)
    # State 0 compares the base model with itself: identical, to the bit.
    for b in base.rows:
        assert b.base_text == b.state_text and b.p_new_base == b.p_new_state and b.p_true_base == b.p_true_state
    # State 1 is Big Ben's own edit: the same base side as at the head, another edited side.
    f, h = first.rows[0], head.rows[0]
    assert first.state == 1 and head.state == 2
    assert f.p_new_base == h.p_new_base and f.base_text == h.base_text
    assert f.p_new_state > f.p_true_state  # it holds right after its edit
    assert f.p_new_state != h.p_new_state  # the second edit moved it


def test_no_selector_samples_the_edited_facts_seeded(built):
    journal, folder, _ = built
    with Journal(journal) as j:
        assert [f.id for f in select_facts(j)] == ["ben", "rocard"]  # fewer than the sample: all
        one = [f.id for f in select_facts(j, sample=1, seed=3)]
        assert one == [f.id for f in select_facts(j, sample=1, seed=3)] and len(one) == 1
        assert [f.id for f in select_facts(j, at=1)] == ["ben"]
        assert select_facts(j, prompts=["The Eiffel Tower is"]) == []
        with pytest.raises(UserError, match="--fact nope"):
            select_facts(j, fact_ids=["nope"])


def test_compare_cli_table_json_and_results(built, tmp_path):
    journal, folder, _ = built
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "compare",
            "--journal",
            str(journal),
            "--model",
            str(folder),
            "--fact",
            "ben",
            "--prompt",
            "The [bold]Eiffel[/bold] Tower is",
            "--max-new-tokens",
            str(TOKENS),
            "--json",
            "--results",
            str(tmp_path / "c.parquet"),
        ],
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["state"] == 2 and data["base"] == 0
    assert [r["kind"] for r in data["rows"]] == ["prompt", "paraphrase", "neighborhood", "free"]
    assert data["rows"][0]["changed"] is True
    assert data["rows"][3]["p_new_base"] is None and data["rows"][3]["prompt"] == "The [bold]Eiffel[/bold] Tower is"
    frame = pl.read_parquet(tmp_path / "c.parquet")
    assert frame.columns == list(COMPARE_SCHEMA)
    assert dict(frame.schema) == {k: getattr(pl, t) for k, (t, _) in COMPARE_SCHEMA.items()}
    assert frame["state_text"].to_list() == [r["state_text"] for r in data["rows"]]

    table = runner.invoke(
        app,
        [
            "compare",
            "--journal",
            str(journal),
            "--model",
            str(folder),
            "--fact",
            "ben",
            "--prompt",
            "The [bold]Eiffel[/bold] Tower is",
            "--max-new-tokens",
            str(TOKENS),
        ],
        env={"COLUMNS": "250"},
    )
    assert table.exit_code == 0, table.output
    assert "The [bold]Eiffel[/bold] Tower is" in table.output  # printed literally, not as markup
    changed = sum(r["changed"] for r in data["rows"])
    assert f"{changed} of 4 continuation(s) changed" in table.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--at", "9"], "has no edit 9"),
        (["--at", "-1"], "--at -1"),
        (["--fact", "nope"], "--fact nope"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["--results", "x.txt"], "--results x.txt"),
        (["--fact", "ben", "--facts", "m.csv"], "not both"),
    ],
)
def test_compare_bad_input_is_one_line_and_exit_2_before_any_model_load(built, args, message, monkeypatch, capsys):
    import sys

    from romebatch.cli import main

    journal, _, _ = built

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("romebatch.editor.load_model", no_model)
    monkeypatch.setattr(sys, "argv", ["romebatch", "compare", "--journal", str(journal), *args])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err.splitlines()[0], err
