"""YAML manifests (`.yaml` / `.yml`): a list of fact mappings, or a mapping whose `facts:` key holds one.

Also `manifest_yaml`, which reads any YAML file (hyper-parameters) the same strict way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from romebatch.errors import UserError, located

from .reading import DuplicateKey, FileProblem, Input, fact_list, numbered, value_problem


def yaml_records(src: Input) -> Iterator[tuple[int, Any]]:
    path = src.name
    return numbered(fact_list(path, _parse(src.read_text(), path), "YAML manifest"))


def manifest_yaml(path: str) -> Any:
    """A YAML file read the way manifests are (regular file, size cap, duplicate keys refused).

    Raises UserError naming the file (and line) for every problem.
    """
    try:
        return _parse(Input(path).read_text(), path)
    except FileProblem as e:
        raise UserError(e.line) from None


def _parse(text: str, path: str) -> Any:
    """The document, or FileProblem with one located line for whatever stops the parse."""
    try:
        return _safe_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileProblem(located(path, line, None, f"invalid YAML: {what}")) from None
    except RecursionError:
        raise FileProblem(located(path, None, None, "invalid YAML: nested too deeply")) from None
    except DuplicateKey as e:
        raise FileProblem(located(path, e.line, str(e.key), "appears twice in one mapping")) from None
    except ValueError as e:  # an integer of thousands of digits, say
        raise FileProblem(located(path, None, None, f"invalid YAML: {value_problem(e)}")) from None


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
                raise DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)
