"""The facts `romebatch trace --facts` reads: ROME's known-facts JSON or any manifest."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError, one_line
from .files import open_regular_file
from .manifest import Manifest, load_manifest, strict_json


def check_trace_fact(prompt: str, subject: str, answer: str | None) -> None:
    """One fact to trace, as `--prompt`, `--subject` and `--answer` give it: the subject must be
    text that occurs in the prompt (its tokens are the ones corrupted)."""
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if not subject.strip():
        raise UserError("--subject is empty: give the words of the prompt to corrupt")
    if subject not in prompt:
        raise UserError(f"--subject {one_line(repr(subject))} does not occur in --prompt")
    if answer is not None and not answer.strip():
        raise UserError("--answer is empty: leave it out to trace the model's own prediction")


def read_trace_facts(path, limit: int | None = None) -> list[tuple[str, str, str | None]]:
    """(prompt, subject, answer) from a known-facts JSON (`prompt`, `subject`, `attribute`) or any manifest."""
    if isinstance(path, Manifest):  # read already (standard input, or --format)
        return [(f.text, f.subject, f.target_true) for f in load_manifest(path, limit=limit).facts]
    path = Path(path)
    if path.suffix == ".json":
        try:
            with open_regular_file(str(path)) as handle:
                records = strict_json(handle.read())
        except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError and duplicate keys too
            raise UserError(f"{path}: cannot read it ({one_line(str(error)) or type(error).__name__})") from None
        if isinstance(records, list) and records and isinstance(records[0], dict) and "attribute" in records[0]:
            facts = []
            for number, record in enumerate(records[:limit] if limit else records, 1):
                if not isinstance(record, dict) or not all(
                    isinstance(record.get(k), str) for k in ("prompt", "subject", "attribute")
                ):
                    raise UserError(f"{path}:{number}: a known fact needs string prompt, subject and attribute")
                if not record["subject"].strip():
                    raise UserError(f"{path}:{number}: field 'subject': empty")
                if not record["attribute"].strip():
                    raise UserError(f"{path}:{number}: field 'attribute': empty")
                if record["subject"] not in record["prompt"]:
                    raise UserError(f"{path}:{number}: field 'subject': not found in the prompt")
                facts.append((record["prompt"], record["subject"], record["attribute"]))
            return facts
    manifest = load_manifest(path, limit=limit)
    return [(f.text, f.subject, f.target_true) for f in manifest.facts]
