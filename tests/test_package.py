"""The package itself: what `import connguard` needs, what it says when an extra is missing,
and what its wheel holds (the library only: benchmarks/ and testsupport/ stay in the checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Set

import pytest

from tests.netns import REPO_ROOT

#: In the repository, never in the wheel nor imported by the library.
CHECKOUT_ONLY = ("benchmarks", "testsupport")


def test_stats_without_sqlalchemy_names_the_extra() -> None:
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"  # as if it were not installed
            "import connguard\n"
            "try:\n"
            "    connguard.stats(object())\n"  # an engine, as far as it can tell
            "except ModuleNotFoundError as exc:\n"
            "    print(exc.name, '|', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True).stdout
    assert out.startswith("sqlalchemy |") and "pip install 'connguard[sqlalchemy]'" in out


def test_the_library_never_imports_the_testing_sandbox() -> None:
    loaded = _modules_after("import connguard, connguard.sqlalchemy_plugin, "
                            "connguard.sqlalchemy_pool, connguard.doctor, connguard.cli, "
                            "connguard.coordination")
    assert "connguard.sqlalchemy_pool" in loaded
    assert _loaded(loaded, CHECKOUT_ONLY) == []


def test_the_sandbox_password_is_made_per_run() -> None:
    code = "from testsupport.servers import APP_PASSWORD; print(APP_PASSWORD)"
    env = {k: v for k, v in __import__("os").environ.items()
           if k != "CONNGUARD_SANDBOX_PASSWORD"}
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=60, check=True, env=env).stdout.strip()
            for _ in range(2)}
    assert len(runs) == 2 and all(len(p) >= 16 for p in runs)


def test_every_option_is_in_the_reference() -> None:
    from connguard.arguments import POOL_OPTIONS
    from connguard.sqlalchemy_plugin import OPTION_NAMES

    with open(os.path.join(REPO_ROOT, "docs", "reference.md")) as f:
        reference = f.read()
    missing = sorted(o for o in (*POOL_OPTIONS, *OPTION_NAMES) if f"`{o}`" not in reference)
    assert not missing, f"options not in docs/reference.md: {missing}"


def test_help_of_pool_names_every_option() -> None:
    import connguard
    from connguard.arguments import POOL_OPTIONS

    assert all(name in connguard.Pool.__doc__ for name in POOL_OPTIONS)


def _modules_after(code: str) -> set:
    """The modules loaded by ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(*sys.modules)"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                         check=True).stdout
    return set(out.split())


#: What most processes never use: loaded only by the code that needs it.
_OPTIONAL = ("redis", "opentelemetry", "prometheus_client", "tenacity", "sqlalchemy",
             "connguard.redis_coordination", "connguard.otel", "connguard.prometheus",
             "benchmarks", "connguard.cli", "connguard.doctor")


def _loaded(modules: set, names: tuple) -> list:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_import_connguard_loads_only_the_exceptions() -> None:
    loaded = _modules_after("import connguard")
    assert _loaded(loaded, (*_OPTIONAL, "asyncio", "wrapt", "connguard.coordination",
                            "connguard.pool", "connguard.storm", "connguard.dropin")) == []


def test_a_pool_loads_no_optional_module() -> None:
    # A pool is made and its drop-in reached. tenacity (the backoff) comes with the pool: a
    # failure path imports nothing, since at the fd limit (errno 24) an import has no fd.
    loaded = _modules_after("import connguard\nconnguard.Pool(host='127.0.0.1', port=1)\n"
                            "connguard.connect, connguard.install, connguard.stats")
    assert _loaded(loaded, tuple(n for n in _OPTIONAL if n != "tenacity")) == []
    assert "tenacity" in loaded


def _imported(code: str) -> Set[str]:
    """The modules ``code`` loads in a fresh ``python -X importtime``: those its report names
    and those in ``sys.modules`` at the end (``importlib.import_module`` is not reported)."""
    probe = f"{code}\nimport sys\nprint('@@modules', *sys.modules, file=sys.stderr)"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    reported = {line.rsplit("|", 1)[1].strip() for line in lines
                if line.startswith("import time:") and "|" in line}
    at_exit = next(line for line in lines if line.startswith("@@modules")).split()[1:]
    return reported | set(at_exit)


_CLI = "from connguard.cli import main\nassert main({argv!r}) == 0"


@pytest.mark.parametrize("code, needed", [
    ("import connguard", "connguard.exceptions"),
    (_CLI.format(argv=["doctor", "--help"]), "connguard.doctor"),
    (_CLI.format(argv=["explain"]), "connguard.explain"),
])
def test_the_cli_loads_the_bench_only_to_run_it(code: str, needed: str) -> None:
    modules = _imported(code)
    assert needed in modules  # what was run was imported, and seen
    assert _loaded(modules, CHECKOUT_ONLY) == []


def test_the_bench_command_loads_the_runner_from_the_checkout() -> None:
    modules = _imported(_CLI.format(argv=["bench", "--help"]))
    assert "benchmarks.runner" in modules and "testsupport.servers" not in modules


# --- the wheel ---------------------------------------------------------------------------------

#: Never copied into the tree the wheel is built from: a stale build/ would leak into it.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tox", "build", "dist", "*.egg-info",
                                     "__pycache__", ".*_cache", "bench-results", "site")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: Any) -> Path:
    """The wheel pip builds from a copy of this tree (as it is, committed or not)."""
    where = tmp_path_factory.mktemp("wheel")
    source = where / "source"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(where / "dist"), str(source)], check=True, capture_output=True,
                   timeout=300, cwd=where)
    (built,) = (where / "dist").glob("connguard-*.whl")
    return built


def _names(wheel: Path) -> Set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_the_library_only(wheel: Path) -> None:
    import connguard

    names = _names(wheel)
    dist_info = f"connguard-{connguard.__version__}.dist-info"
    assert {name.split("/")[0] for name in names} == {"connguard", dist_info}
    assert {"connguard/__init__.py", "connguard/cli.py", "connguard/py.typed"} <= names
    pages = sorted(Path(REPO_ROOT, "docs", "errors").glob("*.md"))
    assert pages and {f"connguard/errors_docs/{page.name}" for page in pages} <= names
    strays = [n for n in names if "bench" in n or "testing" in n or "testsupport" in n]
    assert strays == []
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(f"{dist_info}/top_level.txt").decode().split() == ["connguard"]


def test_bench_from_the_wheel_says_it_runs_from_a_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, connguard\nfrom connguard.cli import main\n"
            "print(connguard.__file__)\nsys.exit(main(['bench', '--quick']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.stdout.startswith(str(site))  # the wheel's connguard, not the checkout's
    assert done.returncode == 2, done.stderr
    assert "connguard bench: the benchmarks are not part of the installed package" in done.stderr
    assert "checkout of the connguard repository" in done.stderr
    assert "Traceback" not in done.stderr


def test_lazy_names_are_the_public_api() -> None:
    code = ("import connguard\n"
            "missing = [n for n in connguard.__all__ if n not in dir(connguard)]\n"
            "from connguard import *\n"
            "print(missing, Pool.__module__, connect.__module__, translate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True).stdout.split()
    assert out == ["[]", "connguard.pool", "connguard.dropin", "connguard.errors"]
