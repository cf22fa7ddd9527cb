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
