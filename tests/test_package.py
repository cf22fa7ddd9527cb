"""The package itself: what `import connguard` needs, and what it says when an extra is missing."""

from __future__ import annotations

import subprocess
import sys

from tests.netns import REPO_ROOT


def test_stats_without_sqlalchemy_names_the_extra() -> None:
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"  # as if it were not installed
            "import connguard\n"
            "try:\n"
            "    connguard.stats\n"
            "except ModuleNotFoundError as exc:\n"
            "    print(exc.name, '|', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True).stdout
    assert out.startswith("sqlalchemy |") and "pip install 'connguard[sqlalchemy]'" in out
