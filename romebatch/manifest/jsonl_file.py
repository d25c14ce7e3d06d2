"""JSONL manifests (`.jsonl`): one fact object per line, in the layout of `records`.

A line that is not JSON is a problem of that line only; the others are still checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .reading import DuplicateKey, FileProblem, Input, Unparsed, strict_json, value_problem
from .validation import describe


def jsonl_records(src: Input) -> Iterator[tuple[int, Any]]:
    f = src.open()
    with f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, strict_json(line)
                except json.JSONDecodeError as e:
                    yield line_no, Unparsed(f"invalid JSON: {e.msg} (column {e.colno})")
                except RecursionError:  # a nesting bomb: refuse it like any other bad line
                    yield line_no, Unparsed("invalid JSON: nested too deeply")
                except DuplicateKey as e:
                    yield line_no, Unparsed(f"invalid JSON: key {describe(e.key)} appears twice in one object")
                except ValueError as e:
                    yield line_no, Unparsed(f"invalid JSON: {value_problem(e)}")
        except UnicodeDecodeError:
            raise FileProblem(src.bad_utf8()) from None
