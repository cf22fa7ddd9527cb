"""README's two commands, as a new user runs them: on a clone, in a fresh venv.

The first (install + the main job) runs here for real: a fresh clone of what is committed, the
command exactly as README shows it (it makes its own ``.venv`` and installs from the package
index), then its outcome is checked: the report, the results document, the charts, and
``connguard doctor`` from the same venv. The second command is ``.ci/run``, which CI itself
runs; here it is checked to run README's test command and to install what README says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Set

import pytest

from benchmarks.report import validate
from tests.netns import REPO_ROOT

README = Path(REPO_ROOT, "README.md").read_text()
CI_RUN = Path(REPO_ROOT, ".ci", "run").read_text()


def block_after(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` in README, without its fences."""
    match = re.search(rf"<!-- {marker} -->\n```sh\n(.+?)\n```", README, re.DOTALL)
    assert match is not None, f"README.md has no <!-- {marker} --> block"
    return match.group(1)


def fresh_clone(into: Path) -> Path:
    """What is committed (as CI checks out), or the tree itself outside a git checkout."""
    clone = into / "clone"
    if Path(REPO_ROOT, ".git").exists() and shutil.which("git"):
        # safe.directory: a checkout owned by another user (a CI workspace) clones as root.
        subprocess.run(["git", "-c", "safe.directory=*", "clone", "-q", str(REPO_ROOT),
                        str(clone)], check=True, timeout=120)
    else:
        shutil.copytree(REPO_ROOT, clone, ignore=shutil.ignore_patterns(
            ".venv", ".tox", "bench-results", "*.egg-info", "__pycache__"))
    return clone


def clean_env() -> dict:
    """The environment of a new shell: no venv of ours, no sandbox password handed down."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "CONNGUARD_SANDBOX_PASSWORD",
                        "CONNGUARD_SANDBOX_ROOT_PASSWORD", "PYTEST_CURRENT_TEST")}
    venv_bin = os.path.join(os.environ.get("VIRTUAL_ENV", "/nonexistent"), "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)
    env["DEBIAN_FRONTEND"] = "noninteractive"  # apt-get never waits for an answer
    return env


def run_command(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``bash -c command`` in its own process group, all of it killed if it overruns (the
    bench's MariaDB included, not just bash)."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(os.geteuid() != 0, reason="README's first command runs apt-get as root")
@pytest.mark.timeout(1800)
def test_the_first_command_installs_and_runs_the_bench(tmp_path: Path) -> None:
    command = block_after("main-command")
    assert "connguard bench --quick" in command
    clone = fresh_clone(tmp_path)
    run = run_command(command, clone, timeout=1700)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "report: bench-results/report.md" in run.stdout

    results = clone / "bench-results"
    doc = json.loads((results / "results.json").read_text())
    assert validate(doc) == [] and doc["quick"] is True
    # Every scenario ran, but the shared-gate one, which needs what the command does not
    # install (the redis extra, redis-server) and says so, once.
    status = {r["name"]: (r["status"], r["note"]) for r in doc["runs"]}
    shared, note = status.pop("coordination")
    assert shared == "ok" or (shared == "skipped" and note and "skipped" not in note
                              and ";" not in note), note
    assert all(s == "ok" for s, _ in status.values()), status
    assert "connguard Pool" in (results / "report.md").read_text()
    for chart in ("outage.png", "saturation.png", "census.png"):
        data = (results / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, chart
    # Installed from the clone (editable), into the venv the command made: `connguard bench`
    # ran the clone's benchmarks/, which the wheel does not hold.
    python = clone / ".venv" / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import connguard; print(connguard.__file__)"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=60, check=True)
    assert where.stdout.strip().startswith(str(clone / "connguard"))

    # "Then `connguard doctor` checks this host": it runs and reports, exit 0 or 1 (findings).
    doctor = subprocess.run([str(clone / ".venv" / "bin" / "connguard"), "doctor", "--json"],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert doctor.returncode in (0, 1), doctor.stderr  # 1: it found problems
    assert "host.ephemeral_port_range" in {c["id"] for c in json.loads(doctor.stdout)["checks"]}


def apt_packages_of_ci() -> Set[str]:
    return set(re.findall(r"need_apt\+=\(([\w-]+)\)", CI_RUN))


def test_the_second_command_is_what_ci_runs() -> None:
    assert "```sh\nbash .ci/run\n```" in README
    # README's test block: its install line (the [test] extra only), then the test command.
    assert block_after("test-command").splitlines() == ["pip install -e '.[test]'",
                                                         "python -m pytest"]
    # .ci/run reads that block from README and runs it in its fresh venv, before it installs
    # any other extra, with CONNGUARD_REQUIRE_DRIVERS unset: what a user runs.
    readme_run = CI_RUN.index('(unset CONNGUARD_REQUIRE_DRIVERS; eval "$readme_block")')
    assert "<!-- test-command -->" in CI_RUN[:readme_run]
    assert CI_RUN.index('python3 -m venv "$venv"') < readme_run
    assert readme_run < CI_RUN.index("pip install -q -e '.[dev,") \
        < CI_RUN.index("export CONNGUARD_REQUIRE_DRIVERS=1")
    assert "pip install" not in CI_RUN[CI_RUN.index('python3 -m venv "$venv"'):readme_run] \
        .replace("pip install -q -U pip", "")
    # Every Debian package README says it installs is one .ci/run installs, and back.
    sentence = re.search(r"installs every test prerequisite that is missing \(Debian packages"
                         r"(.+?)\)", README, re.DOTALL)
    assert sentence is not None
    named = set(re.findall(r"`([\w-]+)`", sentence.group(1)))
    assert named == apt_packages_of_ci()


def test_ci_extracts_exactly_the_readme_block(tmp_path: Path) -> None:
    """.ci/run's own extraction command, run on README, gives the block README shows."""
    line = next(x for x in CI_RUN.splitlines() if x.startswith("readme_block=$("))
    extraction = line[len("readme_block=$("):-1]
    got = subprocess.run(["bash", "-c", extraction], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert got.rstrip("\n") == block_after("test-command")


def test_readme_is_written_for_users() -> None:
    """No word of how the project is developed: README is for people who use connguard."""
    for word in ("session 6", "target ≤", ": met", "## Status"):
        assert word not in README, word
