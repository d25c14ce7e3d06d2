"""romebatch's own fact records: the layout of YAML and JSONL manifests, of plain JSON ones, and
of `Fact.to_dict()` (what a journal stores, read back by `fact_from_dict`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from romebatch.errors import ManifestError

from .validation import Checker, Fact, Probes, describe, make_fact

RECORD_KEYS = ("id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood")


def fact_from_dict(d: dict) -> Fact:
    """Rebuild a Fact from `Fact.to_dict()` output (e.g. read back from a journal).

    The dict goes through the same validation as a manifest record, because a journal
    on disk can be edited or truncated like any other file.
    """
    where = d.get("source") if isinstance(d, dict) and isinstance(d.get("source"), str) else None
    chk = Checker(where or "fact", None)
    fact = adapt_generic(d, chk, default_id=None, extra_keys=("source",))
    if fact is None or chk.problems:
        raise ManifestError(chk.problems)
    return fact


def adapt_generic(
    record: Any, chk: Checker, *, default_id: str | None = "", extra_keys: tuple[str, ...] = ()
) -> Fact | None:
    """default_id "" means "use the row number"; None means the id is required."""
    if not isinstance(record, dict):
        chk.problem(None, f"expected a mapping of fact fields, got {describe(record)}")
        return None
    for key in record:
        if key not in RECORD_KEYS and key not in extra_keys:
            chk.problem(str(key), f"unknown field; expected one of {', '.join(RECORD_KEYS)}")
    if default_id == "":
        default_id = str(chk.row)
    fid = chk.record_id(record.get("id"), "id", default_id)
    paraphrases = chk.string_list(record.get("paraphrases"), "paraphrases") or []
    fact = make_fact(
        chk,
        fid=fid,
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("prompt"), "prompt"),
        target_new=chk.string(record.get("target_new"), "target_new"),
        target_true=chk.string(record.get("target_true"), "target_true", required=False),
        paraphrases=Probes(paraphrases, "paraphrases"),
        neighbors=_generic_neighbors(chk, record.get("neighborhood")),
    )
    if "source" in extra_keys:
        source = chk.string(record.get("source"), "source", required=False)
        if fact is not None and source is not None:
            fact = replace(fact, source=source)
    return fact


def _generic_neighbors(chk: Checker, value: Any) -> tuple[Probes, Probes]:
    prompts: list[str] = []
    answers: list[str] = []
    result = (Probes(prompts, "neighborhood", part="prompt"), Probes(answers, "neighborhood", part="answer"))
    if value is None:
        return result
    if not isinstance(value, list):
        chk.problem("neighborhood", f"must be a list of {{prompt, answer}} mappings, got {describe(value)}")
        return result
    for i, item in enumerate(value, 1):
        where = f"item {i}"
        if not isinstance(item, dict):
            chk.problem("neighborhood", f"must be a mapping with 'prompt' and 'answer', got {describe(item)}", where)
            continue
        for key in item:
            if key not in ("prompt", "answer"):
                chk.problem("neighborhood", f"unknown key '{key}'; expected 'prompt' and 'answer'", where)
        prompt = chk.string(item.get("prompt"), "neighborhood", f"{where} prompt")
        answer = chk.string(item.get("answer"), "neighborhood", f"{where} answer")
        if prompt is not None and answer is not None:
            prompts.append(prompt)
            answers.append(answer)
    return result
