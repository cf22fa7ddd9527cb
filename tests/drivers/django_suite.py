#!/usr/bin/env python
"""Run Django's own test suite (database apps) plainly and with ``connguard.install("MySQLdb")``.

    python tests/drivers/django_suite.py [--src DIR] [--only plain|connguard] [--parallel N]
                                         [--session-timeout SECONDS] [--workdir DIR]
                                         [apps ...]

The suite comes from the sdist of a supported Django (5.2): ``--src`` names an unpacked one,
otherwise the sdist of the installed Django 5.2.x (or, when none is installed, of the newest
5.2.x, which is then installed from that sdist) is downloaded once into
``~/.cache/connguard/django``.

Each run gets a fresh throwaway MariaDB (``testsupport.servers``) with root over TCP (Django's
runner creates and drops ``test_*`` databases), and a settings module of its own in the work
directory: the ``default`` and ``other`` aliases that ``tests/runtests.py`` needs, on
``django.db.backends.mysql`` (mysqlclient), utf8mb4. The connguard run's settings module calls
``connguard.install("MySQLdb")`` before Django loads its MySQL backend and prints, at exit, how
many pooled connections it opened. ``runtests.py -v 2`` runs in a subprocess; its per-test
lines are the outcomes (ok, skip, fail, error, expected failure, unexpected success).

Exit status: 0 when both runs have the same outcome for every test (tests listed in
``django_allowed.txt`` excepted) and connguard's wall time is within ``MAX_COST_RATIO`` of
plain; 1 otherwise; 2 when a run produced no outcome or the connguard run opened no pooled
connection. With ``--only``, 0 when that run has no failures or errors.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Run as a script, this file's directory is on sys.path, not the checkout's root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.drivers.outcomes import (  # noqa: E402
    RUNS,
    Outcome,
    RunResult,
    call_pytest,
    cost_verdict,
    fresh_server,
    read_allowlist,
    run_each,
)
from tests.drivers.pymysql_suite import pooled_connections  # noqa: E402
from tests.drivers.sqlalchemy_suite import cache_dir, unpack  # noqa: E402
from testsupport.servers import MariaDB, Template, find_binary  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = Path(__file__).with_name("django_allowed.txt")
SERIES = "5.2"  # a supported Django (LTS); its suite must match the Django that runs it
SPEC = "django>=5.2,<5.3"
DEFAULT_APPS = (
    "backends", "transactions", "transaction_hooks", "basic", "queries", "select_for_update",
    "model_fields", "db_functions", "expressions", "aggregation", "bulk_create",
    "get_or_create", "raw_query", "timezones", "fixtures", "delete", "update", "model_forms",
    "introspection", "schema", "migrations", "test_utils", "select_related",
    "prefetch_related", "custom_lookups", "indexes", "constraints",
)
ROOT_PASSWORD = "root"  # throwaway server, root over 127.0.0.1 only
SERVER_OPTIONS = {"collation_server": "utf8mb4_unicode_ci"}
SETTINGS_MODULE = "connguard_django_settings"
ZONEINFO = Path("/usr/share/zoneinfo")
# runtests.py -v 2 (unittest's TextTestResult): "name (dotted.id) ... status", or, for a test
# with a docstring, the header on one line and "first docstring line ... status" on the next.
HEADER = re.compile(r"^ *(?P<name>\w+) \((?P<id>[\w.]+)\)(?P<sub> \(.*\))?(?P<rest>.*)$")
STATUS = re.compile(r"(?:^| \.\.\. )(?P<status>ok|skipped.*|FAIL|ERROR|expected failure|"
                    r"unexpected success)$")
STATUSES = {"ok": "ok", "skipped": "skip", "FAIL": "fail", "ERROR": "error",
            "expected failure": "expected failure", "unexpected success": "unexpected success"}
FAILING = ("fail", "error", "unexpected success")
RAN = re.compile(r"^Ran (\d+) tests? in ", re.M)
SUMMARY_RULE = "=" * 70  # where unittest's failure details begin


# -- the sdist -------------------------------------------------------------------------------
def installed_django() -> Optional[str]:
    try:
        return metadata.version("django")
    except metadata.PackageNotFoundError:
        return None


def fetch_django(cache: Path) -> Path:
    """The unpacked sdist of the installed Django 5.2.x (installed from the newest 5.2.x
    sdist first when no Django is installed), in ``cache``."""
    version = installed_django()
    if version is not None and not version.startswith(SERIES + "."):
        raise SystemExit(f"Django {version} is installed; this suite runs Django {SERIES} "
                         f"(pip install '{SPEC}')")
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"django=={version}" if version else SPEC
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                    "--no-deps", spec, "-d", str(cache)], check=True, stdout=subprocess.DEVNULL)
    archive = newest_archive(cache, version)
    if version is None:
        print(f"installing {archive.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(archive)], check=True)
    target = cache / archive.name[:-len(".tar.gz")]
    if not (target / "tests" / "runtests.py").exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            unpack(archive, Path(tmp)).rename(target)
    return target


def newest_archive(cache: Path, version: Optional[str]) -> Path:
    name = re.compile(rf"django-({re.escape(version) if version else re.escape(SERIES)}"
                      r"(?:\.\d+)?)\.tar\.gz$", re.I)
    found = [(tuple(int(n) for n in m.group(1).split(".")), p)
             for p in cache.glob("*.tar.gz") if (m := name.match(p.name))]
    if not found:
        raise RuntimeError(f"pip download left no Django {version or SERIES} sdist in {cache}")
    return max(found)[1]


# -- server and settings ---------------------------------------------------------------------
def provision(server: MariaDB) -> None:
    """Root over TCP (Django's test runner creates and drops its test databases) and the
    server's time zone tables (Django's MySQL notes ask for them; without them ~40 timezone
    tests fail in both runs and so referee nothing)."""
    with server.admin() as cur:
        # The template's root is socket-only; skip_name_resolve makes TCP match 127.0.0.1.
        cur.execute("CREATE USER 'root'@'127.0.0.1' IDENTIFIED BY %s", (ROOT_PASSWORD,))
        cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
    load_time_zones(server)


def load_time_zones(server: MariaDB) -> None:
    tool = find_binary("mariadb-tzinfo-to-sql") or find_binary("mysql_tzinfo_to_sql")
    client = find_binary("mariadb") or find_binary("mysql")
    if tool is None or client is None or not ZONEINFO.is_dir():
        print(f"no time zone tables (need mariadb-tzinfo-to-sql, the mariadb client and "
              f"{ZONEINFO}): Django's timezone tests will fail in both runs", flush=True)
        return
    sql = subprocess.run([tool, str(ZONEINFO)], capture_output=True, check=True).stdout
    # The password through the environment, not the command line (ps shows that).
    env = {**os.environ, "MYSQL_PWD": server.root_password}
    subprocess.run([client, "--no-defaults", f"--socket={server.socket_path}", "--user=root",
                    "mysql"], input=sql, env=env, check=True, stdout=subprocess.DEVNULL)


def settings_text(server: MariaDB, run: str) -> str:
    """A settings module like Django's tests/test_sqlite.py, for MySQL on ``server``."""
    databases = {alias: {
        "ENGINE": "django.db.backends.mysql", "NAME": f"django_{alias}", "USER": "root",
        "PASSWORD": ROOT_PASSWORD, "HOST": "127.0.0.1", "PORT": str(server.port),
        "OPTIONS": {"charset": "utf8mb4"},
        "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
    } for alias in ("default", "other")}
    guard = ""
    if run == "connguard":
        # Django's backend calls MySQLdb.connect(...) through the module at each connect;
        # the settings module is imported before any connection exists.
        guard = ("import atexit\n\nimport connguard\n"
                 "from tests.drivers.connguard_install import report_opened\n\n"
                 'connguard.install("MySQLdb")\n'
                 'atexit.register(report_opened, "MySQLdb")\n\n')
    return (f"# Written by {Path(__file__).name} for its {run} run.\n{guard}"
            f"DATABASES = {databases!r}\n"
            'SECRET_KEY = "django_tests_secret_key"\n'
            'PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]\n'
            'DEFAULT_AUTO_FIELD = "django.db.models.AutoField"\n'
            "USE_TZ = False\n")


# -- runtests.py -----------------------------------------------------------------------------
def runtests_command(args: argparse.Namespace) -> List[str]:
    return [sys.executable, str(args.src / "tests" / "runtests.py"), "-v", "2", "--noinput",
            f"--settings={SETTINGS_MODULE}", f"--parallel={args.parallel}", *args.apps]


def runtests_env(settings_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # The settings module, then the checkout's root (tests.drivers.* for the connguard run);
    # runtests.py puts the sdist's tests/ first itself, and the sdist's django/ is never on
    # the path (the installed Django runs).
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(settings_dir), str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_suite(args: argparse.Namespace, template: Template, run: str) -> RunResult:
    settings_dir = args.workdir / run
    settings_dir.mkdir(exist_ok=True)
    log = args.workdir / f"{run}.log"
    with fresh_server(template, SERVER_OPTIONS, provision) as server:
        (settings_dir / f"{SETTINGS_MODULE}.py").write_text(settings_text(server, run))
        began = time.monotonic()
        # cwd is the work directory: nothing is written into the sdist.
        returncode = call_pytest(runtests_command(args), args.workdir,
                                 runtests_env(settings_dir), log, args.session_timeout,
                                 echo=True)
        seconds = time.monotonic() - began
    return RunResult(run, seconds, returncode, parse_verbose(log.read_text(errors="replace")),
                     log)


def parse_verbose(text: str) -> Dict[str, Outcome]:
    """Each test's outcome from unittest's ``-v 2`` lines, keyed by its dotted id (a subtest
    by its id and parameters), up to the failure details."""
    outcomes: Dict[str, Outcome] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        if line.startswith(SUMMARY_RULE):
            break
        header = HEADER.match(line)
        if header:
            current = header.group("id") + (header.group("sub") or "")
            line = header.group("rest")
        found = STATUS.search(line) if current else None
        if found and current:
            outcomes[current] = outcome(found.group("status"))
            current = None
    return outcomes


def outcome(status: str) -> Outcome:
    word = "skipped" if status.startswith("skipped") else status
    return Outcome(STATUSES[word], status[len("skipped"):].strip(" '\"") if word == "skipped"
                   else "")


def ran_count(log: Path) -> Optional[int]:
    found = RAN.search(log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


# -- reports ---------------------------------------------------------------------------------
def counts_line(result: RunResult) -> str:
    counts = Counter(o.status for o in result.outcomes.values())
    text = ", ".join(f"{counts[s]} {s}" for s in STATUSES.values())
    state = "killed at session timeout" if result.returncode is None \
        else f"runtests exit {result.returncode}"
    ran = ran_count(result.log)
    return (f"{result.name:9} {result.seconds:7.1f}s  {len(result.outcomes)} outcomes: {text}; "
            f"unittest ran {ran if ran is not None else '?'}; {state}")


def differences(plain: RunResult, guarded: RunResult) -> Dict[str, tuple]:
    """Tests whose outcome differs between the runs (missing from one run included)."""
    ids = sorted(set(plain.outcomes) | set(guarded.outcomes))
    return {t: (plain.outcomes.get(t), guarded.outcomes.get(t)) for t in ids
            if getattr(plain.outcomes.get(t), "status", None)
            != getattr(guarded.outcomes.get(t), "status", None)}


def label(found: Optional[Outcome]) -> str:
    if found is None:
        return "not run"
    return f"{found.status}: {found.message}" if found.message else found.status


def print_failing(result: RunResult) -> None:
    bad = sorted(t for t, o in result.outcomes.items() if o.status in FAILING)
    print(f"\n{result.name}: {len(bad)} failing, erroring or unexpectedly passing")
    for test_id in bad:
        print(f"  {test_id}: {label(result.outcomes[test_id])}")


def compare(plain: RunResult, guarded: RunResult, allowed: Dict[str, str]) -> int:
    found = differences(plain, guarded)
    blocking = [t for t in found if t not in allowed]
    print(f"\nDifferent outcomes, plain vs connguard: {len(found)} "
          f"({len(found) - len(blocking)} allowlisted)")
    for test_id, (before, after) in found.items():
        note = f"  [allowed: {allowed[test_id]}]" if test_id in allowed else ""
        print(f"  {test_id}{note}\n      plain {label(before)}; connguard {label(after)}")
    return 1 if blocking else 0


def report(results: Dict[str, RunResult], only: Optional[str]) -> int:
    print('\n== Django suite: plain vs connguard.install("MySQLdb") ==')
    for result in results.values():
        print(f"{counts_line(result)}\n{'':11}log {result.log}")
    missing = [r for r in results.values() if not r.outcomes]
    for result in missing:
        print(f"{result.name}: no test outcome parsed; see {result.log}")
    if missing:
        return 2
    if only:
        print_failing(results[only])
        return 1 if any(o.status in FAILING for o in results[only].outcomes.values()) else 0
    print_failing(results["plain"])
    opened = pooled_connections(results["connguard"].log)
    print(f"\nconnguard run: {opened} pooled connections opened")
    if not opened:
        print('the connguard run opened no pooled connection: install("MySQLdb") was not in '
              "effect")
        return 2
    verdict = compare(results["plain"], results["connguard"], read_allowlist(ALLOWLIST))
    cost = cost_verdict(results["plain"].seconds, results["connguard"].seconds)
    return max(verdict, cost)


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("apps", nargs="*", default=list(DEFAULT_APPS),
                        help="Django test apps (default: the 27 database apps)")
    parser.add_argument("--src", type=Path,
                        help="unpacked Django sdist (has tests/runtests.py); default: the sdist "
                             "of the installed Django 5.2, downloaded once")
    parser.add_argument("--only", choices=RUNS, help="run one configuration, compare nothing")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runtests.py --parallel, the same for both runs (default 1: one "
                             "process, so the connguard count covers every connection)")
    parser.add_argument("--session-timeout", type=float, default=1200.0,
                        help="kill a whole runtests.py run after this many seconds")
    parser.add_argument("--workdir", type=Path,
                        help="where logs and settings modules go (default: a new temp "
                             "directory)")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel takes a whole number of processes >= 1, not {args.parallel}")
    args.src = (args.src or fetch_django(cache_dir("django"))).resolve()
    if not (args.src / "tests" / "runtests.py").exists():
        parser.error(f"{args.src} is not a Django sdist (no tests/runtests.py)")
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="django-suite-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    print(f"Django {installed_django()} suite from {args.src} on mysqlclient, "
          f"--parallel={args.parallel}", flush=True)
    return report(run_each(args, "Django's suite", run_suite), args.only)


if __name__ == "__main__":
    sys.exit(main())
