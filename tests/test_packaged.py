"""`--model package:NAME` finds the GGUF inside an installed package without importing it."""

from __future__ import annotations

import sys

import pytest

from romebatch.errors import UserError
from romebatch.packaged import packaged_gguf


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    root = tmp_path / "site"
    package = root / "fake_model_pkg"
    package.mkdir(parents=True)
    # Importing it would fail: the lookup must not import it.
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(root))
    return package


def test_finds_the_one_gguf_without_importing(fake_package):
    assert packaged_gguf("fake_model_pkg") == fake_package / "Tiny.Q4_1.gguf"
    assert "fake_model_pkg" not in sys.modules


def test_missing_or_ambiguous_packages_are_user_errors(fake_package):
    with pytest.raises(UserError, match="no installed package 'no_such_pkg_xyz'"):
        packaged_gguf("no_such_pkg_xyz")
    with pytest.raises(UserError, match="top-level package name"):
        packaged_gguf("os.path")
    (fake_package / "Other.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="holds 2 .gguf files"):
        packaged_gguf("fake_model_pkg")
