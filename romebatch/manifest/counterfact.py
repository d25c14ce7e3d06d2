"""CounterFact manifests (a `.json` document): as published with ROME, and flattened as in EasyEdit.

Their extra keys (generation_prompts, attribute_prompts, ...) are ignored: these files carry
data for other evaluations.
"""

from __future__ import annotations

from typing import Any

from .validation import Checker, Fact, Labels, Probes, make_fact, mapping, single_neighbor


def adapt_counterfact(record: Any, chk: Checker) -> Fact | None:
    """CounterFact as published with ROME: {case_id, requested_rewrite: {...}, *_prompts}."""
    record = mapping(chk, record, "record")
    if record is None:
        return None
    rewrite = mapping(chk, record.get("requested_rewrite"), "requested_rewrite") or {}
    new = mapping(chk, rewrite.get("target_new"), "requested_rewrite.target_new") if rewrite else None
    true = rewrite.get("target_true")
    true = mapping(chk, true, "requested_rewrite.target_true") if true is not None else None
    labels = Labels(
        subject="requested_rewrite.subject",
        prompt="requested_rewrite.prompt",
        target_new="requested_rewrite.target_new.str",
        target_true="requested_rewrite.target_true.str",
    )
    target_true = chk.string(true.get("str"), labels.target_true) if true is not None else None
    paraphrases = chk.string_list(record.get("paraphrase_prompts"), "paraphrase_prompts") or []
    neighborhood = chk.string_list(record.get("neighborhood_prompts"), "neighborhood_prompts") or []
    if neighborhood and true is None:
        chk.problem("neighborhood_prompts", "cannot be scored without requested_rewrite.target_true")
    # In CounterFact a neighbourhood prompt's expected answer is the edited fact's true object.
    if target_true is None:
        neighborhood = []
    neighbors = (
        Probes(neighborhood, "neighborhood_prompts"),
        Probes([] if target_true is None else [target_true] * len(neighborhood), labels.target_true, numbered=False),
    )
    return make_fact(
        chk,
        fid=chk.record_id(record.get("case_id"), "case_id", str(chk.row)),
        subject=chk.string(rewrite.get("subject"), labels.subject) if rewrite else None,
        prompt=chk.string(rewrite.get("prompt"), labels.prompt) if rewrite else None,
        target_new=chk.string(new.get("str"), labels.target_new) if new is not None else None,
        target_true=target_true,
        paraphrases=Probes(paraphrases, "paraphrase_prompts"),
        neighbors=neighbors,
        labels=labels,
    )


def adapt_counterfact_flat(record: Any, chk: Checker) -> Fact | None:
    """CounterFact flattened as in EasyEdit: the prompt has the subject already filled in."""
    record = mapping(chk, record, "record")
    if record is None:
        return None
    rephrase = chk.string(record.get("rephrase_prompt"), "rephrase_prompt", required=False)
    neighbors = single_neighbor(chk, record, "locality_prompt", "locality_ground_truth")
    return make_fact(
        chk,
        fid=chk.record_id(record.get("case_id"), "case_id", str(chk.row)),
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("prompt"), "prompt"),
        target_new=chk.string(record.get("target_new"), "target_new"),
        target_true=chk.string(record.get("ground_truth"), "ground_truth", required=False),
        paraphrases=Probes([rephrase] if rephrase is not None else [], "rephrase_prompt", numbered=False),
        neighbors=neighbors,
        labels=Labels(target_true="ground_truth"),
    )
