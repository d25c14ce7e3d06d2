"""zsRE manifests (a `.json` document) in MEND's layout. Extra keys (pred, cond, ...) are ignored."""

from __future__ import annotations

from typing import Any

from .validation import Checker, Fact, Labels, Probes, make_fact, mapping, single_neighbor


def adapt_zsre(record: Any, chk: Checker) -> Fact | None:
    """zsRE in MEND's layout, read the way EasyEdit does: `alt` is the new answer."""
    record = mapping(chk, record, "record")
    if record is None:
        return None
    answers = chk.string_list(record.get("answers"), "answers")
    rephrase = chk.string(record.get("rephrase"), "rephrase", required=False)
    return make_fact(
        chk,
        fid=str(chk.row),
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("src"), "src"),
        target_new=chk.string(record.get("alt"), "alt"),
        target_true=answers[0] if answers else None,
        paraphrases=Probes([rephrase] if rephrase is not None else [], "rephrase", numbered=False),
        neighbors=single_neighbor(chk, record, "loc", "loc_ans"),
        labels=Labels(prompt="src", target_new="alt", target_true="answers"),
    )
