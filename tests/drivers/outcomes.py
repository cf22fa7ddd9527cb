"""Test outcomes read from pytest's JUnit XML, two runs compared, allowlists, report lines.

Shared by the drivers' suite runners (``pymysql_suite.py``, ``sqlalchemy_suite.py``,
``mysqlclient_suite.py``, ``django_suite.py``), which run a suite once plainly and once with
connguard and compare the outcomes and the wall times.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

RUNS = ("plain", "connguard")
STATUSES = ("passed", "failed", "error", "skipped")
TIMEOUT_MARK = "Timeout (>"  # how pytest-timeout words a test it interrupted
#: connguard's run of a driver's suite may take at most this many times the plain run's wall
#: time: what connguard adds per statement and per connection must stay small next to the
#: work itself (a statement classifier that backtracks shows up here, not in the outcomes).
MAX_COST_RATIO = 1.15


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES
    message: str = ""  # first line of the failure, error or skip reason

    @property
    def hang(self) -> bool:
        return TIMEOUT_MARK in self.message


@dataclass
class RunResult:
    name: str
    seconds: float
    returncode: Optional[int]  # None: killed at the session timeout
    outcomes: Dict[str, Outcome]
    log: Path


# -- JUnit XML -------------------------------------------------------------------------------
def first_line(text: Optional[str]) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def case_outcome(case: ET.Element) -> Outcome:
    # A test that failed and then errored in teardown shows both; the error ranks first.
    found = {child.tag: child for child in case}
    for tag, status in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
        child = found.get(tag)
        if child is not None:
            return Outcome(status, first_line(child.get("message")) or first_line(child.text))
    return Outcome("passed")


def junit_id(case: ET.Element) -> str:
    """A test's id as JUnit gives it: ``classname::name``."""
    return f"{case.get('classname')}::{case.get('name')}"


def parse_junit(path: Path,
                test_id: Callable[[ET.Element], str] = junit_id) -> Dict[str, Outcome]:
    """Every ``testcase`` in the report at ``path``, keyed by ``test_id(case)``."""
    outcomes: Dict[str, Outcome] = {}
    for case in ET.parse(path).iter("testcase"):
        outcomes[test_id(case)] = case_outcome(case)
    return outcomes


# -- allowlists ------------------------------------------------------------------------------
def read_allowlist(path: Path) -> Dict[str, str]:
    """``test id  # reason`` a line; test id -> reason (empty when the file is absent)."""
    allowed = {}
    if path.exists():
        for raw in path.read_text().splitlines():
            test_id, _, reason = raw.partition("#")
            if test_id.strip():
                allowed[test_id.strip()] = reason.strip()
    return allowed


# -- report lines ----------------------------------------------------------------------------
def counts_line(result: RunResult) -> str:
    counts = {s: 0 for s in STATUSES}
    for outcome in result.outcomes.values():
        counts[outcome.status] += 1
    hangs = sum(o.hang for o in result.outcomes.values())
    state = "killed at session timeout" if result.returncode is None \
        else f"pytest exit {result.returncode}"
    text = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    return f"{result.name:9} {result.seconds:7.1f}s  {text} ({hangs} hung); {state}"


def describe(outcome: Optional[Outcome]) -> str:
    if outcome is None:
        return "not run (missing from report)"
    label = "hang" if outcome.hang else outcome.status
    return f"{label}: {outcome.message}" if outcome.message else label


# -- two runs compared -----------------------------------------------------------------------
def regressions(plain: RunResult, guarded: RunResult) -> Dict[str, Optional[Outcome]]:
    """Tests passing plainly that do not pass with connguard (missing ones included)."""
    return {test_id: guarded.outcomes.get(test_id)
            for test_id, outcome in sorted(plain.outcomes.items())
            if outcome.status == "passed"
            and getattr(guarded.outcomes.get(test_id), "status", None) != "passed"}


def improvements(plain: RunResult, guarded: RunResult) -> List[str]:
    """Tests failing or erroring plainly that pass with connguard, sorted."""
    return sorted(t for t, o in guarded.outcomes.items()
                  if o.status == "passed" and t in plain.outcomes
                  and plain.outcomes[t].status in ("failed", "error"))


def print_regressions(plain: RunResult, guarded: RunResult, allowed: Dict[str, str]) -> int:
    """Print the tests passing plainly, not with connguard; how many are not allowlisted."""
    found = regressions(plain, guarded)
    blocking = [t for t in found if t not in allowed]
    print(f"\nPassing plainly, not with connguard: {len(found)} "
          f"({len(found) - len(blocking)} allowlisted)")
    for test_id, outcome in found.items():
        note = f"  [allowed: {allowed[test_id]}]" if test_id in allowed else ""
        print(f"  {test_id}{note}\n      {describe(outcome)}")
    return len(blocking)


def run_each(args: Any, suite: str, run_suite: Callable[[Any, Any, str], RunResult]
             ) -> Dict[str, RunResult]:
    """``run_suite(args, template, run)`` for each run (``args.only``, or plain then
    connguard), on throwaway servers made from one datadir template, removed after."""
    from testsupport.servers import Template

    print(f"reports and logs in {args.workdir}", flush=True)
    root = tempfile.mkdtemp(prefix="driver-suite-servers-")
    os.chmod(root, 0o755)  # the server may run as another user (sandbox drops root)
    try:
        template = Template(root)
        template.build()
        results = {}
        for run in [args.only] if args.only else RUNS:
            print(f"running {suite}: {run} ...", flush=True)
            results[run] = run_suite(args, template, run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def report_runs(results: Dict[str, RunResult], only: Optional[str], title: str,
                allowlist: Path, compare: Callable[..., int],
                pooled: Callable[[Path], int], print_non_passing: Callable[[RunResult], None]
                ) -> int:
    """A driver suite's verdict: 2 when a run left no report (or the connguard run opened no
    pooled connection: install() was not in effect); with ``only``, 1 on any failure;
    otherwise ``compare``'s (tests passing plainly must pass with connguard)."""
    print(f"\n== {title} ==")
    for result in results.values():
        print(counts_line(result))
    missing = [r for r in results.values() if not r.outcomes]
    for result in missing:
        print(f"{result.name}: no test report; see {result.log}")
    if missing:
        return 2
    if only:
        print_non_passing(results[only])
        bad = [o for o in results[only].outcomes.values() if o.status in ("failed", "error")]
        return 1 if bad else 0
    print_non_passing(results["plain"])
    opened = pooled(results["connguard"].log)
    print(f"\nconnguard run: {opened} pooled connections opened")
    if not opened:
        print("the connguard run opened no pooled connection: install() was not in effect")
        return 2
    verdict = compare(results["plain"], results["connguard"], read_allowlist(allowlist))
    return max(verdict, cost_verdict(results["plain"].seconds, results["connguard"].seconds))


#: A difference this small is not judged: a few-second suite (mysqlclient's takes ~4 s) swings
#: by more than 15 % on a loaded 2-core machine, while a real cost on per-statement work (the
#: backtracking classifier made Django's suite 3.1x) is far above it on any suite.
COST_GRACE_SECONDS = 2.0


def cost_verdict(plain_seconds: float, guarded_seconds: float,
                 limit: float = MAX_COST_RATIO) -> int:
    """Print both wall times and their ratio; 1 when connguard's run is above ``limit``
    times the plain run's and more than COST_GRACE_SECONDS longer, else 0."""
    ratio = guarded_seconds / plain_seconds if plain_seconds > 0 else float("inf")
    print(f"\nwall time: plain {plain_seconds:.1f}s, connguard {guarded_seconds:.1f}s, "
          f"ratio {ratio:.2f}x (limit {limit:.2f}x)")
    if ratio > limit and guarded_seconds - plain_seconds > COST_GRACE_SECONDS:
        print(f"connguard's run took {ratio:.2f}x the plain run's wall time, above {limit:.2f}x")
        return 1
    return 0


@contextlib.contextmanager
def fresh_server(template: Any, options: Dict[str, Any],
                 provision: Callable[[Any], None]) -> Iterator[Any]:
    """A provisioned server of its own per run: one run's leftovers cannot sway the other."""
    from testsupport.servers import MariaDB

    server = MariaDB(template, options)
    try:
        server.start()
        provision(server)
        yield server
    finally:
        server.destroy()


def call_pytest(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path,
                timeout: float, echo: bool = False) -> Optional[int]:
    """Run a suite's pytest into ``log`` (the command first when ``echo``); its exit status,
    or None when it ran past ``timeout`` seconds and was killed."""
    with log.open("w") as out:
        if echo:
            out.write(" ".join(cmd) + "\n\n")
            out.flush()
        try:
            done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    return done.returncode
