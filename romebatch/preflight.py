"""Checks of a manifest that need the tokenizer: done before the journal is touched.

`load_manifest` validates what a file says; this validates what the model will see: a
target that tokenises to nothing cannot be learned, and a prompt (with the longest context
prefix) longer than the model's context cannot be run.
"""

from __future__ import annotations

from .errors import ManifestError, located
from .lm import answer_ids, encode
from .manifest import Fact
from .model import LoadedModel

PREFIX_ALLOWANCE = 16  # tokens reserved for the longest sampled context prefix and its ". "


def context_length(lm: LoadedModel) -> int | None:
    config = getattr(lm.config, "text_config", lm.config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_facts_for_model(lm: LoadedModel, facts: list[Fact], max_new_prefix_tokens: int = 10) -> None:
    """Raise ManifestError (one line per problem, file:row: field) if a fact cannot be edited."""
    limit = context_length(lm)
    problems = []
    for fact in facts:
        where, _, row = fact.source.rpartition(":")
        row_number = int(row) if row.isdigit() else None
        where = where or fact.source or "manifest"
        text = fact.text
        prompt_tokens = len(encode(lm.tokenizer, text).ids)
        target = answer_ids(lm.tokenizer, text, fact.target_new)
        if not target:
            problems.append(located(where, row_number, "target_new", f"{fact.target_new!r} tokenises to nothing"))
        needed = prompt_tokens + len(target) + max_new_prefix_tokens + PREFIX_ALLOWANCE
        if limit is not None and needed > limit:
            problems.append(
                located(
                    where,
                    row_number,
                    "prompt",
                    f"{prompt_tokens} tokens (with target and context prefix {needed}) exceed "
                    f"the model's context of {limit}",
                )
            )
    if problems:
        raise ManifestError(problems)
