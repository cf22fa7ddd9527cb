#!/usr/bin/env python
"""Run PyMySQL's own test suite plainly and with ``connguard.install()``; compare outcomes.

    python tests/drivers/pymysql_suite.py --src /path/to/PyMySQL [--only plain|connguard]
                                          [-k EXPR] [--timeout SECONDS] [--workdir DIR]

Each run gets a fresh throwaway MariaDB (``testsupport.servers``) provisioned the way PyMySQL's
CI provisions its service container (databases test1/test2, user test2, auth_ed25519), and a
``databases.json`` in the checkout's ``pymysql/tests`` pointing there (restored afterwards).
pytest runs in a subprocess with a per-test timeout, so a hang fails one test, not the run.

Exit status: 0 when every test that passes plainly also passes with connguard (tests listed
in ``pymysql_allowed.txt`` excepted) and its run's wall time is within ``outcomes.MAX_COST_RATIO``
(1.15x) of the plain run's; 1 otherwise; 2 when a run produced no report. With
``--only``, 0 when that run has no failures or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

# Run as a script, this file's directory is on sys.path, not the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.drivers.connguard_install import OPENED_MARK  # noqa: E402
from tests.drivers.outcomes import (  # noqa: E402
    RUNS,
    RunResult,
    call_pytest,
    describe,
    fresh_server,
    improvements,
    parse_junit,
    print_regressions,
    report_runs,
    run_each,
)
from testsupport.servers import MariaDB, Template  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = Path(__file__).with_name("pymysql_allowed.txt")
TEST2_PASSWORD = "some password"  # PyMySQL's ci/docker.json expects exactly this
# local_infile for test_load_local; a packet limit above 16 MiB so test_largedata really
# sends a multi-packet query instead of returning early.
SERVER_OPTIONS = {"local_infile": True, "max_allowed_packet": "64M"}



# -- server ----------------------------------------------------------------------------------
def provision(server: MariaDB) -> None:
    """What PyMySQL's CI runs in its container (ci/docker-entrypoint-initdb.d), adapted."""
    with server.admin() as cur:
        for db in ("test1", "test2"):
            cur.execute(f"CREATE DATABASE {db} DEFAULT CHARACTER SET utf8mb4")
        # databases[0] is root over TCP as in ci/docker.json; the template's root is
        # socket-only (root@localhost), and skip_name_resolve makes TCP match 127.0.0.1.
        cur.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
        cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        for host in ("%", "localhost"):
            cur.execute("CREATE USER 'test2'@%s IDENTIFIED BY %s", (host, TEST2_PASSWORD))
            cur.execute("GRANT ALL ON test2.* TO 'test2'@%s", (host,))
        # ci/docker-entrypoint-initdb.d/mariadb.sql: enables TestAuthentication's ed25519 test.
        cur.execute("INSTALL SONAME 'auth_ed25519'")
        cur.execute("CREATE FUNCTION ed25519_password RETURNS STRING SONAME 'auth_ed25519.so'")


def databases_json(server: MariaDB) -> List[Dict[str, object]]:
    """The layout of PyMySQL's ci/docker.json, pointed at ``server``."""
    test2 = {"user": "test2", "password": TEST2_PASSWORD, "database": "test2"}
    return [
        {"host": "127.0.0.1", "port": server.port, "user": "root", "password": "",
         "database": "test1", "use_unicode": True, "local_infile": True},
        {"host": "127.0.0.1", "port": server.port, **test2},
        {"host": "localhost", "port": server.port, "unix_socket": server.socket_path, **test2},
    ]


@contextlib.contextmanager
def databases_file(src: Path, content: List[Dict[str, object]]) -> Iterator[None]:
    """Write the suite's ``databases.json``; put back whatever was there before."""
    path = src / "pymysql" / "tests" / "databases.json"
    previous = path.read_bytes() if path.exists() else None
    path.write_text(json.dumps(content, indent=1))
    try:
        yield
    finally:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(previous)


# -- pytest ----------------------------------------------------------------------------------
def pytest_command(args: argparse.Namespace, run: str, junit: Path) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", str(args.src / "pymysql" / "tests"),
           f"--rootdir={args.src}", "-p", "tests.drivers.installed_pymysql",
           "-p", "no:cacheprovider", f"--junitxml={junit}", f"--timeout={args.timeout}",
           "-rfE"]
    if run == "connguard":
        cmd += ["-p", "tests.drivers.connguard_install"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return cmd


def pytest_env(src: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # The plugins are imported as tests.drivers.*; the checkout itself must NOT be on the
    # path before the installed pymysql (see installed_pymysql.py).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYMYSQL_SUITE_SRC"] = str(src)
    env["PY_IGNORE_IMPORTMISMATCH"] = "1"
    return env


def run_suite(args: argparse.Namespace, template: Template, run: str) -> RunResult:
    junit = args.workdir / f"{run}.xml"
    log = args.workdir / f"{run}.log"
    junit.unlink(missing_ok=True)
    with fresh_server(template, SERVER_OPTIONS, provision) as server, \
            databases_file(args.src, databases_json(server)):
        began = time.monotonic()
        # cwd is the work directory, not the checkout: `python -m pytest` puts cwd on
        # sys.path, which would shadow the installed pymysql with the checkout's.
        returncode = call_pytest(pytest_command(args, run, junit), args.workdir,
                                 pytest_env(args.src), log, args.session_timeout)
        seconds = time.monotonic() - began
    outcomes = parse_junit(junit) if junit.exists() else {}
    return RunResult(run, seconds, returncode, outcomes, log)


# -- reports ---------------------------------------------------------------------------------
def print_non_passing(result: RunResult) -> None:
    bad = {k: o for k, o in result.outcomes.items() if o.status in ("failed", "error")}
    print(f"\n{result.name}: {len(bad)} failing or erroring")
    for test_id, outcome in sorted(bad.items()):
        print(f"  {test_id}\n      {describe(outcome)}")


def compare(plain: RunResult, guarded: RunResult, allowed: Dict[str, str]) -> int:
    blocking = print_regressions(plain, guarded, allowed)
    improved = improvements(plain, guarded)
    if improved:
        print(f"\nFailing plainly, passing with connguard: {', '.join(improved)}")
    return 1 if blocking else 0


def report(results: Dict[str, RunResult], only: Optional[str]) -> int:
    return report_runs(results, only, 'PyMySQL suite: plain vs connguard.install()',
                       ALLOWLIST, compare, pooled_connections, print_non_passing)


def pooled_connections(log: Path) -> int:
    """What tests/drivers/connguard_install.py counted at the end of the run (0 if absent)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(OPENED_MARK):
            return int(line[len(OPENED_MARK):].split()[0])
    return 0


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True,
                        help="PyMySQL checkout (has pymysql/tests)")
    parser.add_argument("--only", choices=RUNS, help="run one configuration, compare nothing")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for both runs")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--session-timeout", type=float, default=3600.0,
                        help="kill a whole pytest run after this many seconds")
    parser.add_argument("--workdir", type=Path,
                        help="where reports and logs go (default: a new temp directory)")
    args = parser.parse_args(argv)
    args.src = args.src.resolve()
    if not (args.src / "pymysql" / "tests" / "base.py").exists():
        parser.error(f"{args.src} is not a PyMySQL checkout (no pymysql/tests/base.py)")
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pymysql-suite-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return report(run_each(args, "PyMySQL's suite", run_suite), args.only)


if __name__ == "__main__":
    sys.exit(main())
