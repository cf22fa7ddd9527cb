#!/usr/bin/env python
"""Run part of SQLAlchemy's own test suite plainly and with the connguard engine plugin.

    python tests/drivers/sqlalchemy_suite.py [--src DIR] [--only plain|connguard]
                                             [--timeout SECONDS] [--workdir DIR]
                                             [--plugin-option connguard_NAME=VALUE] [paths...]

The suite comes from the sdist of the installed SQLAlchemy version: ``--src`` names an
unpacked one, otherwise it is downloaded (``pip download --no-binary :all:``) and unpacked
into a cache directory (``$CONNGUARD_SQLA_CACHE``, default ``~/.cache/connguard/sqlalchemy``).
Each run gets a fresh throwaway MariaDB (``testsupport.servers``) provisioned as SQLAlchemy's
README.unittests.rst asks (database ``test`` plus schemas ``test_schema`` and
``test_schema_2``, utf8mb4, a user with all privileges on them) and pytest runs from the
sdist in a subprocess with ``--dburi mysql+pymysql://...``, a per-test timeout and
``python -s`` (so the suite imports the installed SQLAlchemy, not the sdist's ``lib/``). The
connguard run adds ``-p tests.drivers.sqla_connguard``, which gives every MySQL engine the
suite creates ``plugins=["connguard"]``; a connguard run that touched no engine fails.

Exit status: 0 when every test that passes plainly also passes with the plugin (tests listed
in ``sqlalchemy_allowed.txt`` excepted) and its run's wall time is within
``outcomes.MAX_COST_RATIO`` (1.15x) of the plain run's; 1 otherwise; 2 when a run produced no
report or the plugin touched no engine. With ``--only``, 0 when that run produced a report (and, for
``connguard``, touched engines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Run as a script, this file's directory is on sys.path, not the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.drivers.outcomes import (  # noqa: E402
    RUNS,
    RunResult,
    call_pytest,
    cost_verdict,
    counts_line,
    describe,
    fresh_server,
    improvements,
    parse_junit,
    print_regressions,
    read_allowlist,
)
from testsupport.servers import MariaDB, Template  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = Path(__file__).with_name("sqlalchemy_allowed.txt")
DEFAULT_PATHS = (
    "test/dialect/mysql",
    "test/engine/test_reconnect.py",
    "test/engine/test_pool.py",
    "test/engine/test_execute.py",
    "test/engine/test_transaction.py",
    "test/orm/test_transaction.py",
    "test/orm/test_session.py",
    "test/sql/test_types.py",
    "test/sql/test_resultset.py",
    # Connection.info left to the user, URLs, dialect entry points and create_engine's
    # plugin hooks: where the plugin meets SQLAlchemy's own engine building.
    "test/ext/asyncio",
    "test/engine/test_parseconnect.py",
)
DB_USER, DB_PASSWORD, DB_NAME = "scott", "tiger", "test"  # SQLAlchemy's setup.cfg defaults
SCHEMAS = (DB_NAME, "test_schema", "test_schema_2")
# As README.unittests.rst starts its MariaDB container: utf8mb4, utf8mb4_unicode_ci.
SERVER_OPTIONS = {"collation_server": "utf8mb4_unicode_ci", "max_connections": 300}
REPORT_ENV = "SQLA_CONNGUARD_REPORT"  # see sqla_connguard.py
OPTIONS_ENV = "SQLA_CONNGUARD_OPTIONS"


@dataclass
class PluginRunResult(RunResult):
    """A run's outcomes and the connguard plugin's counts of the engines it saw."""

    engines: Dict[str, int] = field(default_factory=dict)  # the plugin's counts


# -- the sdist -------------------------------------------------------------------------------
def sqlalchemy_version() -> str:
    return metadata.version("sqlalchemy")


def cache_dir(project: str = "sqlalchemy") -> Path:
    default = Path.home() / ".cache" / "connguard" / project
    return Path(os.environ.get("CONNGUARD_SQLA_CACHE") or default) if project == "sqlalchemy" \
        else default


def download_sdist(version: str, into: Path, project: str = "sqlalchemy") -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", project, "--no-deps",
           f"{project}=={version}", "-d", str(into)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = [p for p in into.glob("*.tar.gz") if p.name.lower() == f"{project}-{version}.tar.gz"]
    if not found:
        raise RuntimeError(f"pip download left no {project}-{version}.tar.gz in {into}")
    return found[0]


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.9.17: the sdist comes from PyPI by exact version
            tar.extractall(into)  # noqa: S202
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise RuntimeError(f"unexpected layout in {archive}: {tops}")
    return tops[0]


def fetch_sdist(version: str, project: str = "sqlalchemy",
                marker: str = "test/conftest.py") -> Path:
    """The unpacked sdist of ``project`` ``version`` in the cache (``marker``: a file that
    says it is complete); downloaded the first time."""
    target = cache_dir(project) / f"{project}-{version}"
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"downloading the {project} {version} sdist ...", flush=True)
        top = unpack(download_sdist(version, Path(tmp), project), Path(tmp) / "src")
        shutil.rmtree(target, ignore_errors=True)
        top.rename(target)
    return target


# -- server ----------------------------------------------------------------------------------
def provision(server: MariaDB) -> None:
    """What SQLAlchemy's README.unittests.rst asks of a MySQL/MariaDB database."""
    with server.admin() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (DB_USER, DB_PASSWORD))
        for schema in SCHEMAS:
            cur.execute(f"CREATE DATABASE {schema} CHARACTER SET utf8mb4")
            cur.execute(f"GRANT ALL ON {schema}.* TO %s@'%%'", (DB_USER,))


def dburi(server: MariaDB, driver: str = "pymysql") -> str:
    return (f"mysql+{driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{server.port}/{DB_NAME}"
            "?charset=utf8mb4")


# -- pytest ----------------------------------------------------------------------------------
def pytest_command(args: argparse.Namespace, run: str, url: str, junit: Path) -> List[str]:
    # -s: test/conftest.py then leaves the sdist's lib/ off sys.path (installed SQLAlchemy).
    # --maxfail: the sdist's addopts stop at 250 failures; a comparison needs every test.
    cmd = [sys.executable, "-s", "-m", "pytest", *args.paths, f"--rootdir={args.src}",
           "--dburi", url, "-p", "no:cacheprovider", f"--junitxml={junit}",
           f"--timeout={args.timeout}", "--maxfail=1000000", "-q", "-rfE"]
    if run == "connguard":
        cmd += ["-p", "tests.drivers.sqla_connguard"]
    return cmd


def pytest_env(report: Path, plugin_options: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[REPORT_ENV] = str(report)
    env[OPTIONS_ENV] = json.dumps(plugin_options)
    return env


def run_suite(args: argparse.Namespace, template: Template, run: str) -> PluginRunResult:
    junit, log, counts = (args.workdir / f"{run}{ext}" for ext in (".xml", ".log", ".json"))
    for path in (junit, counts):
        path.unlink(missing_ok=True)
    with fresh_server(template, SERVER_OPTIONS, provision) as server:
        cmd = pytest_command(args, run, dburi(server, args.driver), junit)
        began = time.monotonic()
        returncode = call_pytest(cmd, args.src, pytest_env(counts, args.plugin_option), log,
                                 args.session_timeout, echo=True)
        seconds = time.monotonic() - began
    outcomes = (parse_junit(junit, lambda case: node_id(case, args.src))
                if junit.exists() else {})
    engines = json.loads(counts.read_text()) if counts.exists() else {}
    return PluginRunResult(run, seconds, returncode, outcomes, log, engines)


# -- reports ---------------------------------------------------------------------------------
def node_id(case: ET.Element, src: Path) -> str:
    """pytest's node id from JUnit's dotted classname (module path, then classes)."""
    classname, name = case.get("classname") or "", case.get("name") or ""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        module = Path(*parts[:cut]).with_suffix(".py")
        if (src / module).is_file():
            return "::".join([module.as_posix(), *parts[cut:], name])
    return f"{classname}::{name}"


def engines_line(result: PluginRunResult, options: Dict[str, str]) -> str:
    e = result.engines
    if not e:
        return "connguard plugin: no count written (plugin not loaded?)"
    extra = f" with {options}" if options else ""
    return (f"connguard plugin: {e.get('requested', 0)} MySQL engines given the plugin{extra}, "
            f"{e.get('guarded', 0)} guarded, {e.get('failed', 0)} create_engine calls raised "
            f"(create_engine wrapped in {e.get('rebound', 0)} module attributes)")


def sqlalchemy_line(result: PluginRunResult) -> str:
    """The 'Path: .../sqlalchemy/__init__.py' line SQLAlchemy's harness logs."""
    with contextlib.suppress(OSError):
        match = re.search(r"^Path: (.*)$", result.log.read_text(errors="replace"), re.M)
        if match:
            return f"SQLAlchemy imported from {match.group(1)}"
    return "SQLAlchemy path not logged"


def compare(plain: RunResult, guarded: RunResult, allowed: Dict[str, str]) -> int:
    blocking = print_regressions(plain, guarded, allowed)
    improved = improvements(plain, guarded)
    if improved:
        print(f"\nFailing plainly, passing with connguard: {len(improved)}")
        for test_id in improved:
            print(f"  {test_id}\n      plain {describe(plain.outcomes[test_id])}")
    return 1 if blocking else 0


def report(results: Dict[str, PluginRunResult], options: Dict[str, str]) -> int:
    print("\n== SQLAlchemy suite: plain vs plugins=['connguard'] ==")
    for result in results.values():
        print(counts_line(result))
        print(f"{'':11}{sqlalchemy_line(result)}; log {result.log}")
    if "connguard" in results:
        print(engines_line(results["connguard"], options))
    missing = [r for r in results.values() if not r.outcomes]
    for result in missing:
        print(f"{result.name}: no test report; see {result.log}")
    untouched = "connguard" in results and not results["connguard"].engines.get("guarded")
    if untouched:
        print("connguard run: the plugin touched no engine, so nothing was compared")
    if missing or untouched:
        return 2
    if len(results) < len(RUNS):
        return 0
    verdict = compare(results["plain"], results["connguard"], read_allowlist(ALLOWLIST))
    return max(verdict, cost_verdict(results["plain"].seconds, results["connguard"].seconds))


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS),
                        help="test paths relative to the sdist (default: the MySQL, engine, "
                             "transaction, session, types, result, asyncio extension and "
                             "URL parsing tests)")
    parser.add_argument("--src", type=Path,
                        help="unpacked SQLAlchemy sdist (default: download into the cache)")
    parser.add_argument("--only", choices=RUNS, help="run one configuration, compare nothing")
    parser.add_argument("--driver", choices=("pymysql", "mysqldb", "aiomysql"),
                        default="pymysql", help="the DBAPI driver of --dburi (mysqldb: "
                        "mysqlclient; aiomysql: SQLAlchemy's async support)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--session-timeout", type=float, default=3600.0,
                        help="kill a whole pytest run after this many seconds")
    parser.add_argument("--workdir", type=Path,
                        help="where reports and logs go (default: a new temp directory)")
    parser.add_argument("--plugin-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a connguard_* option for every engine of the connguard run "
                             "(diagnostics: e.g. connguard_storm_control=false); repeatable")
    args = parser.parse_args(argv)
    args.plugin_option = plugin_options(parser, args.plugin_option)
    args.src = (args.src or fetch_sdist(sqlalchemy_version())).resolve()
    if not (args.src / "test" / "conftest.py").exists():
        parser.error(f"{args.src} is not an SQLAlchemy sdist (no test/conftest.py)")
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="sqla-suite-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def plugin_options(parser: argparse.ArgumentParser, given: List[str]) -> Dict[str, str]:
    options = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("connguard_"):
            parser.error(f"--plugin-option takes connguard_NAME=VALUE, not {item!r}")
        options[name] = value
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    print(f"SQLAlchemy {sqlalchemy_version()} suite from {args.src} on mysql+{args.driver}; "
          f"reports and logs in {args.workdir}", flush=True)
    root = tempfile.mkdtemp(prefix="sqla-suite-servers-")
    os.chmod(root, 0o755)  # the server may run as another user (sandbox drops root)
    results = {}
    try:
        template = Template(root)
        template.build()
        for run in [args.only] if args.only else RUNS:
            print(f"running SQLAlchemy's suite: {run} ...", flush=True)
            results[run] = run_suite(args, template, run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(results, args.plugin_option)


if __name__ == "__main__":
    sys.exit(main())
