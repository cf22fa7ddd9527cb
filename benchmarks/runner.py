"""One runner for every scenario: ``connguard bench`` and ``python -m benchmarks``.

``run(dsn=None, quick=False, scenarios=None, out_dir="bench-results")`` runs the scenarios of
:data:`SCENARIOS` (all by default) against one server and writes ``results.json``,
``report.md`` and PNG charts into ``out_dir``. Without a DSN it starts a throwaway MariaDB
from the ``mariadbd`` on PATH (:mod:`testsupport.servers`) and stops it afterwards; the
outage, saturation and mass-KILL scenarios start servers of their own from the same template,
since they stop, cap or KILL them. With a DSN those three are skipped with a note: a
benchmark never stops or KILLs a server it did not start.

``kwargs=`` (``pymysql.connect`` arguments) is the entry point for callers that already have
a server, such as the test suite; ``start_server=`` lends them a way to start throwaway ones.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO

from benchmarks.common import ScenarioResult
from benchmarks.report import results_document, summary, write_all

DEFAULT_OUT = "bench-results"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAIN_SERVER_OPTIONS = {"max_connections": 500}
THROWAWAY = "throwaway MariaDB"


class SetupError(RuntimeError):
    """No server to benchmark against (no mariadbd, an unreachable DSN); exit status 2."""


@dataclass
class Context:
    """What a scenario gets: the server, the run's size, and where to report progress."""

    kwargs: Dict[str, Any]
    quick: bool
    start_server: Optional[Callable[..., Any]] = None  # (**mariadbd options) -> MariaDB
    step: Callable[[str], None] = field(default=lambda text: None)
    throwaway: bool = False  # the main server was started by this run (it offers no TLS)

    @property
    def rounds(self) -> int:
        return 3 if self.quick else 7


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Context], List[ScenarioResult]]
    own_server: bool = False  # stops, caps or KILLs a server: only one this run started


# --- the scenarios -------------------------------------------------------------------------------


def _checkout(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import pool_overhead

    return [pool_overhead.checkout_return(ctx.kwargs, ctx.rounds,
                                          2000 if ctx.quick else 20000)]


def _query(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import pool_overhead

    return [pool_overhead.checkout_select_return(ctx.kwargs, ctx.rounds,
                                                 500 if ctx.quick else 5000)]


def _connect_per_request(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import pool_overhead

    return [pool_overhead.connect_per_request(ctx.kwargs, ctx.rounds,
                                              200 if ctx.quick else 2000)]


def _cold_connect(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import pool_overhead

    return [pool_overhead.cold_connect(ctx.kwargs, ctx.rounds, 12 if ctx.quick else 100)]


def _threads(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import pool_overhead

    return [pool_overhead.threaded_throughput(ctx.kwargs, ctx.rounds,
                                              640 if ctx.quick else 20000)]


def _census(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import census_cost

    return census_cost.run_all(ctx.kwargs, ctx.quick)


def _sqlalchemy(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import sqlalchemy_plugin

    # Lend it this run's throwaway servers if its run_all takes them (no second template).
    extra: Dict[str, Any] = {}
    if ctx.start_server is not None and "start_server" in inspect.signature(
            sqlalchemy_plugin.run_all).parameters:
        extra["start_server"] = ctx.start_server
    return sqlalchemy_plugin.run_all(ctx.kwargs, ctx.quick, **extra)


def _coordination(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import coordination

    return coordination.run_all(ctx.kwargs, ctx.quick)


def _outage(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import storm

    assert ctx.start_server is not None
    return storm.outage(ctx.start_server, ctx.quick, ctx.step)


def _saturation(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import storm

    assert ctx.start_server is not None
    return storm.saturation(ctx.start_server, ctx.quick, ctx.step)


def _mass_kill(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import storm

    assert ctx.start_server is not None
    return storm.mass_kill(ctx.start_server, ctx.quick, ctx.step)


def _port_churn(ctx: Context) -> List[ScenarioResult]:
    from benchmarks import storm

    return storm.port_churn(ctx.kwargs, ctx.quick, ctx.step, no_tls=ctx.throwaway)


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    Scenario("checkout", "checkout + return of an idle connection", _checkout),
    Scenario("query", "checkout + SELECT 1 + return", _query),
    Scenario("connect-per-request", "connect + SELECT 1 + close per request",
             _connect_per_request),
    Scenario("cold-connect", "a brand-new connection, handshake included", _cold_connect),
    Scenario("threads", "64 threads on a pool of 8", _threads),
    Scenario("census", "socket census cost vs sockets; the resource guard's overhead",
             _census),
    Scenario("sqlalchemy", "the SQLAlchemy plugin vs pool_pre_ping (benchmarks/"
             "sqlalchemy_plugin.py)", _sqlalchemy),
    Scenario("outage", "server restart under 64 threads", _outage, own_server=True),
    Scenario("saturation", "64 threads, max_connections 16, pools allowed 64", _saturation,
             own_server=True),
    Scenario("mass-kill", "every connection KILLed at once", _mass_kill, own_server=True),
    Scenario("port-churn", "connect per request: TIME_WAIT left behind", _port_churn),
    Scenario("coordination", "Redis lease cost; global attempt rate in an outage with 1, 4 "
             "and 16 processes (benchmarks/coordination.py)", _coordination),
)}
SCENARIO_NAMES = tuple(SCENARIOS)


def select(names: Optional[Sequence[str]]) -> List[Scenario]:
    """The scenarios named (all when None or empty), in registry order; ValueError naming
    the allowed values for an unknown name."""
    if not names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(SCENARIO_NAMES)}")
    return [s for s in SCENARIOS.values() if s.name in names]


# --- progress ------------------------------------------------------------------------------------


class PlainProgress:
    """One line per scenario and step, on stderr (logs, CI, no terminal, no rich)."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stderr
        self.total = 0
        self.index = 0
        self.name = ""

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self._say(f"bench: {text}")

    def begin(self, total: int) -> None:
        self.total = total

    def scenario(self, scenario: Scenario) -> None:
        self.index += 1
        self.name = scenario.name
        self._say(f"[{self.index}/{self.total}] {scenario.name}: {scenario.title}")

    def step(self, text: str) -> None:
        self._say(f"[{self.index}/{self.total}] {self.name}: {text}")

    def finished(self, status: str, seconds: float, note: str) -> None:
        extra = f" ({note})" if note and status != "ok" else ""
        self._say(f"[{self.index}/{self.total}] {self.name}: {status} in {seconds:.1f} s{extra}")

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    """A bar over the scenarios and a line for the current step (rich, on a terminal)."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                            transient=False)
        self.task: Any = None
        self.bar.start()

    def note(self, text: str) -> None:
        self.console.print(f"bench: {text}")

    def begin(self, total: int) -> None:
        super().begin(total)
        self.task = self.bar.add_task("starting", total=total)

    def scenario(self, scenario: Scenario) -> None:
        self.index += 1
        self.name = scenario.name
        self.bar.update(self.task, description=f"{scenario.name}: {scenario.title}")

    def step(self, text: str) -> None:
        self.bar.update(self.task, description=f"{self.name}: {text}")

    def finished(self, status: str, seconds: float, note: str) -> None:
        mark = {"ok": "[green]ok[/]", "skipped": "[yellow]skipped[/]"}.get(status, "[red]failed[/]")
        extra = f" — {note}" if note and status != "ok" else ""
        self.console.print(f"{self.name}: {mark} in {seconds:.1f} s{extra}", highlight=False,
                           markup=True)
        self.bar.advance(self.task)

    def close(self) -> None:
        if self.task is not None:
            self.bar.update(self.task, description="done")
        self.bar.stop()


def default_progress() -> PlainProgress:
    """Rich bars when rich is importable and stderr is a terminal; plain lines otherwise."""
    if sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()


# --- servers -------------------------------------------------------------------------------------


class Sandbox:
    """Throwaway MariaDB servers from one template; every one is destroyed by ``close()``."""

    def __init__(self) -> None:
        from testsupport.servers import Template

        require_mariadbd()
        self.root = tempfile.mkdtemp(prefix="connguard-bench-")
        self.servers: List[Any] = []
        try:
            os.chmod(self.root, 0o755)
            self.template = Template(self.root)
            self.template.build()
        except BaseException as exc:
            shutil.rmtree(self.root, ignore_errors=True)
            if isinstance(exc, RuntimeError):  # no mariadb-install-db, or it failed
                raise SetupError(str(exc)) from exc
            raise

    def start(self, **options: Any) -> Any:
        from testsupport.servers import MariaDB

        server = MariaDB(self.template, options)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.destroy()
        shutil.rmtree(self.root, ignore_errors=True)


def require_mariadbd() -> None:
    """SetupError with the install hint when there is no server binary to start."""
    from testsupport.servers import INSTALL_HINT, find_binary

    if find_binary("mariadbd") is None and find_binary("mysqld") is None:
        raise SetupError(INSTALL_HINT)


def kwargs_from_dsn(dsn: str, password: Optional[str] = None) -> Dict[str, Any]:
    """``pymysql.connect`` arguments from a DSN; the password from the DSN, ``password``
    or ``MYSQL_PWD``. ValueError (never showing the password) for a malformed DSN."""
    from connguard.doctor import parse_dsn

    target = parse_dsn(dsn)
    kwargs = target.connect_kwargs()
    if password is not None:
        kwargs["password"] = password
    elif target.password is None:
        kwargs["password"] = os.environ.get("MYSQL_PWD", "")
    kwargs["connect_timeout"] = 10
    return kwargs


def describe(kwargs: Dict[str, Any]) -> str:
    """``user@host:port/db`` (never the password)."""
    where = kwargs.get("unix_socket") or f"{kwargs.get('host') or 'localhost'}:" \
        f"{kwargs.get('port') or 3306}"
    user = f"{kwargs['user']}@" if kwargs.get("user") else ""
    db = kwargs.get("database") or kwargs.get("db")
    return f"{user}{where}" + (f"/{db}" if db else "")


def server_version(kwargs: Dict[str, Any]) -> str:
    """The server's version string; SetupError naming the cause if it cannot be reached."""
    import pymysql

    from connguard import errors

    try:
        conn = pymysql.connect(**kwargs)
    except pymysql.err.Error as exc:
        translated = errors.translate(exc, host=kwargs.get("host"), port=kwargs.get("port"),
                                      password=kwargs.get("password"), during_connect=True)
        raise SetupError(f"cannot connect to {describe(kwargs)}: "
                         f"{errors.redact(str(translated), kwargs.get('password'))}") from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            return str(cur.fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def _servers(dsn: Optional[str], kwargs: Optional[Dict[str, Any]],
             start_server: Optional[Callable[..., Any]], password: Optional[str],
             progress: PlainProgress) -> Iterator[Any]:
    """(main server kwargs, start_server or None, source)."""
    if kwargs is not None:
        yield dict(kwargs), start_server, "given"
        return
    if dsn is not None:
        yield kwargs_from_dsn(dsn, password), start_server, "dsn"
        return
    require_mariadbd()
    progress.note("starting a throwaway MariaDB (mariadbd from PATH)")
    sandbox = Sandbox()
    try:
        try:
            main = sandbox.start(**MAIN_SERVER_OPTIONS)
        except (RuntimeError, AssertionError) as exc:  # exited at start, or never answered
            raise SetupError(f"the throwaway MariaDB did not start: {exc}") from exc
        yield main.connect_kwargs(), start_server or sandbox.start, THROWAWAY
    finally:
        sandbox.close()


# --- the run -------------------------------------------------------------------------------------


def run(dsn: Optional[str] = None, quick: bool = False,
        scenarios: Optional[Sequence[str]] = None, out_dir: str = DEFAULT_OUT, *,
        kwargs: Optional[Dict[str, Any]] = None,
        start_server: Optional[Callable[..., Any]] = None, password: Optional[str] = None,
        progress: Optional[PlainProgress] = None) -> Dict[str, Any]:
    """Run the scenarios, write results.json, report.md and charts into ``out_dir``.

    Returns the results document (docs/bench.md). Raises ValueError for an unknown scenario
    name or a malformed DSN, :class:`SetupError` when there is no server to run against.
    """
    chosen = select(scenarios)
    if dsn is not None:
        kwargs_from_dsn(dsn, password)  # a malformed DSN fails before anything starts
    progress = progress or default_progress()
    quiet = _quiet_connguard_log()
    began = time.monotonic()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: List[ScenarioResult] = []
    runs: List[Dict[str, Any]] = []
    try:
        with _servers(dsn, kwargs, start_server, password, progress) as (main, starter, source):
            version = server_version(main)
            progress.begin(len(chosen))
            for scenario in chosen:
                progress.scenario(scenario)
                ctx = Context(main, quick, starter, progress.step,
                              throwaway=source == THROWAWAY)
                record, produced = _run_one(scenario, ctx)
                results += produced
                runs.append(record)
                progress.finished(record["status"], record["seconds"], record["note"])
    finally:
        progress.close()
        logging.getLogger("connguard").removeHandler(quiet)
    doc = results_document(results, version, server={
        "version": version, "source": source, "address": describe(main)},
        quick=quick, started_utc=started_utc, runs=runs,
        wall_seconds=round(time.monotonic() - began, 1))
    write_all(doc, out_dir)
    return doc


def _quiet_connguard_log() -> logging.Handler:
    """Keep connguard's warnings (e.g. the adaptive ceiling holding at N after a 1040, which
    the saturation scenario provokes on purpose) from cutting through the progress lines:
    with no handler of the application's, Python would print them to stderr."""
    handler = logging.NullHandler()
    logging.getLogger("connguard").addHandler(handler)
    return handler


def _run_one(scenario: Scenario, ctx: Context) -> tuple:
    began = time.monotonic()
    record: Dict[str, Any] = {"name": scenario.name, "title": scenario.title, "status": "ok",
                              "seconds": 0.0, "note": ""}
    produced: List[ScenarioResult] = []
    if scenario.own_server and ctx.start_server is None:
        record.update(status="skipped", note="stops, caps or KILLs the server, so it runs "
                      "only on throwaway servers this run starts (not with --dsn)")
        return record, produced
    try:
        produced = scenario.run(ctx)
    except ImportError as exc:  # a client library of the bench extra is not installed
        record.update(status="skipped", note=f"needs {exc.name or exc}: pip install "
                      "'connguard[bench]'")
    except Exception as exc:
        password = ctx.kwargs.get("password")
        from connguard.errors import redact

        record.update(status="failed", note=redact(f"{type(exc).__name__}: {exc}", password))
        print(redact(traceback.format_exc(), password), file=sys.stderr)
    for result in produced:
        result.group = scenario.name
    if produced and all(r.skipped for r in produced):
        reasons = [n.split(":", 1)[-1].strip() for r in produced for n in r.notes
                   if n.startswith("skipped")]  # "skipped: why": the status says skipped
        record.update(status="skipped", note="; ".join(dict.fromkeys(reasons))[:500])  # once each
    record["seconds"] = round(time.monotonic() - began, 1)
    return record, produced


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``connguard bench`` / ``python -m benchmarks``."""
    parser.add_argument("--dsn", metavar="URL", help="benchmark this server instead of a "
                        "throwaway MariaDB: mysql://user[:password]@host[:port]/db (the "
                        "password may instead come from MYSQL_PWD or --password-prompt); "
                        "outage, saturation and mass-kill are then skipped")
    parser.add_argument("--password-prompt", action="store_true",
                        help="ask for the --dsn password on the terminal")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and shorter phases (under 2 minutes on 2 cores)")
    parser.add_argument("--scenario", metavar="NAME", action="extend", nargs="+",
                        choices=SCENARIO_NAMES,
                        help=f"run only these (repeatable): {', '.join(SCENARIO_NAMES)}")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"where results.json, report.md and charts go (default "
                        f"{DEFAULT_OUT})")


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    password = None
    if args.password_prompt:
        if not args.dsn:
            parser.error("--password-prompt needs --dsn")
        password = getpass.getpass("Password for the --dsn server: ")
    try:
        doc = run(dsn=args.dsn, quick=args.quick, scenarios=args.scenario, out_dir=args.out,
                  password=password)
    except ValueError as exc:
        parser.error(f"--dsn: {exc}" if args.dsn else str(exc))
    except SetupError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary(doc))
    print(f"\nreport: {os.path.join(args.out, 'report.md')} (results.json"
          f"{', ' + ', '.join(doc['charts']) if doc['charts'] else ''} beside it)")
    return EXIT_FAILED if any(r["status"] == "failed" for r in doc["runs"]) else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="connguard's benchmarks: every scenario, "
        "every client side by side (same as `connguard bench`).")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), parser)
