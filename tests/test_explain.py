"""The error pages ship in the wheel, and ``connguard explain`` prints them from there."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pymysql
import pytest

from connguard import cli, errors, explain

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "errors"


def test_the_packaged_pages_are_the_docs_pages() -> None:
    # One source of truth: connguard/errors_docs is a link to docs/errors, not a copy.
    assert explain.PAGES.resolve() == PAGES.resolve()
    assert explain.names() == sorted(p.stem for p in PAGES.glob("*.md") if p.stem != "index")


def test_every_error_class_has_a_page_and_explains_itself() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.ConnGuardError):
            assert cls.docs == "index" or cls.docs in explain.names(), cls
    err = errors.translate(pymysql.err.OperationalError(1049, "Unknown database 'x'"))
    assert err.docs == "unknown-database" and err.explain().startswith("# UnknownDatabase")


def test_explain_lists_prints_and_refuses_with_the_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain"]) == cli.EXIT_OK
    listing = capsys.readouterr().out
    assert all(f"  {name}\n" in listing for name in explain.names())
    assert cli.main(["explain", "access-denied"]) == cli.EXIT_OK
    assert capsys.readouterr().out == (PAGES / "access-denied.md").read_text()
    assert cli.main(["explain", "acess-denied"]) == cli.EXIT_USAGE
    said = capsys.readouterr().err
    assert "no error page named 'acess-denied'; did you mean 'access-denied'?" in said


def test_the_wheel_carries_the_pages_and_explain_reads_them_offline(tmp_path: Path) -> None:
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    (wheel,) = out.glob("connguard-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        for page in PAGES.glob("*.md"):
            assert archive.read(f"connguard/errors_docs/{page.name}") == page.read_bytes()
        archive.extractall(unpacked)
    # The installed wheel alone (no checkout on the path): the pages come from the package.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    done = subprocess.run([sys.executable, "-m", "connguard.cli", "explain", "access-denied"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (PAGES / "access-denied.md").read_text()
    where = subprocess.run([sys.executable, "-c", "import connguard; print(connguard.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.stdout.startswith(str(unpacked))
