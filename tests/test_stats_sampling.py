"""The self-sampled statistics corpus: plain and encyclopedic sampling, and old journals.

Encyclopedic sampling (rome/corpus.py) is what the default C is estimated from; journals
written before it existed used plain sampling and must resume as they were written.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_loaded

from romebatch.editor import Editor
from romebatch.errors import UserError
from romebatch.hparams import HParams
from romebatch.manifest import Fact
from romebatch.rome import corpus as corpus_module
from romebatch.rome.corpus import ENCYCLOPEDIC_LEN, NAMES, OPENERS, sample_corpus
from romebatch.rome.stats import load_or_compute_stats

FACT = Fact(id="f1", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")


def quiet(message: str) -> None:
    pass


def opener_ids(tokenizer) -> list[list[int]]:
    texts = [o.format(n) if "{}" in o else o for o in OPENERS for n in (NAMES if "{}" in o else NAMES[:1])]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_encyclopedic_sequences_open_with_an_opener_and_are_seeded(sentencepiece_tokenizer):
    lm = tiny_loaded("gemma3_text", sentencepiece_tokenizer)
    bos = lm.tokenizer.bos_token_id
    sequences = sample_corpus(lm, 300, 32, seed=0, sampling="encyclopedic", batch_size=4)
    assert sum(map(len, sequences)) == 300
    openers = opener_ids(lm.tokenizer)
    for seq in sequences:
        assert len(seq) <= min(32, ENCYCLOPEDIC_LEN)
        assert seq[0] == bos  # left padding stripped: the sequence starts where its prompt did
        # (the last sequence may be cut short: the corpus holds exactly n_tokens)
        assert any(seq[1 : 1 + len(o)] == o[: len(seq) - 1] for o in openers), lm.tokenizer.decode(seq[:12])
    assert len({tuple(seq[1:6]) for seq in sequences}) > 1  # openers vary
    assert sample_corpus(lm, 300, 32, seed=0, sampling="encyclopedic", batch_size=4) == sequences
    assert sample_corpus(lm, 300, 32, seed=1, sampling="encyclopedic", batch_size=4) != sequences


def test_plain_sampling_is_unchanged_from_the_start_token(sentencepiece_tokenizer):
    """Plain sequences are what the sampler always drew: generation from <bos> alone, so an
    old journal's C recomputed on a fresh machine is the C it was written with."""
    lm = tiny_loaded("llama", sentencepiece_tokenizer)
    sequences = sample_corpus(lm, 64, 16, seed=3, sampling="plain", batch_size=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        start = torch.full((4, 1), lm.tokenizer.bos_token_id)
        reference = lm.model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=15,
            min_new_tokens=15,
            pad_token_id=lm.pad_id,
        ).tolist()
    assert sequences == reference


def test_statistics_differ_by_sampling_and_are_cached_apart(sentencepiece_tokenizer, tmp_path):
    lm = tiny_loaded("llama", sentencepiece_tokenizer)

    def mom2(sampling):
        return load_or_compute_stats(
            lm, [1], lm.base_hash(), n_tokens=200, seq_len=16, seed=0, sampling=sampling, cache_dir=tmp_path
        )[1].mom2

    plain, encyclopedic = mom2("plain"), mom2("encyclopedic")
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(plain, encyclopedic, rtol=1e-3, atol=1e-5)
    assert torch.equal(mom2("encyclopedic"), encyclopedic)  # from the cache


def test_changing_the_openers_changes_the_corpus_id(monkeypatch):
    before = corpus_module.corpus_id(None, "encyclopedic", 0)
    monkeypatch.setattr(corpus_module, "OPENERS", OPENERS + ("The lighthouse is",))
    assert corpus_module.corpus_id(None, "encyclopedic", 0) != before
    assert corpus_module.corpus_id(None, "plain", 0) == "self-sampled:seed=0"  # old caches stay valid


def test_an_edit_with_encyclopedic_statistics_takes_effect_and_replays_exactly(tmp_path, bytelevel_tokenizer):
    from romebatch.scores import answer_nll

    fact = Fact(
        id="f2", subject="Big Ben", prompt="{} is located in the city of", target_new="Tokyo", target_true="London"
    )
    hp = HParams(**{**TINY_HPARAMS, "stats_sampling": "encyclopedic"})
    with Editor(tmp_path / "journal", lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet) as editor:
        new_before, true_before = answer_nll(editor.lm, [(fact.text, fact.target_new), (fact.text, fact.target_true)])
        editor.apply([fact], checks=None, repair_every=0)
        new_after, true_after = answer_nll(editor.lm, [(fact.text, fact.target_new), (fact.text, fact.target_true)])
        assert editor.hparams.stats_sampling == "encyclopedic"
        assert new_before > true_before and new_after < true_after  # the edit flipped the answer
        assert new_after < new_before - 0.5
        assert editor.check().ok


def test_a_journal_from_before_encyclopedic_sampling_resumes_as_plain(tmp_path, bytelevel_tokenizer):
    directory = tmp_path / "journal"

    def lm():  # each editor loads the base model afresh (an open editor leaves its edits in place)
        return tiny_loaded("gpt2", bytelevel_tokenizer)

    with Editor(
        directory, lm=lm(), hparams=HParams(**{**TINY_HPARAMS, "stats_sampling": "plain"}), log=quiet
    ) as editor:
        editor.apply([FACT], checks=None, repair_every=0)
        stored = editor.journal.get("hparams")
        del stored["stats_sampling"]  # as a journal written before the option existed
        editor.journal.set_many({"hparams": stored})
    with Editor(directory, lm=lm(), log=quiet) as editor:
        assert editor.hparams.stats_sampling == "plain"
    with pytest.raises(UserError, match="stats_sampling='plain'"):
        Editor(directory, lm=lm(), hparams=HParams(**{**TINY_HPARAMS, "stats_sampling": "encyclopedic"}), log=quiet)
    with Editor(
        directory, lm=lm(), hparams=HParams(**{**TINY_HPARAMS, "stats_sampling": "plain"}), log=quiet
    ) as editor:
        assert editor.head == 1


def test_with_a_corpus_file_the_sampling_is_moot(tmp_path, bytelevel_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Space Needle is located in the city of Seattle.\n\nBig Ben is in London.\n" * 20)
    directory = tmp_path / "journal"
    hp = dict(TINY_HPARAMS, stats_corpus=str(corpus), stats_tokens=200)
    with Editor(
        directory,
        lm=tiny_loaded("gpt2", bytelevel_tokenizer),
        hparams=HParams(**{**hp, "stats_sampling": "plain"}),
        log=quiet,
    ) as editor:
        editor.apply([FACT], checks=None, repair_every=0)
    with Editor(
        directory,
        lm=tiny_loaded("gpt2", bytelevel_tokenizer),
        hparams=HParams(**{**hp, "stats_sampling": "encyclopedic"}),
        log=quiet,
    ) as editor:
        assert editor.head == 1


def test_an_unknown_sampling_is_a_clear_error():
    with pytest.raises(UserError, match="stats_sampling must be one of plain, encyclopedic"):
        HParams(stats_sampling="wikipedia").validate()


def test_the_samplings_the_hparams_accept_are_the_ones_the_algorithm_draws():
    # rome/corpus.py does not import the hyper-parameters: the two lists are kept equal here.
    from romebatch.hparams import STATS_SAMPLINGS

    assert corpus_module.SAMPLINGS == STATS_SAMPLINGS


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("kind", ["fifo", "zero-link", "missing"])
def test_an_unreadable_corpus_is_refused_before_anything_is_written(tmp_path, bytelevel_tokenizer, kind):
    corpus = tmp_path / "corpus.txt"
    if kind == "fifo":
        os.mkfifo(corpus)  # read whole, as the cache key once did, it would block forever
    elif kind == "zero-link":
        corpus.symlink_to("/dev/zero")
    directory = tmp_path / "journal"
    hp = HParams(**dict(TINY_HPARAMS, stats_corpus=str(corpus), stats_tokens=200))
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        with pytest.raises(UserError, match=r"^--stats-corpus .*corpus\.txt: "):
            Editor(directory, lm=tiny_loaded("gpt2", bytelevel_tokenizer), hparams=hp, log=quiet)
    finally:
        signal.alarm(0)
    assert not directory.exists()
