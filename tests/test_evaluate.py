"""Scoring (romebatch.scores, .fluency, .zsre_scores) against slow references written here from the definitions.

The reference runs each (prompt, answer) pair alone, unpadded, through the model's own
`.logits` on a float64 copy of the model, so batching, padding, sorting, the head-only
logits and float32 are all checked at once. The CounterFact scores are then computed by
hand from those reference probabilities, from the definitions in design/ROME.md.
"""

from __future__ import annotations

import copy
import math
import random
from statistics import fmean

import pytest
import torch
from conftest import FAMILIES, tiny_loaded

from romebatch.fluency import fluency, fluency_seeds, generate, generate_batch, ngram_entropy
from romebatch.lm import continue_prompt
from romebatch.manifest import Fact, Neighbor
from romebatch.scores import answer_nll, magnitudes, score_facts, shared_rows, summarize
from romebatch.zsre_scores import token_accuracy

# Prompts of very different lengths (so one batch pads), answers of one and several tokens.
PAIRS = [
    ("The Space Needle is located in the city of", "Seattle"),
    ("Big Ben is", "London"),
    (
        "Where is the Space Needle? It is in Seattle, Washington, near Tokyo and Berlin. The Eiffel Tower is in",
        "Paris, France",
    ),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Toko Yasuda plays the", "electric guitar of Autonomous University"),
    ("The", "quick brown fox"),
    ("Therefore, because I think you might know the answer, it is a tower in a", "city"),
    ("Michel Rocard is a native speaker of", "Spain"),
]


# ----------------------------------------------------------------------------- the slow reference
def reference_tokens(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids: tokenisation of prompt + " " + answer minus the prompt's tokens."""
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    full = tok(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids, "the join re-tokenised the prompt: pick another test pair"
    return list(prompt_ids), list(full[len(prompt_ids) :])


@torch.no_grad()
def reference_nll(model64, tok, prompt: str, answer: str) -> float:
    prompt_ids, target = reference_tokens(tok, prompt, answer)
    ids = torch.tensor([prompt_ids + target])
    logp = model64(input_ids=ids).logits[0].double().log_softmax(-1)  # (T, V), float64 throughout
    n = len(prompt_ids)
    return -fmean(float(logp[n - 1 + j, token]) for j, token in enumerate(target))


def model64_of(lm):
    model = copy.deepcopy(lm.model).double()
    model.eval()
    return model


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol or abs(a - b) <= tol * max(abs(a), abs(b))


# ----------------------------------------------------------------------------- answer_nll
@pytest.mark.parametrize("family", FAMILIES)
def test_answer_nll_matches_an_unbatched_float64_reference(family, tokenizer_for):
    tok = tokenizer_for(family)
    lm = tiny_loaded(family, tok)
    ref_model = model64_of(lm)
    lengths = {len(reference_tokens(tok, p, a)[0]) for p, a in PAIRS}
    assert len(lengths) >= 5  # really different lengths: padding is exercised
    assert sum(len(reference_tokens(tok, p, a)[1]) > 1 for p, a in PAIRS) >= 3  # multi-token answers

    expected = [reference_nll(ref_model, tok, p, a) for p, a in PAIRS]
    # Different answers get different NLLs: a result in the wrong order cannot pass.
    assert len({round(x, 4) for x in expected}) == len(expected)
    for batch_size in (32, 3, 1):  # one padded batch; several sorted batches; no padding at all
        got = answer_nll(lm, PAIRS, batch_size=batch_size)
        assert len(got) == len(PAIRS)
        for (prompt, answer), g, e in zip(PAIRS, got, expected):
            assert close(g, e), (family, batch_size, prompt, answer, g, e)


# The same prompts asked with several answers, as every scoring does: one-token answers (read
# from the bare prompt's row), an answer whose input is a prefix of another's ("Paris" inside
# "Paris, France"), and exact repeats. Each must still get its own NLL.
SHARED = [
    ("The Eiffel Tower is in", "Paris, France"),
    ("The Eiffel Tower is in", "Paris"),
    ("The Eiffel Tower is in", "Rome"),
    ("Big Ben is", "London"),
    ("The Eiffel Tower is in", "Paris, Texas"),
    ("Big Ben is", "in London"),
    ("Big Ben is", "London"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", "English"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_nll_of_answers_sharing_a_prompt_matches_each_pair_alone(family, tokenizer_for):
    tok = tokenizer_for(family)
    lm = tiny_loaded(family, tok)
    ref_model = model64_of(lm)
    expected = [reference_nll(ref_model, tok, p, a) for p, a in SHARED]
    for batch_size in (32, 2, 1):
        got = answer_nll(lm, SHARED, batch_size=batch_size)
        for (prompt, answer), g, e in zip(SHARED, got, expected):
            assert close(g, e), (family, batch_size, prompt, answer, g, e)


def test_shared_rows_are_the_fewest_that_hold_every_sequence_as_a_prefix():
    rng = random.Random(0)
    for _ in range(200):
        seqs = [tuple(rng.randrange(3) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 12))]
        rows, row_of = shared_rows(seqs)
        for seq, r in zip(seqs, row_of):
            assert rows[r][: len(seq)] == seq
        # A row must be kept exactly when its sequence is a prefix of no other sequence.
        maximal = {s for s in seqs if not any(o != s and o[: len(s)] == s for o in seqs)}
        assert sorted(rows) == sorted(maximal)


def test_answer_nll_of_a_repeated_pair_is_independent_of_its_batch(bytelevel_tokenizer):
    """The same pair alone, among short prompts or among long ones, gives the same NLL."""
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    pair = ("Big Ben is located in the city of", "London")
    alone = answer_nll(lm, [pair])[0]
    with_short = answer_nll(lm, [("The", "city"), pair, ("Big", "Ben")])[1]
    with_long = answer_nll(lm, [PAIRS[2], PAIRS[6], pair])[2]
    assert close(alone, with_short, 1e-6) and close(alone, with_long, 1e-6)


def test_answer_nll_of_nothing_is_empty(bytelevel_tokenizer):
    assert answer_nll(tiny_loaded("gpt2", bytelevel_tokenizer), []) == []


# ----------------------------------------------------------------------------- CounterFact scores
def fact(i, subject, prompt, new, true, paraphrases=(), neighborhood=()):
    return Fact(
        id=f"f{i}",
        subject=subject,
        prompt=prompt,
        target_new=new,
        target_true=true,
        paraphrases=tuple(paraphrases),
        neighborhood=tuple(Neighbor(p, a) for p, a in neighborhood),
    )


# Every fact has the same number of paraphrases (2) and of neighbourhood prompts (2): pooled and
# per-fact means then agree, so this set checks the scores whatever the aggregation.
EVEN_FACTS = [
    fact(
        0,
        "The Space Needle",
        "{} is located in the city of",
        "Rome",
        "Seattle",
        ["Where is the Space Needle? It is in", "The Space Needle is in"],
        [("The Eiffel Tower is located in the city of", "Paris"), ("Big Ben is located in the city of", "London")],
    ),
    fact(
        1,
        "Danielle Darrieux",
        "The mother tongue of {} is",
        "Spain",
        "French",
        ["Danielle Darrieux speaks", "Danielle Darrieux is a native speaker of"],
        [("Michel Rocard is a native speaker of", "French"), ("The mother tongue of Michel Rocard is", "French")],
    ),
    fact(
        2,
        "Big Ben",
        "{} is located in the city of",
        "Tokyo",
        "London",
        ["Big Ben is in the city of", "Where is Big Ben? It is in"],
        [("The Colosseum is located in the city of", "Rome"), ("The Space Needle is in", "Seattle")],
    ),
    fact(
        3,
        "Toko Yasuda",
        "{} plays the",
        "quick brown fox",
        "guitar",
        ["Toko Yasuda plays", "Toko Yasuda is playing the"],
        [("The quick brown fox jumps over the", "lazy dog"), ("Michel Rocard plays the", "guitar")],
    ),
    fact(
        4,
        "The Colosseum",
        "{} is located in the city of",
        "Berlin",
        "Rome",
        ["The Colosseum is in", "Where is the Colosseum? It is in"],
        [("Big Ben is in", "London"), ("The Eiffel Tower is in", "Paris")],
    ),
    fact(
        5,
        "The Eiffel Tower",
        "{} is located in the city of",
        "Madrid",
        None,  # no true object
        ["The Eiffel Tower is in", "Where is the Eiffel Tower? It is in"],
        [("The Colosseum is in", "Rome"), ("The Space Needle is in", "Seattle")],
    ),
]

# Different numbers of paraphrases and neighbourhood prompts per fact.
UNEVEN_FACTS = [
    fact(
        0,
        "The Space Needle",
        "{} is located in the city of",
        "Rome",
        "Seattle",
        ["The Space Needle is in"],
        [("The Eiffel Tower is located in the city of", "Paris")],
    ),
    fact(
        1,
        "Danielle Darrieux",
        "The mother tongue of {} is",
        "Spain",
        "French",
        [
            "Danielle Darrieux speaks",
            "Danielle Darrieux is a native speaker of",
            "Darrieux speaks",
            "The mother tongue of Darrieux is",
            "The language of Danielle Darrieux is",
        ],
        [
            ("Michel Rocard is a native speaker of", "French"),
            ("The mother tongue of Michel Rocard is", "French"),
            ("Michel Rocard speaks", "French"),
            ("The language of Michel Rocard is", "French"),
            ("The quick brown fox jumps over the", "lazy dog"),
        ],
    ),
    fact(
        2,
        "Big Ben",
        "{} is located in the city of",
        "Tokyo",
        "London",
        ["Big Ben is in the city of", "Where is Big Ben? It is in"],
        [
            ("The Colosseum is located in the city of", "Rome"),
            ("The Space Needle is in", "Seattle"),
            ("Big Ben is in", "London"),
        ],
    ),
]


def reference_probabilities(lm, facts):
    """Per fact: P(new), P(true), [(P(new), P(true))] on paraphrases, [(P(expected), P(new))] on neighbours."""
    model64 = model64_of(lm)
    tok = lm.tokenizer

    def p(prompt, answer):
        return None if answer is None else math.exp(-reference_nll(model64, tok, prompt, answer))

    return [
        dict(
            new=p(f.text, f.target_new),
            true=p(f.text, f.target_true),
            para=[(p(q, f.target_new), p(q, f.target_true)) for q in f.paraphrases],
            neigh=[(p(n.prompt, n.answer), p(n.prompt, f.target_new)) for n in f.neighborhood],
        )
        for f in facts
    ]


def no_near_ties(ref) -> bool:
    """A comparison decided by less than float32 noise would make the hand count fragile."""
    pairs = [(r["new"], r["true"]) for r in ref] + [x for r in ref for x in r["para"] + r["neigh"]]
    return all(b is None or abs(a - b) > 1e-6 * max(a, b) for a, b in pairs)


def hand_scores(ref):
    """ES/PS/NS per ROME.md: share per fact, then the mean over the facts that have the probe, in percent."""
    es = [100.0 * (r["new"] > r["true"]) for r in ref if r["true"] is not None]
    ps = [100.0 * fmean(new > true for new, true in r["para"]) for r in ref if r["true"] is not None and r["para"]]
    ns = [100.0 * fmean(exp > new for exp, new in r["neigh"]) for r in ref if r["neigh"]]
    ES, PS, NS = fmean(es), fmean(ps), fmean(ns)
    S = 3.0 / (1.0 / ES + 1.0 / PS + 1.0 / NS)
    return {"ES": ES, "PS": PS, "NS": NS, "S": S}


def hand_magnitudes(ref):
    """EM/PM/NM: the mean margin per fact, then the mean over facts, in points (CounterFact's summarize)."""
    em = [r["new"] - r["true"] for r in ref if r["true"] is not None]
    pm = [fmean(new - true for new, true in r["para"]) for r in ref if r["true"] is not None and r["para"]]
    nm = [fmean(exp - new for exp, new in r["neigh"]) for r in ref if r["neigh"]]
    return {"EM": 100.0 * fmean(em), "PM": 100.0 * fmean(pm), "NM": 100.0 * fmean(nm)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_score_facts_summarize_and_magnitudes_equal_a_hand_computation(family, tokenizer_for):
    lm = tiny_loaded(family, tokenizer_for(family))
    ref = reference_probabilities(lm, EVEN_FACTS)
    assert no_near_ties(ref)
    scores = score_facts(lm, EVEN_FACTS, batch_size=5)

    # The raw probabilities, fact by fact and prompt by prompt.
    assert len(scores) == len(EVEN_FACTS)
    for s, r in zip(scores, ref):
        assert close(s.p_new, r["new"])
        assert (s.p_true is None) == (r["true"] is None)
        if r["true"] is not None:
            assert close(s.p_true, r["true"])
        assert len(s.paraphrase) == len(r["para"]) and len(s.neighborhood) == len(r["neigh"])
        for (a, b), (x, y) in zip(s.paraphrase + s.neighborhood, r["para"] + r["neigh"]):
            assert close(a, x) and (b is None) == (y is None) and (y is None or close(b, y))

    hand = hand_scores(ref)
    # A meaningful mix: no score is all-or-nothing on this random model.
    assert all(0.0 < hand[k] < 100.0 for k in ("ES", "PS", "NS")), hand
    got = summarize(scores)
    assert got["n"] == len(EVEN_FACTS)
    for key in ("ES", "PS", "NS", "S"):
        assert close(got[key], hand[key]), (key, got[key], hand[key])

    hand_m = hand_magnitudes(ref)
    got_m = magnitudes(scores)
    for key in ("EM", "PM", "NM"):
        assert close(got_m[key], hand_m[key]), (key, got_m[key], hand_m[key])


def test_a_fact_without_true_object_has_no_efficacy_and_no_paraphrase_score(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    (s,) = score_facts(lm, [EVEN_FACTS[5]])
    assert s.p_true is None and s.efficacy is None and s.paraphrase_success is None
    assert [b for _, b in s.paraphrase] == [None, None]
    assert s.neighborhood_success is not None
    summary = summarize([s])
    assert summary["ES"] is None and summary["PS"] is None and summary["S"] == summary["NS"]
    assert magnitudes([s])["EM"] is None and magnitudes([s])["PM"] is None


def test_summarize_s_is_zero_when_one_part_is_zero_and_none_without_scores():
    from romebatch.scores import FactScores

    lost = FactScores(p_new=0.1, p_true=0.2, paraphrase=[(0.1, 0.3)], neighborhood=[(0.3, 0.1)])
    assert summarize([lost]) == {"ES": 0.0, "PS": 0.0, "NS": 100.0, "S": 0.0, "n": 1}
    won = FactScores(p_new=0.4, p_true=0.2, paraphrase=[(0.5, 0.3), (0.1, 0.3)], neighborhood=[(0.3, 0.1)])
    got = summarize([won])
    assert got["ES"] == 100.0 and got["PS"] == 50.0 and close(got["S"], 3 / (1 / 100 + 1 / 50 + 1 / 100))
    assert summarize([]) == {"ES": None, "PS": None, "NS": None, "S": None, "n": 0}


def test_magnitudes_average_per_fact_when_facts_have_different_prompt_counts(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    ref = reference_probabilities(lm, UNEVEN_FACTS)
    hand = hand_magnitudes(ref)
    pooled_nm = 100.0 * fmean(e - n for r in ref for e, n in r["neigh"])
    assert abs(pooled_nm - hand["NM"]) > 1e-3  # the two aggregations really differ here
    got = magnitudes(score_facts(lm, UNEVEN_FACTS))
    for key in ("EM", "PM", "NM"):
        assert close(got[key], hand[key]), (key, got[key], hand[key])


# ----------------------------------------------------------------------------- fluency
def entropy_bits(counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_equals_a_hand_computation():
    # "a b a b a": bigrams ab, ba, ab, ba (2 kinds, 2 each); trigrams aba, bab, aba (2 + 1).
    bigram, trigram = 1.0, math.log2(3) - 2 / 3
    assert ngram_entropy("a b a b a") == pytest.approx(((2 / 3) * bigram + (4 / 3) * trigram) / 2, abs=1e-12)

    # Punctuation is a word: the . the cat sat . -> bigrams (the cat)x2 (cat sat)x2 (sat .)x2 (. the)x1,
    # trigrams (the cat sat)x2 (cat sat .)x2 (sat . the)x1 (. the cat)x1.
    text = "the cat sat. the cat sat."
    expected = ((2 / 3) * entropy_bits([2, 2, 2, 1]) + (4 / 3) * entropy_bits([2, 2, 1, 1])) / 2
    assert ngram_entropy(text) == pytest.approx(expected, abs=1e-12)

    # All distinct: 5 words -> 4 bigrams, 3 trigrams, each once.
    assert ngram_entropy("one two three four five") == pytest.approx(((2 / 3) * 2.0 + (4 / 3) * math.log2(3)) / 2)
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("alone") == 0.0  # no bigram at all


def test_a_repetitive_text_scores_lower_than_a_varied_one():
    varied = (
        "The quick brown fox jumps over the lazy dog while the city sleeps, and a tower in Paris "
        "watches the river run toward the sea under a pale moon."
    )
    repetitive = "the city the city the city the city the city the city the city the city the city"
    assert ngram_entropy(repetitive) < 0.5 * ngram_entropy(varied)
    assert ngram_entropy("city " * 40) == 0.0  # one bigram, one trigram: no entropy


def test_fluency_is_100_times_the_mean_entropy_of_seeded_generations(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    prompts = ["The Space Needle is", "Big Ben is located in"]
    texts = generate(lm, prompts, max_new_tokens=12, seed=3)
    assert texts == generate(lm, prompts, max_new_tokens=12, seed=3)  # seeded: reproducible
    assert fluency(lm, prompts, max_new_tokens=12, seed=3) == pytest.approx(
        100.0 * fmean(ngram_entropy(t) for t in texts)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_continues_each_prompt_as_it_would_alone(family, tokenizer_for):
    # Greedy, so the one-prompt-at-a-time path (no padding at all) is the reference: a
    # padded batch that leaked pad tokens or shifted positions would continue differently.
    lm = tiny_loaded(family, tokenizer_for(family))
    prompts = ["The Space Needle is in the city of", "Big Ben", "A river"]
    alone = [continue_prompt(lm, p, do_sample=False, max_new_tokens=8) for p in prompts]
    assert generate_batch(lm, prompts, max_new_tokens=8, seed=None) == alone


def test_fluency_seeds_are_reproducible_and_differ_between_seeds(bytelevel_tokenizer):
    lm = tiny_loaded("gpt2", bytelevel_tokenizer)
    prompts = ["The Space Needle is", "Big Ben is located in", "A"]
    first = fluency_seeds(lm, prompts, seeds=range(3), max_new_tokens=16)
    assert first == fluency_seeds(lm, prompts, seeds=range(3), max_new_tokens=16)
    assert len(set(first)) > 1  # each seed samples other text
    texts = generate_batch(lm, prompts, max_new_tokens=16, seed=1)
    assert first[1] == pytest.approx(100.0 * fmean(ngram_entropy(t) for t in texts))


# ----------------------------------------------------------------------------- zsRE token accuracy
@torch.no_grad()
def manual_token_accuracy(model, tok, prompt, answer) -> float:
    prompt_ids, target = reference_tokens(tok, prompt, answer)
    hits = []
    for j, token in enumerate(target):  # teacher forcing: the true previous answer tokens are given
        ids = torch.tensor([prompt_ids + target[:j]])
        hits.append(int(model(input_ids=ids).logits[0, -1].argmax()) == token)
    return fmean(hits)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_token_accuracy_equals_a_teacher_forced_argmax_loop(family, tokenizer_for):
    tok = tokenizer_for(family)
    lm = tiny_loaded(family, tok)
    pairs = list(PAIRS)
    # Answers the model itself predicts (its greedy continuation), so accuracy is not all zero.
    for prompt in ("The Space Needle is located in the city of", "Big Ben is", "The mother tongue of"):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4, pad_token_id=lm.pad_id
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        if text:
            pairs.append((prompt, text))
    expected = [manual_token_accuracy(lm.model, tok, p, a) for p, a in pairs]
    assert any(x > 0 for x in expected)  # some hits: a constant 0 would not pass
    assert token_accuracy(lm, pairs) == expected
