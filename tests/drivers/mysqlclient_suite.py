#!/usr/bin/env python
"""Run mysqlclient's own test suite plainly and with ``connguard.install("MySQLdb")``; compare.

    python tests/drivers/mysqlclient_suite.py [--src DIR] [--only plain|connguard]
                                              [-k EXPR] [--timeout SECONDS] [--workdir DIR]

The suite comes from the sdist of the installed mysqlclient version (its tests match the
driver that runs): ``--src`` names an unpacked sdist or a checkout, otherwise it is
downloaded once into ``~/.cache/connguard/mysqlclient``.

Each run gets a fresh throwaway MariaDB (``testsupport.servers``) provisioned the way
mysqlclient's CI provisions its MariaDB container (root with password ``root`` over TCP,
database ``mysqldb_test``), and an option file like the checkout's ``tests/actions.cnf``
pointing there. The suite reads it through ``$TESTDB`` (``tests/configdb.py`` joins it to its
own directory, so an absolute path works): nothing in the checkout is written.

The checkout keeps its package in ``src/MySQLdb``, which is never put on ``sys.path`` (pytest
adds only ``tests/``; cwd is the work directory), so the suite imports the *installed*
mysqlclient, the one connguard patches. pytest runs in a subprocess with a per-test timeout,
so a hang fails one test, not the run.

Exit status: 0 when every test that passes plainly also passes with connguard (tests listed
in ``mysqlclient_allowed.txt`` excepted) and its run's wall time is within
``outcomes.MAX_COST_RATIO`` (1.15x) of the plain run's; 1 otherwise; 2 when a run produced no
report or the connguard run opened no pooled connection. With ``--only``, 0 when that run
has no failures or errors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Run as a script, this file's directory is on sys.path, not the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.drivers.connguard_install import DRIVER_ENV  # noqa: E402
from tests.drivers.outcomes import (  # noqa: E402
    RUNS,
    RunResult,
    call_pytest,
    fresh_server,
    parse_junit,
    report_runs,
    run_each,
)
from tests.drivers.pymysql_suite import (  # noqa: E402
    compare,
    pooled_connections,
    print_non_passing,
)
from tests.drivers.sqlalchemy_suite import fetch_sdist  # noqa: E402
from testsupport.servers import MariaDB, Template  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = Path(__file__).with_name("mysqlclient_allowed.txt")
ROOT_PASSWORD = "root"  # as mysqlclient's CI starts MariaDB (MARIADB_ROOT_PASSWORD=root)
DATABASE = "mysqldb_test"  # tests/actions.cnf, the option file its CI uses
SERVER_OPTIONS: Dict[str, object] = {}  # the suite needs nothing beyond the defaults


# -- server ----------------------------------------------------------------------------------
def provision(server: MariaDB) -> None:
    """What mysqlclient's CI does to its container (.github/workflows/tests.yaml), adapted."""
    with server.admin() as cur:
        cur.execute(f"CREATE DATABASE {DATABASE}")
        # The template's root is socket-only (root@localhost); actions.cnf connects over TCP,
        # and skip_name_resolve makes that match 127.0.0.1.
        cur.execute("CREATE USER 'root'@'127.0.0.1' IDENTIFIED BY %s", (ROOT_PASSWORD,))
        cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")


def option_file(server: MariaDB) -> str:
    """The checkout's ``tests/actions.cnf``, pointed at ``server``."""
    return (f"[MySQLdb-tests]\nhost = 127.0.0.1\nport = {server.port}\nuser = root\n"
            f"database = {DATABASE}\npassword = {ROOT_PASSWORD}\n"
            "default-character-set = utf8mb4\n")


# -- pytest ----------------------------------------------------------------------------------
def pytest_command(args: argparse.Namespace, run: str, junit: Path) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", str(args.src / "tests"), f"--rootdir={args.src}",
           "-p", "no:cacheprovider", f"--junitxml={junit}", f"--timeout={args.timeout}",
           "-rfE"]
    if run == "connguard":
        cmd += ["-p", "tests.drivers.connguard_install"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return cmd


def pytest_env(run: str, cnf: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # The plugin is imported as tests.drivers.*; the checkout has nothing importable at its
    # root (its package is under src/), so nothing there can shadow the installed MySQLdb.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TESTDB"] = str(cnf)
    if run == "connguard":
        env[DRIVER_ENV] = "MySQLdb"  # what tests/drivers/connguard_install.py installs
    return env


def run_suite(args: argparse.Namespace, template: Template, run: str) -> RunResult:
    junit, log, cnf = (args.workdir / f"{run}.{ext}" for ext in ("xml", "log", "cnf"))
    junit.unlink(missing_ok=True)
    with fresh_server(template, SERVER_OPTIONS, provision) as server:
        cnf.write_text(option_file(server))
        began = time.monotonic()
        # cwd is the work directory: `python -m pytest` puts cwd on sys.path.
        returncode = call_pytest(pytest_command(args, run, junit), args.workdir,
                                 pytest_env(run, cnf), log, args.session_timeout)
        seconds = time.monotonic() - began
    outcomes = parse_junit(junit) if junit.exists() else {}
    return RunResult(run, seconds, returncode, outcomes, log)


# -- reports ---------------------------------------------------------------------------------
def report(results: Dict[str, RunResult], only: Optional[str]) -> int:
    return report_runs(results, only, 'mysqlclient suite: plain vs connguard.install("MySQLdb")',
                       ALLOWLIST, compare, pooled_connections, print_non_passing)


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path,
                        help="mysqlclient sdist or checkout (has tests/configdb.py); default: "
                             "the sdist of the installed version, downloaded once")
    parser.add_argument("--only", choices=RUNS, help="run one configuration, compare nothing")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for both runs")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--session-timeout", type=float, default=1800.0,
                        help="kill a whole pytest run after this many seconds")
    parser.add_argument("--workdir", type=Path,
                        help="where reports, logs and option files go (default: a new temp "
                             "directory)")
    args = parser.parse_args(argv)
    if args.src is None:
        args.src = fetch_sdist(importlib.metadata.version("mysqlclient"), "mysqlclient",
                               "tests/configdb.py")
    args.src = args.src.resolve()
    if not (args.src / "tests" / "configdb.py").exists():
        parser.error(f"{args.src} is not a mysqlclient checkout (no tests/configdb.py)")
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mysqlclient-suite-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return report(run_each(args, "mysqlclient's suite", run_suite), args.only)


if __name__ == "__main__":
    sys.exit(main())
