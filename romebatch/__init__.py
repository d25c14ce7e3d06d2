"""romebatch: apply thousands of ROME edits to a language model, journaled and reversible.

    import romebatch
    result = romebatch.apply("examples/facts.csv", journal="romebatch.journal")
    report = romebatch.verify("romebatch.journal")     # specificity against the base model
    romebatch.check("romebatch.journal")                # replay every edit, compare every hash

    with romebatch.Editor("romebatch.journal") as editor:
        editor.rollback(steps=1)
        editor.export("edited-model")

Names are imported lazily so that `romebatch --help` never loads torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "Editor": "romebatch.editor",
    "ApplyResult": "romebatch.editor",
    "FactResult": "romebatch.editor",
    "apply": "romebatch.api",
    "rollback": "romebatch.api",
    "export": "romebatch.api",
    "log": "romebatch.api_read",
    "tune": "romebatch.tuning",
    "compare": "romebatch.api_read",
    "verify": "romebatch.api_read",
    "check": "romebatch.api_read",
    "trace": "romebatch.api_read",
    "bundle": "romebatch.api",
    "apply_bundle": "romebatch.api",
    "export_adapter": "romebatch.api",
    "curves": "romebatch.api_read",
    "edit": "romebatch.api",
    "Journal": "romebatch.journal",
    "HParams": "romebatch.hparams",
    "load_hparams": "romebatch.hparams",
    "Fact": "romebatch.manifest",
    "load_manifest": "romebatch.manifest",
    "load_model": "romebatch.model",
    "UserError": "romebatch.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'romebatch' has no attribute {name!r}")
