"""`romebatch compare`: what the model now says, base state against a journal state.

The paper judges an edit by what the edited model generates (its generation study: "The
Space Needle is located in the city of" → base " Seattle", edited " Paris"). For each
prompt this module gives, on the base model and on the chosen state side by side:

- the greedy continuation (`max_new_tokens` tokens; greedy, so it is a function of the
  weights alone and the same on every run);
- P(target_new) and P(target_true), length-normalised as everywhere in romebatch
  (`scores.answer_nll`: exp(−mean token NLL) of the answer with a leading space).

A fact contributes its own prompt, its paraphrases and its neighbourhood prompts. On a
neighbourhood prompt, "true" is the neighbour's own expected answer and "new" is the
edited fact's new object: a good edit leaves both where they were.

Both states are made by `Editor.replay`, the same byte-exact replay every command uses,
so any state of the journal can be compared without exporting a model.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import UserError
from .lm import continue_prompt
from .manifest import Fact, fact_from_dict
from .model import LoadedModel
from .scores import answer_nll

DEFAULT_SAMPLE = 5  # facts compared when no selector is given
DEFAULT_MAX_NEW_TOKENS = 8


@dataclass
class PromptComparison:
    """One prompt on both states: one row of the table."""

    fact_id: str | None  # None for a free --prompt
    kind: str  # prompt | paraphrase | neighborhood | free
    prompt: str  # the full text, subject filled in
    target_new: str | None  # the fact's new object
    target_true: str | None  # its true object; on a neighbourhood prompt, the neighbour's answer
    base_text: str = ""
    state_text: str = ""
    p_new_base: float | None = None
    p_new_state: float | None = None
    p_true_base: float | None = None
    p_true_state: float | None = None

    @property
    def changed(self) -> bool:
        return self.base_text != self.state_text


@dataclass
class CompareReport:
    journal: str
    state: int  # the compared journal state (edit seq); 0 is the base model
    max_new_tokens: int
    rows: list[PromptComparison] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "journal": self.journal,
            "base": 0,
            "state": self.state,
            "max_new_tokens": self.max_new_tokens,
            "rows": [asdict(r) | {"changed": r.changed} for r in self.rows],
        }


# name -> (polars dtype name, description): the --results table
COMPARE_SCHEMA: dict[str, tuple[str, str]] = {
    "fact_id": ("String", "the fact's id (empty for a free --prompt)"),
    "kind": ("String", "prompt, paraphrase, neighborhood or free"),
    "prompt": ("String", "the prompt as the model sees it"),
    "target_new": ("String", "the fact's new object"),
    "target_true": ("String", "its true object (a neighbourhood prompt: the neighbour's answer)"),
    "base_text": ("String", "greedy continuation on the base model"),
    "state_text": ("String", "greedy continuation at the compared state"),
    "p_new_base": ("Float64", "P(target_new) on the base model (length-normalised)"),
    "p_new_state": ("Float64", "P(target_new) at the compared state"),
    "p_true_base": ("Float64", "P(target_true) on the base model"),
    "p_true_state": ("Float64", "P(target_true) at the compared state"),
    "changed": ("Boolean", "the continuation differs between the two states"),
}


@torch.inference_mode()
def greedy_continuations(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt (prompt excluded), one prompt at a time.

    One at a time, not batched: no padding, so nothing depends on how a family handles a
    padded batch, and the text is what `model.generate` gives for that prompt alone.
    """
    return [continue_prompt(lm, prompt, do_sample=False, max_new_tokens=max_new_tokens) for prompt in prompts]


def plan_rows(facts: list[Fact], prompts: list[str]) -> list[PromptComparison]:
    """The rows to compare: each fact's prompt, paraphrases and neighbourhood, then free prompts."""
    rows = []
    for fact in facts:
        rows.append(PromptComparison(fact.id, "prompt", fact.text, fact.target_new, fact.target_true))
        rows += [
            PromptComparison(fact.id, "paraphrase", p, fact.target_new, fact.target_true) for p in fact.paraphrases
        ]
        rows += [
            PromptComparison(fact.id, "neighborhood", n.prompt, fact.target_new, n.answer) for n in fact.neighborhood
        ]
    rows += [PromptComparison(None, "free", p, None, None) for p in prompts]
    return rows


def _score(lm: LoadedModel, rows: list[PromptComparison], max_new_tokens: int) -> list[tuple]:
    """(text, P(new), P(true)) per row on the model as it is now."""
    texts = greedy_continuations(lm, [r.prompt for r in rows], max_new_tokens)
    # The same length-normalised probability as every score in romebatch (scores.answer_nll),
    # all pairs in one batched call.
    pairs: list[tuple[str, str]] = []
    index: dict[tuple[int, str], int] = {}
    for i, r in enumerate(rows):
        for name, answer in (("new", r.target_new), ("true", r.target_true)):
            if answer:
                index[i, name] = len(pairs)
                pairs.append((r.prompt, answer))
    nll = answer_nll(lm, pairs) if pairs else []

    def p(i, name):
        return math.exp(-nll[index[i, name]]) if (i, name) in index else None

    return [(text, p(i, "new"), p(i, "true")) for i, text in enumerate(texts)]


def compare(
    editor,
    facts: Sequence[Fact] = (),
    prompts: Sequence[str] = (),
    *,
    at: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> CompareReport:
    """Score `facts` and free `prompts` on the base model and on state `at` (default: the head).

    The editor's model is left at the journal's head, as it was opened.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    state = editor.head if at is None else at
    if state < 0:
        raise UserError(f"--at {state}: give an edit number (0 = the base model)")
    if state:
        editor.journal.edit(state)  # one clear line if there is no such edit
    rows = plan_rows(list(facts), list(prompts))
    if not rows:
        raise UserError("nothing to compare: the selection has no facts or prompts")
    try:
        editor.replay(state)  # checked against the stored hashes
        edited = _score(editor.lm, rows, max_new_tokens)
        editor.replay(0, verify=False)
        base = _score(editor.lm, rows, max_new_tokens)
    finally:
        editor.replay(verify=False)
    for row, (b_text, b_new, b_true), (s_text, s_new, s_true) in zip(rows, base, edited):
        row.base_text, row.p_new_base, row.p_true_base = b_text, b_new, b_true
        row.state_text, row.p_new_state, row.p_true_state = s_text, s_new, s_true
    return CompareReport(journal=str(editor.journal.directory), state=state, max_new_tokens=max_new_tokens, rows=rows)


def journal_facts(journal, at: int | None = None) -> list[Fact]:
    """The facts edited on the path to state `at` (default: the head), each once, in edit order."""
    seen: dict[str, Fact] = {}
    for record in journal.lineage(at):
        seen.setdefault(record.fact_hash, fact_from_dict(json.loads(record.fact_json)))
    return list(seen.values())


def select_facts(
    journal,
    *,
    manifest_facts: list[Fact] | None = None,
    fact_ids: Sequence[str] = (),
    prompts: Sequence[str] = (),
    at: int | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
) -> list[Fact]:
    """The facts to compare: a manifest's, the journal's by id, or a seeded sample of the edited ones.

    With free prompts only, no fact is chosen. Ids are looked up among every edit in the
    journal (a rolled-back one too), the latest edit of an id winning.
    """
    if manifest_facts is not None:
        return list(manifest_facts)
    if fact_ids:
        by_id: dict[str, Fact] = {}
        for record in journal.edits():
            by_id[record.fact_id] = fact_from_dict(json.loads(record.fact_json))
        missing = [i for i in fact_ids if i not in by_id]
        if missing:
            raise UserError(f"--fact {missing[0]}: journal {journal.directory} has no edit of that fact id")
        return [by_id[i] for i in dict.fromkeys(fact_ids)]
    if prompts:
        return []
    edited = journal_facts(journal, at)
    if sample < 1:
        raise UserError(f"--sample {sample}: give at least 1")
    if len(edited) <= sample:
        return edited
    chosen = sorted(random.Random(seed).sample(range(len(edited)), sample))
    return [edited[i] for i in chosen]


def write_compare_results(report: CompareReport, path) -> object:
    from pathlib import Path

    from .report import _frame, _write

    class _Row:  # _frame reads attributes; `changed` is a property
        def __init__(self, row):
            self.__dict__.update(asdict(row), changed=row.changed)

    return _write(_frame([_Row(r) for r in report.rows], COMPARE_SCHEMA), Path(path))


def render_compare(console, report: CompareReport) -> None:
    """One rich table per fact (and one for free prompts); every user string shown literally."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .report import literal

    def p(before, after) -> Text:
        if before is None:
            return Text("-")
        return Text(f"{before:.3f} → {after:.3f}", style="bold" if abs(after - before) >= 0.1 else "")

    state = "the base model" if report.state == 0 else f"edit {report.state}"
    console.print(
        literal(
            f"base model vs {state} of journal {report.journal} (greedy, {report.max_new_tokens} "
            f"new tokens; P length-normalised)"
        )
    )
    groups: dict[str | None, list[PromptComparison]] = {}
    for row in report.rows:
        groups.setdefault(row.fact_id if row.kind != "free" else None, []).append(row)
    for fact_id, rows in groups.items():
        own = rows[0]
        title = (
            Text("free prompts")
            if fact_id is None
            else literal(
                f"{fact_id}: new {own.target_new!r}" + (f", true {own.target_true!r}" if own.target_true else "")
            )
        )
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("", "prompt", "base says", f"{state} says", "P(new)", "P(true)"):
            table.add_column(column)
        for r in rows:
            true = p(r.p_true_base, r.p_true_state)
            if r.kind == "neighborhood":  # its "true" object is the neighbour's own answer
                true += literal(f" {r.target_true!r}")
            table.add_row(
                Text(r.kind),
                literal(r.prompt),
                literal(repr(r.base_text)),
                literal(repr(r.state_text), style="bold yellow" if r.changed else ""),
                p(r.p_new_base, r.p_new_state),
                true,
            )
        console.print(table)
    changed = sum(r.changed for r in report.rows)
    console.print(Text(f"{changed} of {len(report.rows)} continuation(s) changed"))
