"""Application-shaped load for the storm tests: threads making requests until stopped."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Tuple, Type

import pymysql

import connguard
from connguard.sandbox import APP_USER, MariaDB


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
