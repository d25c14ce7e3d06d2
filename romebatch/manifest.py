"""Read and validate a manifest: the list of facts to edit into a model.

The CLI validates a manifest before it loads any model, so this module imports only the
standard library and PyYAML: `romebatch --help` and a bad manifest must both fail fast.

Validation is all-or-nothing. `load_manifest` reads the whole file, collects every
problem as one `file:row: field 'name': what` line and raises one `ManifestError`
listing them all, so a user fixes a manifest in one pass instead of one error per run.

Formats (chosen by extension; for `.json` by looking at the first record):

- `.csv`: header row (line 1), then one fact per row; rows are reported by the line they
  start on. Columns: id, subject, prompt, target_new, target_true, paraphrases,
  neighborhood_prompts, neighborhood_answers. A list cell holds items separated by `|`,
  each item trimmed (`a | b` is ["a", "b"]); a cell whose first non-blank character is
  `[` is parsed as a JSON list of strings instead, kept as written, for items that
  contain `|`. An empty cell means "absent".
- `.yaml` / `.yml`: a list of fact mappings, or a mapping whose `facts:` key holds one.
- `.jsonl`: one fact object per line.
- `.json`: a list of records (or `{"facts": [...]}`) in one of four layouts: CounterFact as published (with
  `requested_rewrite`), CounterFact flattened as in EasyEdit, zsRE in MEND's layout, or
  the same fact objects as YAML/JSONL (format "json").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple

import yaml

from romebatch.errors import ManifestError, UserError, located, one_line
from romebatch.files import MAX_FILE_BYTES, open_regular_file  # noqa: F401 (MAX_FILE_BYTES: documented here too)

# Longer strings are certainly a mistake (a whole document pasted into a cell); refusing
# them keeps tokenisation and error messages bounded.
MAX_FIELD_CHARS = 10_000

FORMATS = ("csv", "yaml", "jsonl", "json", "counterfact", "counterfact-flat", "zsre")

CSV_COLUMNS = (
    "id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood_prompts",
    "neighborhood_answers",
)
CSV_REQUIRED = ("subject", "prompt", "target_new")
RECORD_KEYS = ("id", "subject", "prompt", "target_new", "target_true", "paraphrases", "neighborhood")
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


def fact_from_dict(d: dict) -> Fact:
    """Rebuild a Fact from `Fact.to_dict()` output (e.g. read back from a journal).

    The dict goes through the same validation as a manifest record, because a journal
    on disk can be edited or truncated like any other file.
    """
    where = d.get("source") if isinstance(d, dict) and isinstance(d.get("source"), str) else None
    chk = _Checker(where or "fact", None)
    fact = _adapt_generic(d, chk, default_id=None, extra_keys=("source",))
    if fact is None or chk.problems:
        raise ManifestError(chk.problems)
    return fact


@dataclass
class Manifest:
    path: str
    format: str  # one of FORMATS
    facts: list[Fact]  # valid, de-duplicated, in file order
    duplicates_dropped: int
    # With skip_invalid=True: one entry per dropped record, its problems joined by "; ".
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Entry point


def load_manifest(path: str | os.PathLike, *, limit: int | None = None, skip_invalid: bool = False) -> Manifest:
    """Read, validate and de-duplicate a manifest.

    Raises ManifestError listing every problem. With `skip_invalid=True` (for third-party
    benchmark data) invalid records are dropped and listed in `Manifest.skipped` instead;
    problems with the file itself (unreadable, not UTF-8, not parseable) still raise.
    `limit` keeps the first N facts, after the whole file has been validated.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be zero or more, got {limit}")
    name = os.fspath(path)
    try:
        source = _open_source(name)
        collector = _Collector(name, source.unit, skip_invalid)
        for row, raw in source.records:
            collector.add(row, raw, source.adapt)
    except _FileProblem as e:
        raise ManifestError([e.line]) from None
    if collector.problems:
        raise ManifestError(collector.problems)
    if collector.records_seen == 0:
        raise ManifestError([located(name, None, None, "contains no facts")])
    facts = collector.facts if limit is None else collector.facts[:limit]
    return Manifest(name, source.format, facts, collector.duplicates, collector.skipped)


class _FileProblem(Exception):
    """The file as a whole cannot be read; reported alone, since row checks would be noise."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


class _Source(NamedTuple):
    format: str
    unit: str  # what a row number counts, for "first used on line 3" messages
    records: Iterable[tuple[int, Any]]
    adapt: Callable[[Any, _Checker], Fact | None]


def _open_source(path: str) -> _Source:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return _csv_source(path)
    if ext in (".yaml", ".yml"):
        return _Source("yaml", "record", _numbered(_yaml_records(path)), _adapt_generic)
    if ext == ".jsonl":
        return _Source("jsonl", "line", _jsonl_records(path), _adapt_generic)
    if ext == ".json":
        return _json_source(path)
    raise _FileProblem(
        located(path, None, None, f"unsupported file type '{ext or '(none)'}'; use .csv, .yaml, .yml, .jsonl or .json")
    )


# ---------------------------------------------------------------------------------------
# Cross-record checks


class _Collector:
    """Validates records one at a time; keeps only small per-fact keys for cross-record checks."""

    def __init__(self, path: str, unit: str, skip_invalid: bool):
        self.path = path
        self.unit = unit
        self.skip_invalid = skip_invalid
        self.facts: list[Fact] = []
        self.problems: list[str] = []
        self.skipped: list[str] = []
        self.duplicates = 0
        self.records_seen = 0
        self._rows_by_hash: dict[str, int] = {}
        self._rows_by_id: dict[str, int] = {}
        self._targets_by_key: dict[tuple[str, str], tuple[str, int]] = {}

    def add(self, row: int, raw: Any, adapt: Callable[[Any, _Checker], Fact | None]) -> None:
        self.records_seen += 1
        chk = _Checker(self.path, row)
        if isinstance(raw, _Unparsed):
            chk.problem(None, raw.what)
            fact = None
        else:
            fact = adapt(raw, chk)
        if fact is not None:
            if fact.hash not in self._rows_by_hash:
                # Also for a record with other problems, so that the user sees all of them now.
                self._check_against_earlier(fact, chk)
            elif not chk.problems:
                # The same edit twice is harmless: keep the first, whatever the ids say.
                self.duplicates += 1
                return
        if fact is None or chk.problems:
            self._reject(chk.problems)
            return
        self._remember(fact, row)
        self.facts.append(fact)

    def _check_against_earlier(self, fact: Fact, chk: _Checker) -> None:
        first = self._rows_by_id.get(fact.id)
        if first is not None:
            chk.problem("id", f"duplicate id '{fact.id}' (first used on {self.unit} {first})")
        earlier = self._targets_by_key.get((fact.subject, fact.prompt))
        if earlier is not None:
            # Two targets for one prompt cannot both be written; which one wins would
            # depend on order, so make the user choose.
            target, first = earlier
            chk.problem(
                "target_new",
                f"conflicting targets for subject '{fact.subject}' and this prompt: "
                f"'{fact.target_new}' here, '{target}' on {self.unit} {first}",
            )

    def _remember(self, fact: Fact, row: int) -> None:
        self._rows_by_hash[fact.hash] = row
        self._rows_by_id[fact.id] = row
        self._targets_by_key[(fact.subject, fact.prompt)] = (fact.target_new, row)

    def _reject(self, problems: list[str]) -> None:
        if self.skip_invalid:
            self.skipped.append("; ".join(problems))
        else:
            self.problems.extend(problems)


# ---------------------------------------------------------------------------------------
# Per-record checks shared by every format


class _Checker:
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
            self.problem(field_name, f"must be a string, got {_describe(value)}", where)
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
            self.problem(field_name, f"must be a list of strings, got {_describe(value)}")
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


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


class _Probes(NamedTuple):
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


_NO_PROBES = _Probes([], "")


@dataclass(frozen=True)
class _Labels:
    """The user's names for the core fields in a given format."""

    subject: str = "subject"
    prompt: str = "prompt"
    target_new: str = "target_new"
    target_true: str = "target_true"


def _make_fact(
    chk: _Checker,
    *,
    fid: str | None,
    subject: str | None,
    prompt: str | None,
    target_new: str | None,
    target_true: str | None,
    paraphrases: _Probes = _NO_PROBES,
    neighbors: tuple[_Probes, _Probes] = (_NO_PROBES, _NO_PROBES),  # prompts, answers; same length
    labels: _Labels = _Labels(),
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


def _template(chk: _Checker, prompt: str, subject: str | None, labels: _Labels) -> str | None:
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


def _paraphrase_texts(chk: _Checker, probes: _Probes, subject: str | None) -> list[str]:
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


def _neighbors(chk: _Checker, prompts: _Probes, answers: _Probes) -> list[Neighbor]:
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


# ---------------------------------------------------------------------------------------
# Generic fact records: YAML, JSONL, plain JSON, and Fact.to_dict()


def _adapt_generic(
    record: Any, chk: _Checker, *, default_id: str | None = "", extra_keys: tuple[str, ...] = ()
) -> Fact | None:
    """default_id "" means "use the row number"; None means the id is required."""
    if not isinstance(record, dict):
        chk.problem(None, f"expected a mapping of fact fields, got {_describe(record)}")
        return None
    for key in record:
        if key not in RECORD_KEYS and key not in extra_keys:
            chk.problem(str(key), f"unknown field; expected one of {', '.join(RECORD_KEYS)}")
    if default_id == "":
        default_id = str(chk.row)
    fid = chk.record_id(record.get("id"), "id", default_id)
    paraphrases = chk.string_list(record.get("paraphrases"), "paraphrases") or []
    fact = _make_fact(
        chk,
        fid=fid,
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("prompt"), "prompt"),
        target_new=chk.string(record.get("target_new"), "target_new"),
        target_true=chk.string(record.get("target_true"), "target_true", required=False),
        paraphrases=_Probes(paraphrases, "paraphrases"),
        neighbors=_generic_neighbors(chk, record.get("neighborhood")),
    )
    if "source" in extra_keys:
        source = chk.string(record.get("source"), "source", required=False)
        if fact is not None and source is not None:
            fact = replace(fact, source=source)
    return fact


def _generic_neighbors(chk: _Checker, value: Any) -> tuple[_Probes, _Probes]:
    prompts: list[str] = []
    answers: list[str] = []
    result = (_Probes(prompts, "neighborhood", part="prompt"), _Probes(answers, "neighborhood", part="answer"))
    if value is None:
        return result
    if not isinstance(value, list):
        chk.problem("neighborhood", f"must be a list of {{prompt, answer}} mappings, got {_describe(value)}")
        return result
    for i, item in enumerate(value, 1):
        where = f"item {i}"
        if not isinstance(item, dict):
            chk.problem("neighborhood", f"must be a mapping with 'prompt' and 'answer', got {_describe(item)}", where)
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


# ---------------------------------------------------------------------------------------
# Reading files


class _Unparsed(NamedTuple):
    """A record whose text could not be parsed (one bad JSONL line); other lines still count."""

    what: str


def _open(path: str, newline: str | None = None):
    try:
        return open_regular_file(path, newline=newline)
    except UserError as e:
        raise _FileProblem(e.message) from None


def _read_text(path: str) -> str:
    try:
        # utf-8-sig: editors on Windows prepend a BOM that would otherwise become part of
        # the first key or column name.
        with _open(path) as f:
            return f.read()
    except UnicodeDecodeError:
        raise _FileProblem(_bad_utf8(path)) from None
    except OSError as e:
        raise _FileProblem(located(path, None, None, f"cannot read file: {e.strerror or e}")) from None


def _bad_utf8(path: str) -> str:
    """Find the first line that is not UTF-8, so the user knows where to look."""
    try:
        with open_regular_file(path, encoding=None) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    byte = f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                    return located(path, line_no, None, f"not valid UTF-8 ({byte}); save the file as UTF-8")
    except (OSError, UserError):
        pass
    return located(path, None, None, "not valid UTF-8; save the file as UTF-8")


def _numbered(records: list) -> Iterator[tuple[int, Any]]:
    return ((i, r) for i, r in enumerate(records, 1))


def _fact_list(path: str, doc: Any, kind: str) -> list:
    """Accept a bare list, or a mapping whose `facts` key holds the list."""
    if doc is None:
        return []
    if isinstance(doc, dict):
        problems = [
            located(path, None, str(key), "unknown top-level key; expected only 'facts'")
            for key in doc
            if key != "facts"
        ]
        if "facts" not in doc:
            what = f"{kind} must be a list of facts or a mapping with a 'facts' key"
            problems.append(located(path, None, None, what))
        if problems:
            raise ManifestError(problems)
        doc = doc["facts"]
        if doc is None:
            return []
    if not isinstance(doc, list):
        raise _FileProblem(located(path, None, None, f"{kind} must be a list of facts, got {type(doc).__name__}"))
    return doc


def _safe_yaml(text: str) -> Any:
    """yaml.safe_load, but with the C parser when PyYAML has it.

    Safe construction only: a manifest may come from anyone, and the full loaders build
    arbitrary Python objects (!!python/object) while parsing. CSafeLoader uses the same
    SafeConstructor as safe_load; it is just about 6x faster (5,000 records: 0.5 s, not 3 s).
    """
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _DuplicateKey(ValueError):
    def __init__(self, key: Any, line: int | None = None):
        super().__init__(key)
        self.key = key
        self.line = line


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep)  # raises the loader's own error
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def strict_json(text: str) -> Any:
    """json.loads, refusing an object that gives one key twice (JSON would keep the last)."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _value_problem(error: ValueError) -> str:
    text = str(error)
    if "digits" in text:  # Python's int-size limit (sys.get_int_max_str_digits)
        return "a number with thousands of digits"
    return text.splitlines()[0] if text else "a value that cannot be read"


def manifest_yaml(path: str) -> Any:
    """A YAML file read the way manifests are (regular file, size cap, duplicate keys refused).

    Raises UserError naming the file (and line) for every problem.
    """
    text = _read_text_or_error(path)
    try:
        return _safe_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(located(path, line, None, f"invalid YAML: {what}")) from None
    except RecursionError:
        raise UserError(located(path, None, None, "invalid YAML: nested too deeply")) from None
    except _DuplicateKey as e:
        raise UserError(located(path, e.line, one_line(str(e.key)), "appears twice in one mapping")) from None
    except ValueError as e:
        raise UserError(located(path, None, None, f"invalid YAML: {_value_problem(e)}")) from None


def _read_text_or_error(path: str) -> str:
    try:
        return _read_text(path)
    except _FileProblem as e:
        raise UserError(e.line) from None


def _yaml_records(path: str) -> list:
    text = _read_text(path)
    try:
        doc = _safe_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _FileProblem(located(path, line, None, f"invalid YAML: {what}")) from None
    except RecursionError:
        raise _FileProblem(located(path, None, None, "invalid YAML: nested too deeply")) from None
    except _DuplicateKey as e:
        raise _FileProblem(located(path, e.line, str(e.key), "appears twice in one mapping")) from None
    except ValueError as e:  # an integer of thousands of digits, say
        raise _FileProblem(located(path, None, None, f"invalid YAML: {_value_problem(e)}")) from None
    return _fact_list(path, doc, "YAML manifest")


def _jsonl_records(path: str) -> Iterator[tuple[int, Any]]:
    f = _open(path)
    with f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, strict_json(line)
                except json.JSONDecodeError as e:
                    yield line_no, _Unparsed(f"invalid JSON: {e.msg} (column {e.colno})")
                except RecursionError:  # a nesting bomb: refuse it like any other bad line
                    yield line_no, _Unparsed("invalid JSON: nested too deeply")
                except _DuplicateKey as e:
                    yield line_no, _Unparsed(f"invalid JSON: key {_describe(e.key)} appears twice in one object")
                except ValueError as e:
                    yield line_no, _Unparsed(f"invalid JSON: {_value_problem(e)}")
        except UnicodeDecodeError:
            raise _FileProblem(_bad_utf8(path)) from None


def _json_source(path: str) -> _Source:
    text = _read_text(path)
    try:
        doc = strict_json(text)
    except json.JSONDecodeError as e:
        raise _FileProblem(located(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")) from None
    except RecursionError:
        raise _FileProblem(located(path, None, None, "invalid JSON: nested too deeply")) from None
    except _DuplicateKey as e:
        raise _FileProblem(
            located(path, None, None, f"invalid JSON: key {_describe(e.key)} appears twice in one object")
        ) from None
    except ValueError as e:
        raise _FileProblem(located(path, None, None, f"invalid JSON: {_value_problem(e)}")) from None
    records = _fact_list(path, doc, "JSON manifest")
    fmt, adapt = _sniff_json(records[0] if records else None)
    return _Source(fmt, "record", _numbered(records), adapt)


def _sniff_json(first: Any) -> tuple[str, Callable[[Any, _Checker], Fact | None]]:
    """Pick the layout from the first record; later records of another shape then fail loudly."""
    if isinstance(first, dict):
        if "requested_rewrite" in first:
            return "counterfact", _adapt_counterfact
        if "src" in first and "alt" in first:
            return "zsre", _adapt_zsre
        if "ground_truth" in first or "rephrase_prompt" in first or "locality_prompt" in first:
            return "counterfact-flat", _adapt_counterfact_flat
    return "json", _adapt_generic


# ---------------------------------------------------------------------------------------
# CSV


def _csv_source(path: str) -> _Source:
    f = _open(path, newline="")
    # Read the header eagerly so header problems surface before any row is looked at.
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
        f.close()
        raise _FileProblem(_csv_problem(path, 1, e)) from None
    if header is None:
        f.close()
        raise _FileProblem(located(path, None, None, "file is empty; expected a header row"))
    columns = [name.strip() for name in header]
    problems = _header_problems(path, columns)
    if problems:
        f.close()
        raise ManifestError(problems)
    return _Source("csv", "line", _csv_rows(path, f, reader, columns), _adapt_csv)


def _header_problems(path: str, columns: list[str]) -> list[str]:
    # A bad header would make every row report the same problem; report it once instead.
    problems = []
    seen = set()
    for i, name in enumerate(columns, 1):
        if not name:
            problems.append(located(path, 1, None, f"column {i} has no name"))
        elif name not in CSV_COLUMNS:
            problems.append(located(path, 1, name, f"unknown column; expected {', '.join(CSV_COLUMNS)}"))
        elif name in seen:
            problems.append(located(path, 1, name, "column appears twice"))
        seen.add(name)
    for name in CSV_REQUIRED:
        if name not in columns:
            problems.append(located(path, 1, name, "required column missing"))
    return problems


def _csv_problem(path: str, line: int, e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return _bad_utf8(path)
    return located(path, line, None, f"malformed CSV: {e}")


def _csv_rows(path: str, f: Any, reader: Any, columns: list[str]) -> Iterator[tuple[int, Any]]:
    with f:
        # Report the line a record starts on (what an editor shows), even when a quoted
        # cell spans several lines; reader.line_num is where the record ends.
        start = reader.line_num + 1
        try:
            for cells in reader:
                row, start = start, reader.line_num + 1
                if not cells or all(not c.strip() for c in cells):
                    continue  # blank lines are layout, not records
                yield row, (columns, cells)
        except (csv.Error, UnicodeDecodeError) as e:
            raise _FileProblem(_csv_problem(path, start, e)) from None


def _adapt_csv(raw: tuple[list[str], list[str]], chk: _Checker) -> Fact | None:
    columns, cells = raw
    if len(cells) > len(columns):
        chk.problem(None, f"row has {len(cells)} cells but the header has {len(columns)} columns")
        return None
    # Empty cells mean "absent"; missing trailing cells are treated the same way.
    row = {name: cell for name, cell in zip(columns, cells) if cell.strip()}
    paraphrases = _csv_list(chk, row.get("paraphrases"), "paraphrases")
    n_prompts = _csv_list(chk, row.get("neighborhood_prompts"), "neighborhood_prompts")
    n_answers = _csv_list(chk, row.get("neighborhood_answers"), "neighborhood_answers")
    neighbors = (_NO_PROBES, _NO_PROBES)
    if n_prompts is not None and n_answers is not None:
        if len(n_prompts) != len(n_answers):
            chk.problem(
                "neighborhood_answers",
                f"has {len(n_answers)} items but neighborhood_prompts has {len(n_prompts)}; they pair up one to one",
            )
        else:
            neighbors = (_Probes(n_prompts, "neighborhood_prompts"), _Probes(n_answers, "neighborhood_answers"))
    return _make_fact(
        chk,
        fid=chk.record_id(row.get("id"), "id", str(chk.row)),
        # Required cells that are blank get the specific "empty ..." message.
        subject=chk.string(row.get("subject", ""), "subject"),
        prompt=chk.string(row.get("prompt", ""), "prompt"),
        target_new=chk.string(row.get("target_new", ""), "target_new"),
        target_true=chk.string(row.get("target_true"), "target_true", required=False),
        paraphrases=_Probes(paraphrases or [], "paraphrases"),
        neighbors=neighbors,
    )


def _csv_list(chk: _Checker, cell: str | None, column: str) -> list[str] | None:
    """Split a list cell: `a|b|c`, or a JSON list when items themselves contain `|`."""
    if cell is None:
        return []
    if cell.lstrip().startswith("["):
        try:
            value = strict_json(cell)
        except json.JSONDecodeError as e:
            chk.problem(column, f"starts with '[' but is not a JSON list of strings: {e.msg} (column {e.colno})")
            return None
        except RecursionError:
            chk.problem(column, "starts with '[' but is nested too deeply to be a list of strings")
            return None
        except (_DuplicateKey, ValueError) as e:
            what = f"key {_describe(e.key)} appears twice" if isinstance(e, _DuplicateKey) else _value_problem(e)
            chk.problem(column, f"starts with '[' but is not a JSON list of strings: {what}")
            return None
        return chk.string_list(value, column)
    # Spaces around "|" are for readability ("a | b"), not part of the items.
    items = [item.strip() for item in cell.split("|")]
    if len(cell) <= MAX_FIELD_CHARS:
        return items  # no item can be longer than its cell; skip per-item checks
    ok = True
    for i, item in enumerate(items, 1):
        ok = chk.string(item, column, f"item {i}") is not None and ok
    return items if ok else None


# ---------------------------------------------------------------------------------------
# Third-party JSON layouts. Their extra keys (generation_prompts, pred, cond, ...) are
# ignored: these files carry data for other evaluations.


def _mapping(chk: _Checker, value: Any, field_name: str) -> dict | None:
    if value is None:
        chk.problem(field_name, "missing")
        return None
    if not isinstance(value, dict):
        chk.problem(field_name, f"must be a mapping, got {_describe(value)}")
        return None
    return value


def _adapt_counterfact(record: Any, chk: _Checker) -> Fact | None:
    """CounterFact as published with ROME: {case_id, requested_rewrite: {...}, *_prompts}."""
    record = _mapping(chk, record, "record")
    if record is None:
        return None
    rewrite = _mapping(chk, record.get("requested_rewrite"), "requested_rewrite") or {}
    new = _mapping(chk, rewrite.get("target_new"), "requested_rewrite.target_new") if rewrite else None
    true = rewrite.get("target_true")
    true = _mapping(chk, true, "requested_rewrite.target_true") if true is not None else None
    labels = _Labels(
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
        _Probes(neighborhood, "neighborhood_prompts"),
        _Probes([target_true] * len(neighborhood), labels.target_true, numbered=False),
    )
    return _make_fact(
        chk,
        fid=chk.record_id(record.get("case_id"), "case_id", str(chk.row)),
        subject=chk.string(rewrite.get("subject"), labels.subject) if rewrite else None,
        prompt=chk.string(rewrite.get("prompt"), labels.prompt) if rewrite else None,
        target_new=chk.string(new.get("str"), labels.target_new) if new is not None else None,
        target_true=target_true,
        paraphrases=_Probes(paraphrases, "paraphrase_prompts"),
        neighbors=neighbors,
        labels=labels,
    )


def _adapt_counterfact_flat(record: Any, chk: _Checker) -> Fact | None:
    """CounterFact flattened as in EasyEdit: the prompt has the subject already filled in."""
    record = _mapping(chk, record, "record")
    if record is None:
        return None
    rephrase = chk.string(record.get("rephrase_prompt"), "rephrase_prompt", required=False)
    neighbors = _single_neighbor(chk, record, "locality_prompt", "locality_ground_truth")
    return _make_fact(
        chk,
        fid=chk.record_id(record.get("case_id"), "case_id", str(chk.row)),
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("prompt"), "prompt"),
        target_new=chk.string(record.get("target_new"), "target_new"),
        target_true=chk.string(record.get("ground_truth"), "ground_truth", required=False),
        paraphrases=_Probes([rephrase] if rephrase is not None else [], "rephrase_prompt", numbered=False),
        neighbors=neighbors,
        labels=_Labels(target_true="ground_truth"),
    )


def _adapt_zsre(record: Any, chk: _Checker) -> Fact | None:
    """zsRE in MEND's layout, read the way EasyEdit does: `alt` is the new answer."""
    record = _mapping(chk, record, "record")
    if record is None:
        return None
    answers = chk.string_list(record.get("answers"), "answers")
    rephrase = chk.string(record.get("rephrase"), "rephrase", required=False)
    return _make_fact(
        chk,
        fid=str(chk.row),
        subject=chk.string(record.get("subject"), "subject"),
        prompt=chk.string(record.get("src"), "src"),
        target_new=chk.string(record.get("alt"), "alt"),
        target_true=answers[0] if answers else None,
        paraphrases=_Probes([rephrase] if rephrase is not None else [], "rephrase", numbered=False),
        neighbors=_single_neighbor(chk, record, "loc", "loc_ans"),
        labels=_Labels(prompt="src", target_new="alt", target_true="answers"),
    )


def _single_neighbor(chk: _Checker, record: dict, prompt_field: str, answer_field: str) -> tuple[_Probes, _Probes]:
    """One (prompt, answer) probe stored as two sibling fields; both or neither must be given."""
    raw_prompt, raw_answer = record.get(prompt_field), record.get(answer_field)
    if raw_prompt is None and raw_answer is None:
        return (_NO_PROBES, _NO_PROBES)
    if raw_prompt is None or raw_answer is None:
        missing, other = (prompt_field, answer_field) if raw_prompt is None else (answer_field, prompt_field)
        chk.problem(missing, f"missing, but {other} is given; they form one probe")
        return (_NO_PROBES, _NO_PROBES)
    prompt = chk.string(raw_prompt, prompt_field)
    answer = chk.string(raw_answer, answer_field)
    if prompt is None or answer is None:
        return (_NO_PROBES, _NO_PROBES)
    return (_Probes([prompt], prompt_field, numbered=False), _Probes([answer], answer_field, numbered=False))
