"""What every edit of a journal reads and that is computed once: the context prefixes, the key
statistics C of each edited layer, the base model's fluency on its own text, and the
sequential-stability method's running state.

Statistics and the fluency reference are of the base model, so they are computed inside
`Editor.at(0)`; the prefixes are journaled (a resumed run samples nothing new).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .guards import own_text_nll
from .rome import KeyStats, load_or_compute_stats, sample_prefixes
from .rome.preserve import Preserver

if TYPE_CHECKING:
    from .editor import Editor


class Ingredients:
    def __init__(self, editor: Editor):
        self.editor = editor
        self._stats: dict[int, KeyStats] = {}
        # layer -> (the head its state is for, the method's running state): rebuilt from the
        # path's keys whenever the head has moved (rollback, replay to another state).
        self.preservers: dict[int, tuple[int, Preserver]] = {}
        self._fluency_reference: float | None = None
        self._prefixes: list[str] | None = editor.journal.get("prefixes")

    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            editor, hp = self.editor, self.editor.hparams
            editor.log(f"Sampling {sum(c for _, c in hp.prefixes)} context prefixes from the model (seed {hp.seed})...")
            self._prefixes = sample_prefixes(editor.lm, hp.prefixes, hp.prefix_top_k, hp.seed)
            editor.journal.set_many({"prefixes": self._prefixes})
        return self._prefixes

    def stats(self, layer: int, progress=None) -> KeyStats | None:
        editor, hp = self.editor, self.editor.hparams
        if hp.mom2 == "identity":
            return None
        if layer not in self._stats:
            with editor.at(0):  # statistics are of the base model
                stats = load_or_compute_stats(
                    editor.lm,
                    [layer],
                    editor.base_hash,
                    **hp.stats_options(),
                    log=editor.log,
                    progress=progress or editor.stats_progress,
                )
            self._stats[layer] = stats[layer].factor(hp.ridge)
        return self._stats[layer]

    def fluency_reference(self) -> float:
        """The base model's NLL of its own sampled text, which the collapse guard compares against."""
        if self._fluency_reference is None:
            with self.editor.at(0):
                self._fluency_reference = own_text_nll(self.editor.lm, self.prefixes())
        return self._fluency_reference

    def preserver(self, layer: int) -> Preserver | None:
        """The sequential-stability method's state for `layer` at the current head."""
        editor, hp = self.editor, self.editor.hparams
        if hp.preserve == "none" and not hp.preserve_top_k and not hp.norm_penalty:
            return None
        cached = self.preservers.get(layer)
        if cached is None or cached[0] != editor.head:
            stats = self.stats(layer)
            shape = editor.lm.weight(layer).shape  # (d_model, d_ff), or (d_ff, d_model) for Conv1D
            d_ff = shape[0] if editor.lm.adapter.conv1d else shape[1]
            preserver = (
                cached[1]
                if cached
                else Preserver(
                    hp.preserve,
                    stats.cholesky if stats else None,
                    d_ff,
                    hp.preserve_weight,
                    hp.preserve_top_k,
                    hp.norm_penalty,
                )
            )
            keys = []
            for record in editor.journal.lineage():
                if record.layer != layer:
                    continue
                if record.k_star is None:
                    raise UserError(
                        f"journal {editor.journal.directory}: edit {record.seq} has no stored key, which "
                        f"these settings need (preserve {hp.preserve}, preserve_top_k {hp.preserve_top_k}, "
                        f"norm_penalty {hp.norm_penalty:g})",
                        hint="start a new journal with --journal",
                    )
                keys.append(torch.from_numpy(record.k_star.copy()))
            preserver.rebuild(keys)
            self.preservers[layer] = (editor.head, preserver)
        return self.preservers[layer][1]
