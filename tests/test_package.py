"""The package itself: what `import connguard` needs, and what it says when an extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.netns import REPO_ROOT


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
    code = ("import sys, connguard, connguard.sqlalchemy_plugin, connguard.sqlalchemy_pool, "
            "connguard.doctor, connguard.cli, connguard.coordination\n"
            "print('connguard.testing' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True).stdout
    assert out.strip() == "False"


def test_the_sandbox_password_is_made_per_run() -> None:
    code = "from connguard.testing import APP_PASSWORD; print(APP_PASSWORD)"
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
             "connguard.bench", "connguard.cli", "connguard.doctor")


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


def test_the_cli_loads_the_bench_only_to_run_it() -> None:
    assert _loaded(_modules_after("import connguard.cli"), ("connguard.bench",)) == []


def test_lazy_names_are_the_public_api() -> None:
    code = ("import connguard\n"
            "missing = [n for n in connguard.__all__ if n not in dir(connguard)]\n"
            "from connguard import *\n"
            "print(missing, Pool.__module__, connect.__module__, translate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True).stdout.split()
    assert out == ["[]", "connguard.pool", "connguard.dropin", "connguard.errors"]
