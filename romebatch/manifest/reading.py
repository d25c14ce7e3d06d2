"""Reading a manifest's text, from a file or from standard input, and the parsers' strict modes.

Everything here is about the input as text: where it comes from (`Input`), what is wrong
with it as a whole (`FileProblem`: unreadable, not UTF-8), and JSON that refuses a key given
twice. The layouts' readers (csv_file, yaml_file, json_file, jsonl_file) build on it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from romebatch.errors import ManifestError, UserError, located
from romebatch.files import STDIN, open_regular_file, read_stdin

from .validation import Checker, Fact


class FileProblem(Exception):
    """The file as a whole cannot be read; reported alone, since row checks would be noise."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


class Source(NamedTuple):
    """A manifest opened in one layout: its records, numbered, and the adapter that makes each a Fact."""

    format: str
    unit: str  # what a row number counts, for "first used on line 3" messages
    records: Iterable[tuple[int, Any]]
    adapt: Callable[[Any, Checker], Fact | None]


class Unparsed(NamedTuple):
    """A record whose text could not be parsed (one bad JSONL line); other lines still count."""

    what: str


class Input:
    """A manifest's bytes: a regular file (opened with files.open_regular_file), or standard
    input, read once into memory (`data`) so that telling its layout needs no second read.

    `name` is what messages call it: the path, or "<stdin>".
    """

    def __init__(self, name: str, data: bytes | None = None):
        self.name = name
        self.data = data

    @classmethod
    def stdin(cls) -> Input:
        try:
            return cls(STDIN, read_stdin())
        except UserError as e:
            raise FileProblem(e.message) from None

    def open(self, newline: str | None = None):
        """A text stream decoded the same way for both: utf-8-sig, a bad byte raising as it is met."""
        if self.data is not None:
            return io.TextIOWrapper(io.BytesIO(self.data), encoding="utf-8-sig", newline=newline)
        try:
            return open_regular_file(self.name, newline=newline)
        except UserError as e:
            raise FileProblem(e.message) from None

    def read_text(self) -> str:
        try:
            # utf-8-sig: editors on Windows prepend a BOM that would otherwise become part of
            # the first key or column name.
            with self.open() as f:
                return f.read()
        except UnicodeDecodeError:
            raise FileProblem(self.bad_utf8()) from None
        except OSError as e:
            raise FileProblem(located(self.name, None, None, f"cannot read file: {e.strerror or e}")) from None

    def bad_utf8(self) -> str:
        """Find the first line that is not UTF-8, so the user knows where to look."""
        try:
            with io.BytesIO(self.data) if self.data is not None else open_regular_file(self.name, encoding=None) as f:
                for line_no, line in enumerate(f, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        byte = f"byte 0x{line[e.start]:02x} at column {e.start + 1}"
                        return located(self.name, line_no, None, f"not valid UTF-8 ({byte}); save the file as UTF-8")
        except (OSError, UserError):
            pass
        return located(self.name, None, None, "not valid UTF-8; save the file as UTF-8")


def numbered(records: list) -> Iterator[tuple[int, Any]]:
    return ((i, r) for i, r in enumerate(records, 1))


def fact_list(path: str, doc: Any, kind: str) -> list:
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
        raise FileProblem(located(path, None, None, f"{kind} must be a list of facts, got {type(doc).__name__}"))
    return doc


class DuplicateKey(ValueError):
    def __init__(self, key: Any, line: int | None = None):
        super().__init__(key)
        self.key = key
        self.line = line


def strict_json(text: str) -> Any:
    """json.loads, refusing an object that gives one key twice (JSON would keep the last)."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def value_problem(error: ValueError) -> str:
    text = str(error)
    if "digits" in text:  # Python's int-size limit (sys.get_int_max_str_digits)
        return "a number with thousands of digits"
    return text.splitlines()[0] if text else "a value that cannot be read"
