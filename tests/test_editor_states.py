"""`Editor.at(state)`: the model at another state inside a block, back at the head after it.

State 0 swaps the kept base weights of the edited layers in and out without a replay; the
check is against a freshly built copy of the base model (its bytes, every parameter) and
the head's recorded weight hashes, also when the block raises.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.editor import Editor
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.model import weight_hash

FACTS = [
    Fact(id="eiffel", subject="The Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    Fact(id="ben", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo"),
    Fact(id="darrieux", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="Spanish"),
]


def quiet(message: str) -> None:
    pass


def weights(lm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def head_hashes(editor) -> dict[int, str]:
    """Each edited layer's weight hash as the journal recorded it at the head."""
    return {r.layer: r.weight_hash_after for r in editor.journal.lineage()}


@pytest.fixture
def edited(tmp_path, bytelevel_tokenizer):
    # Two layers edited, so the swap is of more than one weight.
    hp = HParams(**{**TINY_HPARAMS, "layer": 0, "spread_layers": 2})
    with Editor(tmp_path / "journal", lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet) as editor:
        result = editor.apply(FACTS, checks=None, repair_every=0)
        assert [r.status for r in result.results] == ["applied"] * len(FACTS)
        assert {r.layer for r in editor.journal.lineage()} == {0, 1}
        yield editor


def test_at_0_holds_the_base_bytes_and_gives_back_the_head(edited, bytelevel_tokenizer, monkeypatch):
    base = weights(tiny_loaded("gpt2", bytelevel_tokenizer))  # the same seed: the journal's base model
    head = head_hashes(edited)
    assert all(weight_hash(edited.lm.weight(layer)) == h for layer, h in head.items())
    replays = []
    monkeypatch.setattr(Editor, "replay", lambda self, *a, **k: replays.append(a))
    with edited.at(0):
        now = weights(edited.lm)
        assert now.keys() == base.keys()
        for name, tensor in base.items():
            assert torch.equal(now[name], tensor), f"{name} is not the base model's"
    assert replays == []  # O(layers): a swap, no replay
    assert {layer: weight_hash(edited.lm.weight(layer)) for layer in head} == head


def test_at_0_gives_back_the_head_when_the_block_raises(edited, bytelevel_tokenizer):
    head = head_hashes(edited)
    base_layer0 = tiny_loaded("gpt2", bytelevel_tokenizer).weight(0).detach().clone()
    with pytest.raises(RuntimeError, match="inside"):
        with edited.at(0):
            assert torch.equal(edited.lm.weight(0), base_layer0)
            raise RuntimeError("inside")
    assert {layer: weight_hash(edited.lm.weight(layer)) for layer in head} == head


def test_at_another_state_replays_there_and_back(edited):
    head = head_hashes(edited)
    first = edited.journal.lineage()[0]
    with pytest.raises(KeyError):
        with edited.at(first.seq, verify=True):
            assert weight_hash(edited.lm.weight(first.layer)) == first.weight_hash_after
            with edited.at(0):  # nested: back to state 1, not to the head
                pass
            assert weight_hash(edited.lm.weight(first.layer)) == first.weight_hash_after
            raise KeyError("inside")
    assert {layer: weight_hash(edited.lm.weight(layer)) for layer in head} == head
    assert edited.check().ok
