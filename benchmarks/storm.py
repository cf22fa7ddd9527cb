"""Reconnect storms, every client side by side: outage, saturation, mass KILL, port churn.

The shapes are those of ``tests/test_storm_real.py``; here every client goes through them in
turn against the same throwaway server (rounds alternate between clients):

* ``pymysql (connect per request)``: what code without a pool does;
* ``sqlalchemy QueuePool`` with and without ``pool_pre_ping``, used through an engine
  (``engine.connect()``), so SQLAlchemy's own disconnect handling is in play;
* ``DBUtils PooledDB`` with its defaults (a ping on checkout);
* ``connguard Pool`` with its defaults.

Connect attempts are counted honestly for everyone: the other clients get their connections
from a ``pymysql.connections.Connection`` subclass whose ``connect()`` appends a timestamp
before connecting, which also catches PyMySQL's own reconnects (``ping(reconnect=True)``);
DBUtils reconnects through its creator, so through the same subclass. connguard counts its
own: every attempt its connect gate lets through (a call refused by the open breaker never
touches the network and is not an attempt).

The outage, saturation and mass-KILL scenarios stop, cap or KILL a server, so they need one
they started (``start_server(**options)``, e.g. a :class:`testsupport.servers.MariaDB`); port
churn only needs ``pymysql.connect`` arguments.

On servers a run started, every client connects with ``ssl_disabled=True``. Those servers
offer no TLS, so nothing changes on the wire; it only spares each connect PyMySQL's (>= 1.2)
loading of the system CA store (about 40 ms of CPU, most of it holding the GIL: the
``cold-connect`` scenario measures it), which would otherwise cap every client but connguard
(it reuses one context) at a few dozen connects per second and make these scenarios measure
that instead of how each client behaves in a storm.
"""

from __future__ import annotations

import bisect
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pymysql

import connguard
from benchmarks.common import Measurement, ScenarioResult, failure_latency
from testsupport.servers import wait_until

PLAIN = "pymysql (connect per request)"
QUEUEPOOL = "sqlalchemy QueuePool"
PRE_PING = "sqlalchemy QueuePool pre_ping"
DBUTILS = "DBUtils PooledDB"
CONNGUARD = "connguard Pool"
BUCKET = 0.1  # seconds per bar of the time series
NO_TLS: Dict[str, Any] = {"ssl_disabled": True}  # see the module docstring

Step = Callable[[str], None]
StartServer = Callable[..., Any]


def _no_step(text: str) -> None:
    pass


# --- counting connect attempts -------------------------------------------------------------------


class AttemptLog:
    """A monotonic timestamp per connect attempt, successful or not (appends are atomic)."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def record(self) -> None:
        self.times.append(time.monotonic())


def run_on(conn: Any, sql: str) -> None:
    """``sql`` on a DB-API connection, its rows read; the cursor and the connection closed
    (a pooled one goes back to its pool)."""
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql)
            cur.fetchall()
        finally:
            cur.close()
    finally:
        conn.close()


def counting_connect(log: AttemptLog) -> Callable[..., pymysql.connections.Connection]:
    """``pymysql.connect`` that logs every connect, PyMySQL's own reconnects included."""

    class CountedConnection(pymysql.connections.Connection):
        def connect(self, sock: Any = None) -> None:
            log.record()
            super().connect(sock)

    def connect(**kwargs: Any) -> pymysql.connections.Connection:
        return CountedConnection(**kwargs)

    return connect


class _CountingDBAPI:
    """What DBUtils takes as ``creator``: our ``connect``, PyMySQL for everything else."""

    def __init__(self, connect: Callable[..., Any]) -> None:
        self.connect = connect
        self.dbapi = pymysql
        self.threadsafety = pymysql.threadsafety


# --- the clients ---------------------------------------------------------------------------------


class Client:
    """One contender: a unit of work (checkout, one query, return) and its connect attempts."""

    name = ""
    pool: Any = None  # closed with the client

    def __init__(self) -> None:
        self.log = AttemptLog()

    def work(self, sql: str) -> None:
        run_on(self.checkout(), sql)

    def checkout(self) -> Any:
        """A DB-API connection whose close() ends the unit of work."""
        raise NotImplementedError

    def attempt_times(self) -> List[float]:
        return list(self.log.times)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class EngineClient(Client):
    """A SQLAlchemy engine: a checkout, the statement, the return (its connects are counted
    by whoever made it); disposed when the client closes."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine

    def work(self, sql: str) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql(sql).fetchall()

    def close(self) -> None:
        self.engine.dispose()


class PlainClient(Client):
    name = PLAIN

    def __init__(self, kwargs: Dict[str, Any], size: int, timeout: float) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.connect = counting_connect(self.log)

    def checkout(self) -> Any:
        return self.connect(**self.kwargs)


class QueuePoolClient(EngineClient):
    """SQLAlchemy's QueuePool as it is, its connects counted through ``creator``."""

    def __init__(self, kwargs: Dict[str, Any], size: int, timeout: float,
                 pre_ping: bool) -> None:
        from sqlalchemy import create_engine

        log = AttemptLog()
        connect = counting_connect(log)
        super().__init__(create_engine(
            "mysql+pymysql://", creator=lambda: connect(**kwargs), pool_size=size,
            max_overflow=0, pool_timeout=timeout, pool_pre_ping=pre_ping))
        self.log = log
        self.name = PRE_PING if pre_ping else QUEUEPOOL


class DBUtilsClient(Client):
    name = DBUTILS

    def __init__(self, kwargs: Dict[str, Any], size: int, timeout: float) -> None:
        from dbutils.pooled_db import PooledDB

        super().__init__()
        self.pool = PooledDB(_CountingDBAPI(counting_connect(self.log)), maxconnections=size,
                             mincached=0, maxcached=size, blocking=True, **kwargs)

    def checkout(self) -> Any:
        return self.pool.connection()


class ConnguardClient(Client):
    name = CONNGUARD

    def __init__(self, kwargs: Dict[str, Any], size: int, timeout: float) -> None:
        super().__init__()
        self.pool = connguard.Pool(**kwargs, max_size=size, checkout_timeout=timeout)
        # The gate is shared per destination and policy and outlives this pool: only the
        # attempts made while this client exists are its own.
        self._since = time.monotonic()

    def checkout(self) -> Any:
        return self.pool.connect()

    def attempt_times(self) -> List[float]:
        gate = getattr(getattr(self.pool, "_connector", None), "gate", None)
        times = list(getattr(gate, "attempt_times", ()))
        return [t for t in times if t >= self._since]


ClientFactory = Callable[[Dict[str, Any], int, float], Client]

CLIENTS: Dict[str, ClientFactory] = {
    PLAIN: PlainClient,
    QUEUEPOOL: lambda kw, size, timeout: QueuePoolClient(kw, size, timeout, pre_ping=False),
    PRE_PING: lambda kw, size, timeout: QueuePoolClient(kw, size, timeout, pre_ping=True),
    DBUTILS: DBUtilsClient,
    CONNGUARD: ConnguardClient,
}


def error_code(exc: BaseException) -> Optional[int]:
    """The MySQL/client error code of ``exc`` (SQLAlchemy's wrapped ``.orig`` included)."""
    inner = getattr(exc, "orig", None) or exc
    args = getattr(inner, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


# --- load ----------------------------------------------------------------------------------------


class Load:
    """``threads`` threads running ``sql`` through a client until stopped; every call kept."""

    def __init__(self, client: Client, threads: int, sql: str = "SELECT 1") -> None:
        self.client = client
        self.sql = sql
        self.calls: List[Tuple[float, float, bool]] = []  # (start, end, ok)
        self.codes: Counter = Counter()  # error code (or class name) -> count
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._work, daemon=True)
                         for _ in range(threads)]

    def _work(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.client.work(self.sql)
                ok = True
            except Exception as exc:  # every client raises its own kinds: count them all
                ok = False
                code = error_code(exc)
                # PyMySQL's InterfaceError(0, '') (a closed connection) has no real code.
                self.codes[code if code else type(exc).__name__] += 1
            self.calls.append((began, time.monotonic(), ok))
            if not ok:
                self._stop.wait(0.01)  # an application pacing its retries a little

    def __enter__(self) -> Load:
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(120)

    def ok_between(self, start: float, end: float) -> int:
        return sum(1 for t, _, ok in self.calls if ok and start <= t < end)

    def errors_between(self, start: float, end: float) -> int:
        return sum(1 for _, e, ok in self.calls if not ok and start <= e < end)

    def rate(self, start: float, end: float, ok: bool = True) -> float:
        """Calls per second that began in [start, end) and succeeded (``ok``) or failed."""
        return sum(1 for t, _, good in self.calls if good is ok and start <= t < end) / (
            end - start)

    def first_success_after(self, moment: float) -> Optional[float]:
        """Seconds from ``moment`` to the end of the first successful call ending after it."""
        ends = [e for _, e, ok in self.calls if ok and e >= moment]
        return min(ends) - moment if ends else None


def run_for(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


def count_between(times: Sequence[float], start: float, end: float) -> int:
    ordered = sorted(times)
    return bisect.bisect_left(ordered, end) - bisect.bisect_left(ordered, start)


def peak_per_window(times: Sequence[float], width: float = BUCKET) -> int:
    """The most timestamps that fall in any window ``width`` seconds long."""
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        best = max(best, bisect.bisect_left(ordered, t + width) - i)
    return best


def buckets(times: Sequence[float], start: float, end: float, width: float = BUCKET
            ) -> List[int]:
    """How many of ``times`` fall in each ``width``-second bucket from ``start`` to ``end``."""
    n = max(1, int((end - start) / width + 0.999))
    counts = [0] * n
    for t in times:
        if start <= t < end:
            counts[min(n - 1, int((t - start) / width + 1e-9))] += 1
    return counts


# --- sockets (asked from `ss`, so connguard does not grade itself) ----------------------------


def _addresses(host: str) -> List[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except OSError:
        return [host]


def tcp_states(host: str, port: int) -> Dict[str, int]:
    """This host's TCP sockets toward ``host:port`` by state (every process, TIME_WAIT too).

    Read from ``ss`` when it is installed, else from connguard's census.
    """
    if shutil.which("ss") is None:
        found = connguard.census(host, port)
        return {state: n for state, n in found.items() if n}
    out = subprocess.run(["ss", "-tanH", "state", "all", f"dport = :{port}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    wanted = set(_addresses(host))
    counts: Counter = Counter()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        peer = fields[4].rsplit(":", 1)[0].strip("[]")
        if peer.startswith("::ffff:"):
            peer = peer[len("::ffff:"):]
        if peer in wanted:
            state = fields[0].lower().replace("-", "_")
            counts["established" if state == "estab" else state] += 1
    return dict(counts)


class Admin:
    """One root session over the unix socket, kept for a round: asking the server while a
    client hammers it must not cost a connect (and PyMySQL's SSL context) per question."""

    def __init__(self, server: Any) -> None:
        self.conn = server.admin_connection()

    def rows(self, sql: str, args: Any = None) -> List[Tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def status(self, name: str) -> int:
        return int(self.rows("SHOW GLOBAL STATUS LIKE %s", (name,))[0][1])

    def app_threads(self) -> List[int]:
        """Thread ids of every session but this one and the server's own."""
        return [int(r[0]) for r in self.rows(
            "SELECT id FROM information_schema.processlist WHERE id <> CONNECTION_ID() "
            "AND user NOT IN ('system user', 'event_scheduler', 'root')")]

    def kill_all(self) -> int:
        """KILL every application session within milliseconds."""
        ids = self.app_threads()
        with self.conn.cursor() as cur:
            for tid in ids:
                with contextlib.suppress(pymysql.err.MySQLError):  # 1094: already gone
                    cur.execute(f"KILL {int(tid)}")
        return len(ids)

    def close(self) -> None:
        self.conn.close()


def _is_loopback(host: str) -> bool:
    return all(a.startswith("127.") or a == "::1" for a in _addresses(host))


def _server_time_wait(host: str, port: int) -> int:
    """TIME_WAIT sockets on this host whose *local* port is the server's (loopback only)."""
    if not _is_loopback(host) or shutil.which("ss") is None:
        return 0
    out = subprocess.run(["ss", "-tanH", "state", "time-wait", f"sport = :{port}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return len(out.splitlines())


def _drain(server: Any) -> None:
    """Wait until the previous client's server connections are gone."""
    wait_until(lambda: len(server.app_threads()) == 0, 60,
               message="the previous client's connections to go")


#: Each client's metrics, one dict per round.
Runs = Dict[str, List[Dict[str, float]]]


def _measurements(clients: Sequence[str], unit: str, runs: Runs,
                  key: str) -> List[Measurement]:
    return [Measurement(name, unit, [run[key] for run in runs[name]]) for name in clients]


# --- outage --------------------------------------------------------------------------------------


def outage_round(server: Any, factory: ClientFactory, threads: int, size: int, steady: float,
                 down: float, after: float
                 ) -> Tuple[Dict[str, float], Dict[str, Any], Counter]:
    """One client through one restart: (metrics, time series, errors seen by kind)."""
    client = factory(server.connect_kwargs(connect_timeout=2, **NO_TLS), size, 5.0)
    try:
        with Load(client, threads) as load:
            wait_until(lambda: load.first_success_after(0.0) is not None, 60,
                       message="the load to run")
            run_for(steady)
            stopped = time.monotonic()
            server.stop()
            run_for(down)
            restarting = time.monotonic()
            server.start()
            started = time.monotonic()
            run_for(after)
            ended = time.monotonic()
    finally:
        client.close()
    attempts = client.attempt_times()
    recovery = load.first_success_after(started)
    failed = sorted(e - t for t, e, ok in load.calls if not ok and stopped <= t < started)
    origin = stopped - min(steady, 0.5)
    metrics = {
        "attempts_per_s": count_between(attempts, stopped, started) / (started - stopped),
        "errors": float(load.errors_between(stopped, ended)),
        "late_errors": float(sum(1 for t, _, ok in load.calls if not ok and t >= started)),
        "recovery": after if recovery is None else recovery,
        "recovered": float(recovery is not None),
        "failed_call_ms": failed[len(failed) // 2] * 1000 if failed else 0.0,
    }
    series = {
        "attempts": buckets(attempts, origin, ended),
        "errors": buckets([e for _, e, ok in load.calls if not ok], origin, ended),
        "ok": buckets([e for _, e, ok in load.calls if ok], origin, ended),
        "stop": round(stopped - origin, 3), "restart": round(restarting - origin, 3),
        "ready": round(started - origin, 3),
    }
    return metrics, series, load.codes


def _rounds(server: Any, clients: Sequence[str], rounds: int, step: Step,
            one_round: Callable[[str], Tuple[Dict[str, float], Counter]]
            ) -> Tuple[Runs, Dict[str, Counter]]:
    """``rounds`` rounds of each client in turn against ``server`` (destroyed after): each
    client's metrics per round and the error codes its callers saw."""
    runs: Runs = {name: [] for name in clients}
    codes: Dict[str, Counter] = {name: Counter() for name in clients}
    try:
        for r in range(rounds):
            for name in clients:
                step(f"{name}, round {r + 1}/{rounds}")
                metrics, seen = one_round(name)
                runs[name].append(metrics)
                codes[name].update(seen)
                _drain(server)
    finally:
        server.destroy()
    return runs, codes


def _medians(clients: Sequence[str], runs: Runs, key: str, form: str) -> str:
    """"name value, ...": each client's median of ``key`` over its rounds, as ``form``."""
    return ", ".join(f"{name} " + form.format(
        Measurement(name, "", [r[key] for r in runs[name]]).median) for name in clients)


def outage(start_server: StartServer, quick: bool, step: Step = _no_step,
           clients: Sequence[str] = tuple(CLIENTS)) -> List[ScenarioResult]:
    """The server stops for a while and comes back on the same port under 64 threads."""
    threads, size = 64, 16
    rounds, steady, down, after = (1, 0.3, 0.8, 0.8) if quick else (3, 1.0, 4.0, 3.0)
    series: Dict[str, Any] = {}
    server = start_server()

    def one_round(name: str) -> Tuple[Dict[str, float], Counter]:
        metrics, timeline, seen = outage_round(server, CLIENTS[name], threads, size,
                                               steady, down, after)
        series.setdefault(name, timeline)  # the first round's, for the chart
        return metrics, seen

    runs, codes = _rounds(server, clients, rounds, step, one_round)
    chart = {"kind": "timeline", "bucket_s": BUCKET, "clients": series}
    params = {"threads": threads, "pool_size": size, "outage_s": down, "after_s": after,
              "rounds": rounds}
    shape = (f"{threads} threads run `SELECT 1` through a pool of {size} (plain PyMySQL: a "
             f"connection per call; a caller retries 10 ms after a failure); the server is "
             f"stopped for {down:g} s, then started on the same port")
    return [
        ScenarioResult("outage: connect attempts", f"{shape}: connects tried per second "
                       "from the stop until the server accepts again.", False,
                       _measurements(clients, "/s", runs, "attempts_per_s"),
                       params=params, series=chart),
        ScenarioResult("outage: application errors", f"{shape}: failed calls from the stop to "
                       f"{after:g} s after the restart. A client that answers every call at "
                       "once while the server is down fails the more often the faster it "
                       "answers (see the failed-call latency); connguard's callers wait for "
                       "the server within their checkout timeout (5 s here), so only "
                       "statements cut off by the stop fail.",
                       False, _measurements(clients, "errors", runs, "errors"), params=params,
                       notes=[_codes_note(codes)]),
        failure_latency(ScenarioResult(
            "outage: failed-call latency", "Median duration of a failed call while the server "
            "is down (fail fast: lower is better).", False,
            _measurements(clients, "ms", runs, "failed_call_ms"), params=params)),
        ScenarioResult("outage: recovery", "Seconds from the server accepting connections "
                       "again to the first successful call.", False,
                       _measurements(clients, "s", runs, "recovery"), params=params,
                       notes=_recovery_notes(runs, after)),
        ScenarioResult("outage: errors after the restart", "Failed calls that began after "
                       "the server accepted connections again.", False,
                       _measurements(clients, "errors", runs, "late_errors"), params=params),
    ]


DBUTILS_NOTE = ("DBUtils' cursor re-executes a statement that failed on a lost connection "
                "(safe for SELECT, not for every write), so its callers see fewer errors.")


def _codes_note(codes: Dict[str, Counter]) -> str:
    """Which errors each client's callers saw, e.g. ``2013 x16``."""
    def kinds(counter: Counter) -> str:
        return ", ".join(f"{code} x{n}" for code, n in counter.most_common(4)) or "none"
    return "errors seen (MySQL code or class, all rounds): " + "; ".join(
        f"{name}: {kinds(counter)}" for name, counter in codes.items())


def _recovery_notes(runs: Runs, after: float) -> List[str]:
    return [f"{name}: no successful call within {after:g} s of the restart in "
            f"{sum(1 for r in rs if not r['recovered'])} of {len(rs)} rounds (counted as "
            f"{after:g} s)" for name, rs in runs.items() if not all(r["recovered"] for r in rs)]


# --- saturation ----------------------------------------------------------------------------------


def saturation_round(server: Any, factory: ClientFactory, threads: int, size: int,
                     warm: float, seconds: float) -> Tuple[Dict[str, float], Counter]:
    client = factory(server.connect_kwargs(**NO_TLS), size, 60.0)
    try:
        with Load(client, threads, "SELECT SLEEP(0.005)") as load:
            began = time.monotonic()
            run_for(warm)  # the first seconds: growing until the server says no
            measured_from = time.monotonic()
            run_for(seconds)
            ended = time.monotonic()
        close_wait = tcp_states("127.0.0.1", server.port).get("close_wait", 0)
    finally:
        client.close()
    return {"throughput": load.ok_between(measured_from, ended) / (ended - measured_from),
            "errors": float(load.errors_between(began, time.monotonic())),
            "close_wait": float(close_wait),
            "attempts_per_s": count_between(client.attempt_times(), measured_from, ended)
            / (ended - measured_from)}, load.codes


def saturation(start_server: StartServer, quick: bool, step: Step = _no_step,
               clients: Sequence[str] = tuple(CLIENTS)) -> List[ScenarioResult]:
    """64 threads, a server capped at 16 connections, pools allowed 64."""
    threads, cap, size = 64, 16, 64
    rounds, warm, seconds = (1, 0.5, 0.8) if quick else (3, 2.0, 5.0)
    server = start_server(max_connections=cap)
    runs, codes = _rounds(server, clients, rounds, step, lambda name: saturation_round(
        server, CLIENTS[name], threads, size, warm, seconds))
    params = {"threads": threads, "max_connections": cap, "pool_size": size,
              "warm_s": warm, "measured_s": seconds, "rounds": rounds}
    shape = (f"{threads} threads run `SELECT SLEEP(0.005)`; the server allows {cap} "
             f"connections, the pools {size}")
    attempts = _medians(clients, runs, "attempts_per_s", "{:.1f}")
    return [
        ScenarioResult("saturation: throughput", f"{shape}: successful calls per second after "
                       f"the first {warm:g} s.", True,
                       _measurements(clients, "calls/s", runs, "throughput"), params=params,
                       series={"kind": "bars"},
                       notes=[f"connect attempts per second in that window: {attempts}"]),
        ScenarioResult("saturation: application errors", f"{shape}: failed calls over the "
                       f"whole round ({warm + seconds:g} s), the first seconds included.",
                       False, _measurements(clients, "errors", runs, "errors"), params=params,
                       notes=[_codes_note(codes)]),
        ScenarioResult("saturation: CLOSE_WAIT left", "Sockets toward the server in "
                       "CLOSE_WAIT when the load stops (the pool still open).", False,
                       _measurements(clients, "sockets", runs, "close_wait"), params=params),
    ]


# --- mass KILL -----------------------------------------------------------------------------------


def mass_kill_round(server: Any, factory: ClientFactory, threads: int, size: int,
                    window: float) -> Tuple[Dict[str, float], Counter]:
    admin = Admin(server)
    client = factory(server.connect_kwargs(**NO_TLS), size, 30.0)
    pooled = not isinstance(client, PlainClient)
    try:
        with Load(client, threads, "SELECT SLEEP(0.01)") as load:
            wait_until(lambda: len(admin.app_threads()) >= (size if pooled else 1), 60,
                       message=f"{client.name} to hold its connections")
            refused_before = admin.status("Connection_errors_max_connections")
            killed_at = time.monotonic()
            killed = admin.kill_all()
            run_for(window)
            ended = time.monotonic()
            refused = admin.status("Connection_errors_max_connections") - refused_before
    finally:
        client.close()
        admin.close()
    after = sorted(t for t in client.attempt_times() if killed_at <= t < ended)
    replaced = after[:killed]
    codes = Counter({code: n for code, n in load.codes.items()})
    return {"errors": float(load.errors_between(killed_at, ended)),
            "refused": float(refused),
            "peak": float(peak_per_window(after)),
            "spread": replaced[-1] - replaced[0] if len(replaced) >= 2 else 0.0,
            "killed": float(killed)}, codes


def mass_kill(start_server: StartServer, quick: bool, step: Step = _no_step,
              clients: Sequence[str] = tuple(CLIENTS)) -> List[ScenarioResult]:
    """Every application connection KILLed at once; how the clients replace them."""
    threads, size, cap = 16, 16, 20
    rounds, window = (1, 1.2) if quick else (3, 3.0)
    server = start_server(max_connections=cap + 1)  # + the benchmark's own admin session
    runs, codes = _rounds(server, clients, rounds, step, lambda name: mass_kill_round(
        server, CLIENTS[name], threads, size, window))
    params = {"threads": threads, "pool_size": size, "max_connections": cap,
              "window_s": window, "rounds": rounds}
    shape = (f"{threads} threads run `SELECT SLEEP(0.01)` through a pool of {size} "
             f"(server max_connections {cap}); every application connection is KILLed at "
             "once")
    spread = _medians(clients, runs, "spread", "{:.2f} s")
    return [
        ScenarioResult("mass KILL: application errors", f"{shape}: failed calls in the "
                       f"{window:g} s after the KILL.", False,
                       _measurements(clients, "errors", runs, "errors"), params=params,
                       notes=[_codes_note(codes), DBUTILS_NOTE]),
        ScenarioResult("mass KILL: peak reconnects", "Most connect attempts in any 100 ms "
                       "after the KILL (replacements spread out: lower is better).", False,
                       _measurements(clients, "per 100 ms", runs, "peak"), params=params,
                       notes=["time from the first to the last replacement of the killed "
                              f"connections: {spread}"]),
        ScenarioResult("mass KILL: 1040 refusals", "Connections the server refused with "
                       "1040 Too many connections after the KILL "
                       "(Connection_errors_max_connections).", False,
                       _measurements(clients, "refusals", runs, "refused"), params=params),
    ]


# --- port churn toward TIME_WAIT -----------------------------------------------------------------


def _churn(connect: Callable[..., Any], kwargs: Dict[str, Any], seconds: float) -> int:
    requests = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn = connect(**kwargs)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
        finally:
            conn.close()
        requests += 1
    return requests


def _churn_round(connect: Callable[..., Any], kwargs: Dict[str, Any], host: str, port: int,
                 seconds: float) -> Dict[str, float]:
    """One contender's round: requests for ``seconds``, and the TIME_WAIT they left."""
    before = tcp_states(host, port).get("time_wait", 0)
    server_side = _server_time_wait(host, port)
    began = time.monotonic()
    requests = _churn(connect, kwargs, seconds)
    elapsed = time.monotonic() - began
    with contextlib.suppress(Exception):
        connguard.close_all()  # its pool's own connections end this round too
    added = max(0, tcp_states(host, port).get("time_wait", 0) - before)
    return {"time_wait": float(added), "rate": requests / elapsed,
            "per_1000": added * 1000.0 / max(1, requests),
            "server_side": float(max(0, _server_time_wait(host, port) - server_side))}


def port_churn(kwargs: Dict[str, Any], quick: bool, step: Step = _no_step,
               no_tls: bool = False) -> List[ScenarioResult]:
    """Connect-per-request code for N seconds: the TIME_WAIT sockets it leaves behind.

    ``no_tls``: connect with ``ssl_disabled=True`` (for a server this run started, which
    offers no TLS: see the module docstring); otherwise ``kwargs`` exactly as given.
    """
    rounds, seconds = (2, 0.75) if quick else (3, 5.0)
    kwargs = dict(kwargs, **NO_TLS) if no_tls else kwargs
    host, port = str(kwargs.get("host") or "localhost"), int(kwargs.get("port") or 3306)
    contenders: Dict[str, Callable[..., Any]] = {"pymysql.connect": pymysql.connect,
                                                 "connguard.connect": connguard.connect}
    runs: Runs = {name: [] for name in contenders}
    try:
        for r in range(rounds):
            for name, connect in contenders.items():
                step(f"{name}, round {r + 1}/{rounds}")
                runs[name].append(_churn_round(connect, kwargs, host, port, seconds))
    finally:
        connguard.close_all()
    names = list(contenders)
    params = {"seconds": seconds, "rounds": rounds}
    shape = (f"One thread connects, runs `SELECT 1` and closes, for {seconds:g} s "
             "(connguard.connect: the same code with the drop-in)")
    notes = [f"TIME_WAIT per 1,000 requests: {_medians(names, runs, 'per_1000', '{:.0f}')}"]
    if _is_loopback(host):
        notes.append("the server is on this host: whichever side closes first keeps the "
                     "TIME_WAIT, and the server's side (not counted above; it holds no local "
                     "port of ours) got " + _medians(names, runs, "server_side", "{:.0f}"))
    if no_tls:
        notes.append("connects with ssl_disabled=True (the throwaway server offers no TLS)")
    return [
        ScenarioResult("port churn: TIME_WAIT left", f"{shape}: sockets toward the server "
                       "in TIME_WAIT afterwards, added by the round (each holds a local port "
                       "for 60 s).", False,
                       _measurements(names, "sockets", runs, "time_wait"), params=params,
                       notes=notes),
        ScenarioResult("port churn: requests", f"{shape}: requests per second.", True,
                       _measurements(names, "req/s", runs, "rate"), params=params),
    ]
