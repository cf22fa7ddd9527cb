"""Application-shaped load for the storm tests: threads making requests until stopped."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Tuple, Type

import pymysql

import connguard
from testsupport.servers import APP_USER, MariaDB


@dataclass
class Load:
    """``threads`` threads calling ``request()`` until stopped; every call's outcome kept.

    ``request`` does one unit of application work (check out, query, return) and raises one
    of ``failures`` when it fails; a failed call is followed by a 10 ms pause, as an
    application pacing its retries a little would.
    """

    request: Callable[[], None]
    threads: int
    failures: Tuple[Type[BaseException], ...] = (pymysql.err.Error,)
    calls: List[Tuple[float, bool, float]] = field(default_factory=list)  # (start, ok, secs)
    errors: List[BaseException] = field(default_factory=list)  # the first few, for reports
    # (start, end, error) of the latest failures: what callers saw at a given moment
    recent_errors: Deque[Tuple[float, float, BaseException]] = field(
        default_factory=lambda: deque(maxlen=2000))
    error_count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: List[threading.Thread] = field(default_factory=list)

    def _work(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.request()
                ok = True
            except self.failures as exc:
                ok = False
                self.error_count += 1
                if len(self.errors) < 20:  # each holds a traceback: keep memory bounded
                    self.errors.append(exc)
                self.recent_errors.append((began, time.monotonic(), exc))
            self.calls.append((began, ok, time.monotonic() - began))
            if not ok:
                self._stop.wait(0.01)

    def start(self) -> Load:
        self._workers = [threading.Thread(target=self._work) for _ in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(120)
        assert not any(t.is_alive() for t in self._workers)

    def ok_rate(self, start: float, end: float) -> float:
        return sum(1 for t, ok, _ in self.calls if ok and start <= t < end) / (end - start)


def run_for(seconds: float) -> None:
    """Let a load run (a measurement window, not a wait for a condition)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)


def pool_query(pool: connguard.Pool, sql: str = "SELECT 1") -> Callable[[], None]:
    """One request through a connguard pool: check out, run ``sql``, return."""
    def request() -> None:
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute(sql)
            cur.fetchall()
    return request


class ThreadsConnected:
    """The server's Threads_connected (and the app user's sessions), read every 10 ms over
    one admin connection — the "+ admin" in a cap's bound — until ``close()``."""

    def __init__(self, server: MariaDB) -> None:
        self.conn = server.admin_connection()
        self.values: List[int] = []
        self.app_values: List[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
                self.values.append(int(cur.fetchone()[1]))
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                            "WHERE USER = %s", (APP_USER,))
                self.app_values.append(int(cur.fetchone()[0]))
                self._stop.wait(0.01)

    def close(self) -> Tuple[int, int]:
        """Stop sampling; the peaks of (Threads_connected, the app user's sessions)."""
        self._stop.set()
        self._thread.join(30)
        self.conn.close()
        return max(self.values), max(self.app_values)


@dataclass
class Outage:
    """What one outage did to a load: the moments that matter and every call around them.

    ``gone``: ``stop()`` returned (the server process has exited, every socket it had is
    closed); ``accepted``: the first moment a TCP connect to its port succeeded again, as a
    thread trying every 5 ms saw it (before ``start()`` returns: that also waits for a login).
    """

    load: Load
    stopped: float
    gone: float
    accepted: float
    attempts: List[float]  # connect attempts (monotonic) the client made

    def errors_after_gone(self) -> List[Tuple[float, bool, float]]:
        """Failed calls that began once the server was gone (in-flight ones excluded)."""
        return [c for c in self.load.calls if not c[1] and c[0] >= self.gone]

    def errors_while_down(self) -> List[BaseException]:
        """Errors of calls that began once the server was gone and ended before it accepted
        again (of the latest 2,000 failures)."""
        return [e for t, end, e in self.load.recent_errors
                if self.gone <= t and end < self.accepted]

    def in_flight_errors(self) -> int:
        """Failed calls that began before the server was gone (the statement was cut off)."""
        return sum(1 for t, ok, _ in self.load.calls if not ok and t < self.gone)

    def attempts_per_s_down(self, settled: float = 0.0) -> float:
        """Connect attempts per second from ``settled`` seconds after the server was gone
        until it accepted again (``settled=1`` leaves out the handshakes that were in
        flight when it died and the retries that opened the breaker)."""
        start = self.gone + settled
        down = [t for t in self.attempts if start <= t < self.accepted]
        return len(down) / (self.accepted - start)

    def waiting_at_accept(self) -> List[Tuple[float, bool, float]]:
        """Calls that were waiting when the server accepted again (began before, ended after)."""
        return [c for c in self.load.calls if c[0] < self.accepted <= c[0] + c[2]]


def _first_accept(port: int, stop: threading.Event, seen: List[float]) -> None:
    while not stop.is_set():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.005)
            continue
        seen.append(time.monotonic())
        return


def run_outage(server: MariaDB, load: Load, down: float, after: float,
               attempts: Callable[[], List[float]]) -> Outage:
    """Stop ``server`` under a running ``load`` for ``down`` seconds, start it again and let
    the load run ``after`` more; ``attempts()`` gives the client's connect attempt times."""
    stopped = time.monotonic()
    server.stop()
    gone = time.monotonic()
    run_for(down)
    seen: List[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_first_accept, args=(server.port, stop, seen))
    watcher.start()
    try:
        server.start()
    finally:
        stop.set()
        watcher.join(30)
    accepted = seen[0] if seen else time.monotonic()
    run_for(after)
    load.stop()
    return Outage(load, stopped, gone, accepted, attempts())
