"""tests/optional.py: a module that cannot be imported for any reason skips; with
CONNGUARD_REQUIRE_DRIVERS=1 a driver that cannot be imported fails."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests import optional as opt

BROKEN = {
    # What SQLAlchemy's asyncio does without greenlet: an ImportError, not ModuleNotFoundError.
    "half_installed": "raise ImportError('the greenlet library is required')",
    "fails_at_import": "raise RuntimeError('no backend configured')",
}


@pytest.fixture
def broken_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name, body in BROKEN.items():
        (tmp_path / f"{name}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CONNGUARD_REQUIRE_DRIVERS", raising=False)
    yield tmp_path
    for name in BROKEN:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name, cause", [
    ("half_installed", "ImportError: the greenlet library is required"),
    ("fails_at_import", "RuntimeError: no backend configured"),
    ("not_installed_anywhere", "ModuleNotFoundError: No module named 'not_installed_anywhere'"),
])
def test_a_module_that_cannot_be_imported_skips_with_the_cause(
        broken_modules: Path, name: str, cause: str) -> None:
    with pytest.raises(pytest.skip.Exception) as info:
        opt.optional(name, "pip install it")
    assert str(info.value) == f"optional module {name} cannot be imported ({cause}); pip install it"


def test_an_importable_module_is_returned(broken_modules: Path) -> None:
    assert opt.optional("json") is sys.modules["json"]


def test_a_required_driver_fails_instead_of_skipping(
        broken_modules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opt, "DRIVERS", frozenset({"half_installed"}))
    monkeypatch.setenv("CONNGUARD_REQUIRE_DRIVERS", "1")
    with pytest.raises(ImportError, match="greenlet library is required"):
        opt.optional("half_installed")
    # Not a driver: still a skip, whatever the variable says.
    with pytest.raises(pytest.skip.Exception):
        opt.optional("fails_at_import")
