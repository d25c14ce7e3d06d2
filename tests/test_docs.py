"""Generated docs must match what docs/generate.py writes now (run it after changing the CLI or schema)."""

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
spec = importlib.util.spec_from_file_location("generate_docs", DOCS / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.mark.parametrize("name", sorted(generate.FILES))
def test_generated_doc_is_current(name):
    assert (DOCS / name).read_text() == generate.FILES[name](), f"docs/{name} is stale: run python docs/generate.py"


def test_readme_documents_every_results_column():
    from romebatch.report import RESULTS_SCHEMA

    readme = (DOCS.parent / "README.md").read_text()
    for name, (dtype, description) in RESULTS_SCHEMA.items():
        assert f"| `{name}` | {dtype} | {description.replace('|', chr(92) + '|')} |" in readme, name


def test_readme_documents_every_exit_code():
    from romebatch.errors import EXIT_CODES

    readme = (DOCS.parent / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme, code


def test_architecture_doc_names_every_module_and_nothing_else():
    """docs/architecture.md's module table is the package's module list (top-level modules and
    packages; a package's own modules are its business)."""
    import re

    root = Path(__file__).resolve().parents[1]
    package = root / "romebatch"
    actual = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    text = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("## Modules") :]
    named = set(re.findall(r"^\| `([\w]+)` \|", table, flags=re.M))
    assert named == actual, {"not in the doc": sorted(actual - named), "not a module": sorted(named - actual)}
    # Every module the prose names exists too.
    for name in re.findall(r"`(\w+)\.py`", text):
        assert name in actual, name
