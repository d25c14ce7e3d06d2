"""What a valid fact is: the `Fact` and `Neighbor` records, and the checks every layout's rows go through.

A layout's adapter (csv_file, records, counterfact, zsre) checks the types of its own fields
with a `Checker`, then hands the values to `make_fact`, which checks their content (one
placeholder, the subject in the prompt, no empty targets) the same way for every layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from romebatch.errors import located

# Longer strings are certainly a mistake (a whole document pasted into a cell); refusing
# them keeps tokenisation and error messages bounded.
MAX_FIELD_CHARS = 10_000

PLACEHOLDER = "{}"
# Fact.hash must never change between versions (journals store it): sorted keys, no
# whitespace, raw UTF-8 rather than \u escapes.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class Neighbor:
    """A prompt about something else whose answer the edit must not change."""

    prompt: str  # full text, no placeholder
    answer: str  # stored stripped; scorers add the leading space themselves


@dataclass(frozen=True)
class Fact:
    """One validated rewrite: `prompt` with `subject` filled in should complete to `target_new`."""

    id: str
    subject: str
    prompt: str  # template with exactly one "{}" where the subject goes
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()  # full texts, subject filled in
    neighborhood: tuple[Neighbor, ...] = ()
    source: str = ""  # "path:row", for messages

    @property
    def text(self) -> str:
        """The prompt as the model sees it."""
        # str.replace, not str.format: a subject may itself contain braces.
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    @cached_property
    def hash(self) -> str:
        """Identity of the edit itself, so that re-running a manifest recognises done work.

        Only subject, prompt template and target_new define what gets written into the
        weights; id, target_true and probes only affect reporting, so they are left out.
        """
        canonical = _CANONICAL_JSON.encode(
            {"subject": self.subject, "prompt": self.prompt, "target_new": self.target_new}
        )
        return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        """A JSON-able dict in the YAML/JSONL record shape (plus `source`)."""
        return {
            "id": self.id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood],
            "source": self.source,
        }


# ---------------------------------------------------------------------------------------
# Per-record checks shared by every layout


class Checker:
    """Collects the problems of one record; each check returns a usable value or None."""

    def __init__(self, path: str, row: int | None):
        self.path = path
        self.row = row
        self.problems: list[str] = []

    @property
    def source(self) -> str:
        return self.path if self.row is None else f"{self.path}:{self.row}"

    def problem(self, field_name: str | None, what: str, where: str = "") -> None:
        self.problems.append(located(self.path, self.row, field_name, f"{where}: {what}" if where else what))

    def string(self, value: Any, field_name: str, where: str = "", *, required: bool = True) -> str | None:
        """Type and size check. None and "absent" are the same thing for optional fields."""
        if value is None:
            if required:
                self.problem(field_name, "missing", where)
            return None
        if not isinstance(value, str):
            # YAML turns unquoted 1956 or yes into int/bool; say so, since the user typed text.
            self.problem(field_name, f"must be a string, got {describe(value)}", where)
            return None
        if len(value) > MAX_FIELD_CHARS:
            self.problem(field_name, f"is {len(value):,} characters long; the limit is {MAX_FIELD_CHARS:,}", where)
            return None
        if not is_valid_unicode(value):
            # JSON's "\ud800" escapes decode to half a character, which no file or database can hold.
            self.problem(field_name, "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode", where)
            return None
        return value

    def string_list(self, value: Any, field_name: str) -> list[str] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(field_name, f"must be a list of strings, got {describe(value)}")
            return None
        ok = True
        for i, item in enumerate(value, 1):
            if self.string(item, field_name, f"item {i}") is None:
                ok = False
        return value if ok else None

    def record_id(self, value: Any, field_name: str, default: str | None) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip() and default is not None):
            if default is None:
                self.problem(field_name, "missing")
            return default
        # Integer ids are common (CounterFact case_id); bool is an int but never an id.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        text = self.string(value, field_name)
        if text is None:
            return None
        if not text.strip():
            self.problem(field_name, "empty id")
            return None
        return text.strip()


def is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value, 40)}"


def short_repr(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters ("..." at the end), built piece by piece.

    Never the whole repr first: a YAML alias bomb is a few hundred bytes of text that expands
    to millions of values (or refers to itself), and an integer of thousands of digits has no
    repr at all. Only about `limit` characters of work are done, whatever the value.
    """
    parts: list[str] = []
    size = 0
    for piece in _repr_pieces(value, limit):
        parts.append(piece)
        size += len(piece)
        if size > limit:
            break
    text = "".join(parts)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _repr_pieces(value: Any, limit: int) -> Iterator[str]:
    """repr(value) in pieces, lazily: the caller stops once it has enough (each level nests one
    generator, and each opens with a bracket, so a deep or cyclic value ends within `limit` levels)."""
    if isinstance(value, (str, bytes, bytearray)):
        yield repr(value[: limit + 1])  # a longer value is cut by the caller anyway
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        try:
            yield repr(value)[: limit + 1]
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            yield f"<an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits>"
    elif isinstance(value, (list, tuple, set, frozenset, dict)) and type(value) in _BRACKETS:
        opening, closing = _BRACKETS[type(value)]
        if not value and type(value) in (set, frozenset):
            yield f"{type(value).__name__}()"
            return
        yield opening
        for i, item in enumerate(value.items() if isinstance(value, dict) else value):
            if i:
                yield ", "
            if isinstance(value, dict):
                yield from _repr_pieces(item[0], limit)
                yield ": "
                item = item[1]
            yield from _repr_pieces(item, limit)
        if isinstance(value, tuple) and len(value) == 1:
            yield ","
        yield closing
    else:
        yield repr(value)[: limit + 1]


_BRACKETS = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"), dict: ("{", "}"), frozenset: ("frozenset({", "})")}


class Probes(NamedTuple):
    """Probe strings plus where they came from, so content errors name the user's field.

    One object per list rather than per item: CSV manifests can hold 100,000 rows.
    """

    values: list[str]
    field: str
    numbered: bool = True  # say "item N" (a list field) or not (a single-valued field)
    part: str = ""  # which half of a {prompt, answer} mapping, for the generic layout

    def where(self, index: int) -> str:
        label = f"item {index + 1}" if self.numbered else ""
        return f"{label} {self.part}".strip()


NO_PROBES = Probes([], "")


@dataclass(frozen=True)
class Labels:
    """The user's names for the core fields in a given format."""

    subject: str = "subject"
    prompt: str = "prompt"
    target_new: str = "target_new"
    target_true: str = "target_true"


def make_fact(
    chk: Checker,
    *,
    fid: str | None,
    subject: str | None,
    prompt: str | None,
    target_new: str | None,
    target_true: str | None,
    paraphrases: Probes = NO_PROBES,
    neighbors: tuple[Probes, Probes] = (NO_PROBES, NO_PROBES),  # prompts, answers; same length
    labels: Labels = Labels(),
) -> Fact | None:
    """Content checks and normalisation, after the format adapter has checked types.

    Arguments are None where the adapter already reported a problem; checks that depend
    on them are skipped so one mistake gives one line.

    Returns a Fact whenever the edit itself (id, subject, template, target_new) is usable,
    even if other fields have problems, so cross-record checks can still run on it: the
    record is valid only if `chk.problems` is empty.
    """
    if subject is not None:
        subject = subject.strip()
        if not subject:
            chk.problem(labels.subject, "empty subject")
            subject = None
        elif PLACEHOLDER in subject:
            # "{}" marks where the subject goes in a prompt: inside a subject it cannot be told
            # apart from the placeholder, so the prompt would be filled in wrongly. Refused.
            chk.problem(labels.subject, "contains '{}', which marks the subject's place in prompts; remove it")
            subject = None
    template = _template(chk, prompt, subject, labels) if prompt is not None else None
    if target_new is not None:
        target_new = target_new.strip()
        if not target_new:
            chk.problem(labels.target_new, "empty target")
            target_new = None
    if target_true is not None:
        target_true = target_true.strip()
        if not target_true:
            chk.problem(labels.target_true, "empty target")
        elif target_true == target_new:
            chk.problem(labels.target_true, f"equals target_new '{target_new}'; the edit would change nothing")
    texts = _paraphrase_texts(chk, paraphrases, subject)
    neighborhood = _neighbors(chk, *neighbors)
    if fid is None or subject is None or template is None or target_new is None:
        return None
    return Fact(
        id=fid,
        subject=subject,
        prompt=template,
        target_new=target_new,
        target_true=target_true or None,
        paraphrases=tuple(texts),
        neighborhood=tuple(neighborhood),
        source=chk.source,
    )


def _template(chk: Checker, prompt: str, subject: str | None, labels: Labels) -> str | None:
    # Trailing whitespace would be tokenised between the prompt and the target's own
    # leading space, so the model would be trained on an odd token sequence.
    prompt = prompt.rstrip()
    if not prompt:
        chk.problem(labels.prompt, "empty prompt")
        return None
    count = prompt.count(PLACEHOLDER)
    if count > 1:
        chk.problem(labels.prompt, f"contains '{{}}' {count} times; use it exactly once, where the subject goes")
        return None
    if count == 1:
        template = prompt
    elif subject is None:
        return None  # cannot locate an invalid subject; its own problem is already reported
    elif subject not in prompt:
        chk.problem(labels.prompt, f"subject '{subject}' not found in prompt")
        return None
    else:
        template = prompt.replace(subject, PLACEHOLDER, 1)
    # Other code may call template.format(subject); a stray "{0}" or "}" would then
    # raise or silently substitute, far from the manifest.
    rest = template.replace(PLACEHOLDER, "", 1)
    if "{" in rest or "}" in rest:
        chk.problem(labels.prompt, "contains braces other than the single '{}' for the subject")
        return None
    return template


def _paraphrase_texts(chk: Checker, probes: Probes, subject: str | None) -> list[str]:
    texts = []
    for i, text in enumerate(probes.values):
        text = text.rstrip()  # same tokenisation reason as for the prompt
        if not text:
            chk.problem(probes.field, "empty paraphrase", probes.where(i))
            continue
        if PLACEHOLDER in text and subject is not None:
            text = text.replace(PLACEHOLDER, subject)
        texts.append(text)
    return texts


def _neighbors(chk: Checker, prompts: Probes, answers: Probes) -> list[Neighbor]:
    out = []
    for i, (prompt, answer) in enumerate(zip(prompts.values, answers.values)):
        prompt = prompt.rstrip()
        answer = answer.strip()
        if not prompt:
            chk.problem(prompts.field, "empty neighborhood prompt", prompts.where(i))
        elif PLACEHOLDER in prompt:
            # Neighbours are about other subjects; filling in the edited subject would
            # turn a specificity probe into a generalisation probe.
            chk.problem(prompts.field, "neighborhood prompts are full texts; '{}' is not allowed", prompts.where(i))
        if not answer:
            chk.problem(answers.field, "empty neighborhood answer", answers.where(i))
        if prompt and answer and PLACEHOLDER not in prompt:
            out.append(Neighbor(prompt, answer))
    return out


def mapping(chk: Checker, value: Any, field_name: str) -> dict | None:
    if value is None:
        chk.problem(field_name, "missing")
        return None
    if not isinstance(value, dict):
        chk.problem(field_name, f"must be a mapping, got {describe(value)}")
        return None
    return value


def single_neighbor(chk: Checker, record: dict, prompt_field: str, answer_field: str) -> tuple[Probes, Probes]:
    """One (prompt, answer) probe stored as two sibling fields; both or neither must be given."""
    raw_prompt, raw_answer = record.get(prompt_field), record.get(answer_field)
    if raw_prompt is None and raw_answer is None:
        return (NO_PROBES, NO_PROBES)
    if raw_prompt is None or raw_answer is None:
        missing, other = (prompt_field, answer_field) if raw_prompt is None else (answer_field, prompt_field)
        chk.problem(missing, f"missing, but {other} is given; they form one probe")
        return (NO_PROBES, NO_PROBES)
    prompt = chk.string(raw_prompt, prompt_field)
    answer = chk.string(raw_answer, answer_field)
    if prompt is None or answer is None:
        return (NO_PROBES, NO_PROBES)
    return (Probes([prompt], prompt_field, numbered=False), Probes([answer], answer_field, numbered=False))
