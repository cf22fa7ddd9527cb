"""The global budget and gate across processes: real redis-server, real MariaDB, spawned workers.

Each worker is a fresh interpreter (like a gunicorn or Celery worker) running threads that
query through one ``connguard.Pool(coordinator=..., global_max=...)``; the test process
samples the server and Redis from outside while they run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pymysql
import pytest

import connguard
from connguard.coordination import CoordinatorUnavailable
from connguard.storm import StormPolicy
from tests.load import ThreadsConnected
from tests.mariadb import MariaDB, ServerFactory, free_port, wait_until
from tests.redis_server import RedisServer, fresh_redis_fixture, redis_server_fixture  # noqa: F401

TTL = 3.0  # lease TTL in these tests: a killed worker's leases are free within 3 s

# --- the worker (runs in a spawned process) -------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:120])


def _worker(kwargs: Dict[str, Any], options: Dict[str, Any], threads: int, sql: str,
            pipe: Any) -> None:
    """Query through one pool from ``threads`` threads; answer "stats" and "stop" on ``pipe``."""
    records = _Records()
    logging.getLogger("connguard.coordination").addHandler(records)
    pool = connguard.Pool(**kwargs, **options)
    stop = threading.Event()
    counts = {"ok": 0, "errors": 0}
    first_errors: List[str] = []
    lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            try:
                with pool.connect() as conn, conn.cursor() as cur:
                    cur.execute(sql)
                    cur.fetchall()
                with lock:
                    counts["ok"] += 1
            except pymysql.err.Error as exc:
                with lock:
                    counts["errors"] += 1
                    if len(first_errors) < 5:
                        first_errors.append(repr(exc))
                stop.wait(0.01)

    def report() -> Dict[str, Any]:
        gate = pool._connector.gate
        with lock:
            return {"pid": os.getpid(), "ok": counts["ok"], "errors": counts["errors"],
                    "first_errors": list(first_errors), "stats": pool.stats(),
                    "attempts": list(gate.attempt_times) if gate else [],
                    "logs": list(records.messages)}

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    pipe.send({"pid": os.getpid(), "holder": pool._budget.holder if pool._budget else None})
    try:
        while True:
            command = pipe.recv()
            if command == "stop":
                stop.set()
                for t in workers:
                    t.join(60)
            pipe.send(report())
            if command == "stop":
                return
    finally:
        pool.close()
        pipe.close()


# --- the test side --------------------------------------------------------------------------


class Fleet:
    """Spawned workers and the pipes to them; everything is stopped by close()."""

    def __init__(self, count: int, kwargs: Dict[str, Any], options: Dict[str, Any],
                 threads: int, sql: str = "SELECT SLEEP(0.02)") -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers: List[Tuple[Any, Any]] = []
        self.info: List[Dict[str, Any]] = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(kwargs, options, threads, sql, theirs),
                               daemon=True)
            proc.start()
            theirs.close()
            self.workers.append((proc, ours))
        for proc, pipe in self.workers:
            if not pipe.poll(120):
                raise AssertionError(f"worker {proc.pid} did not start")
            self.info.append(pipe.recv())

    def live(self) -> List[Tuple[Any, Any]]:
        return [(p, pipe) for p, pipe in self.workers if p.is_alive()]

    def stats(self) -> List[Dict[str, Any]]:
        replies = []
        for proc, pipe in self.live():
            pipe.send("stats")
            if not pipe.poll(60):
                raise AssertionError(f"worker {proc.pid} did not answer")
            replies.append(pipe.recv())
        return replies

    def stop(self) -> List[Dict[str, Any]]:
        live = self.live()
        for _, pipe in live:
            pipe.send("stop")
        replies = []
        for proc, pipe in live:
            if not pipe.poll(120):
                raise AssertionError(f"worker {proc.pid} did not stop")
            replies.append(pipe.recv())
            proc.join(60)
            assert proc.exitcode == 0, proc.exitcode
        return replies

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        for proc, _ in self.workers:
            if proc.pid == pid:
                proc.join(30)

    def close(self) -> None:
        for proc, pipe in self.workers:
            if proc.is_alive():
                proc.kill()
            proc.join(30)
            pipe.close()


@pytest.fixture(scope="module")
def server30(mariadb_template: Any) -> Iterator[MariaDB]:
    """One MariaDB with max_connections 30 for the module (the outage test restarts it)."""
    factory = ServerFactory(mariadb_template)
    yield factory(max_connections=30)
    factory.close()


@pytest.fixture
def fleets() -> Iterator[List[Fleet]]:
    made: List[Fleet] = []
    yield made
    for fleet in made:
        fleet.close()


def _options(redis: RedisServer, **extra: Any) -> Dict[str, Any]:
    return {"coordinator": redis.url, "global_max": 20, "lease_ttl": TTL, "max_size": 10,
            "checkout_timeout": 60, **extra}


def _redis_leases(redis: RedisServer, server: MariaDB) -> Dict[str, int]:
    with redis.client() as client:
        raw = client.hgetall(f"connguard:{{127.0.0.1:{server.port}}}:leases")
    return {k.decode(): int(v) for k, v in raw.items()}


def _all_serving(fleet: Fleet, since: Optional[List[Dict[str, Any]]] = None) -> bool:
    now = fleet.stats()
    before = {r["pid"]: r["ok"] for r in since or []}
    return all(r["ok"] > before.get(r["pid"], 0) for r in now)


def _no_errors(replies: List[Dict[str, Any]]) -> None:
    failed = [(r["pid"], r["errors"], r["first_errors"]) for r in replies if r["errors"]]
    assert not failed, failed


def test_global_cap_holds_for_eight_processes(server30: MariaDB, fresh_redis: RedisServer,
                                              fleets: List[Fleet]) -> None:
    """8 processes x 16 threads, server max_connections 30, global_max 20."""
    sampler = ThreadsConnected(server30)
    try:
        fleet = Fleet(8, server30.connect_kwargs(), _options(fresh_redis), threads=16)
        fleets.append(fleet)
        wait_until(lambda: _all_serving(fleet), 90, interval=0.2,
                   message="every process to be served")
        mark = fleet.stats()
        wait_until(lambda: _all_serving(fleet, mark), 60, interval=0.2,
                   message="every process to keep being served")
        # Each process learns the holder count at its next lease refresh (every TTL/3): on
        # a loaded machine one may still be a refresh behind; wait for the condition.
        during = wait_until(lambda: (lambda s: s if all(
            r["stats"]["lease_holders"] == 8 for r in s) else None)(fleet.stats()), 60,
            interval=0.2, message="every process to see 8 lease holders")
        replies = fleet.stop()
    finally:
        peak, _ = sampler.close()
    _no_errors(replies)
    assert peak <= 20 + 1, f"Threads_connected reached {peak}"
    held = [r["stats"]["leases_held"] for r in during]
    assert sum(held) <= 20 and all(r["stats"]["leases_global"] <= 20 for r in during), held
    assert all(r["stats"]["lease_holders"] == 8 for r in during)
    assert sum(r["stats"]["lease_waits"] for r in replies) > 0  # the cap was felt
    print(f"\npeak Threads_connected {peak} (cap 20 + 1 admin); leases per process {held}; "
          f"queries {sum(r['ok'] for r in replies)}")


def test_kill_9_frees_the_leases_within_the_ttl(server30: MariaDB, fresh_redis: RedisServer,
                                                fleets: List[Fleet]) -> None:
    sampler = ThreadsConnected(server30)
    try:
        fleet = Fleet(4, server30.connect_kwargs(), _options(fresh_redis, global_max=12),
                      threads=8)
        fleets.append(fleet)
        wait_until(lambda: _all_serving(fleet) and sum(
            _redis_leases(fresh_redis, server30).values()) == 12, 90, interval=0.2,
            message="4 processes holding all 12 leases")
        leases = _redis_leases(fresh_redis, server30)
        by_pid = {int(h.split(":")[1]): (h, n) for h, n in leases.items()}
        victim = max(by_pid, key=lambda pid: by_pid[pid][1])
        victim_holder, victim_leases = by_pid[victim]
        killed = time.monotonic()
        fleet.kill(victim)
        wait_until(lambda: victim_holder not in _redis_leases(fresh_redis, server30), 30,
                   interval=0.02, message="the killed process's leases to be dropped")
        freed = time.monotonic() - killed
        wait_until(lambda: sum(_redis_leases(fresh_redis, server30).values()) == 12, 30,
                   interval=0.02, message="the survivors to hold all 12 leases")
        recovered = time.monotonic() - killed
        replies = fleet.stop()
    finally:
        peak, _ = sampler.close()
    _no_errors(replies)
    assert victim_leases >= 1
    # Dropped by the first lease call after the TTL (survivors ask at least every second).
    assert freed <= TTL + 1.5, f"leases dropped {freed:.2f}s after kill -9"
    assert recovered <= TTL + 3.0, f"leases back in use {recovered:.2f}s after kill -9"
    assert peak <= 12 + 1, f"Threads_connected reached {peak}"
    print(f"\nkilled a process holding {victim_leases} leases: dropped after {freed:.2f}s, "
          f"all 12 in use again after {recovered:.2f}s (TTL {TTL}s); peak Threads_connected "
          f"{peak}")


def test_outage_attempts_stay_within_the_global_rate(server30: MariaDB, fresh_redis: RedisServer,
                                                     fleets: List[Fleet]) -> None:
    fleet = Fleet(6, server30.connect_kwargs(connect_timeout=2), _options(fresh_redis),
                  threads=8)
    fleets.append(fleet)
    wait_until(lambda: _all_serving(fleet), 90, interval=0.2, message="every process served")
    server30.stop()
    stopped = time.monotonic()
    wait_until(lambda: time.monotonic() - stopped >= 4, 10, interval=0.05)
    started_at = time.monotonic()
    server30.start()
    mark = fleet.stats()
    wait_until(lambda: _all_serving(fleet, mark), 30, interval=0.1,
               message="every process to be served after the restart")
    replies = fleet.stop()
    window = started_at - stopped
    attempts = sorted(t for r in mark for t in r["attempts"] if stopped <= t < started_at)
    per_process = [sum(1 for t in r["attempts"] if stopped <= t < started_at) for r in mark]
    rate, burst = 10.0, 5  # the default gate, now one for all processes
    assert len(attempts) <= rate * window + burst, (len(attempts), window)
    # One breaker for all: about one probe per backoff period for the whole fleet, where six
    # separate gates make at least one each per period (6 x 4 s / 0.25 s = 96 here).
    period = StormPolicy().backoff_max
    assert len(attempts) <= window / period + 6, (len(attempts), per_process)
    assert sum(r["stats"]["shared_refusals"] for r in mark) > 0
    print(f"\noutage {window:.1f}s: {len(attempts)} connect attempts from 6 processes "
          f"({len(attempts) / window:.2f}/s; per process {per_process})")
    assert all(r["ok"] > m["ok"] for r, m in zip(replies, mark))


def test_redis_outage_falls_back_and_coordination_resumes(
        server30: MariaDB, fresh_redis: RedisServer, fleets: List[Fleet]) -> None:
    sampler = ThreadsConnected(server30)
    try:
        fleet = Fleet(4, server30.connect_kwargs(), _options(fresh_redis, global_max=12),
                      threads=8)
        fleets.append(fleet)
        wait_until(lambda: _all_serving(fleet) and sum(
            _redis_leases(fresh_redis, server30).values()) == 12, 90, interval=0.2,
            message="4 processes holding all 12 leases")
        fresh_redis.stop()
        wait_until(lambda: all(r["stats"]["coordinator_state"] == "fallback"
                               for r in fleet.stats()), 30, interval=0.1,
                   message="every process to fall back")
        mark = fleet.stats()
        wait_until(lambda: _all_serving(fleet, mark), 30, interval=0.1,
                   message="every process to be served on its local budget")
        fresh_redis.start()  # empty: no persistence

        def coordinated() -> bool:
            now = fleet.stats()
            if not all(r["stats"]["coordinator_state"] == "ok" for r in now):
                return False
            leases = _redis_leases(fresh_redis, server30)
            by_pid = {int(h.split(":")[1]): n for h, n in leases.items()}
            return (len(by_pid) == 4 and sum(leases.values()) <= 12
                    and all(by_pid.get(r["pid"]) == r["stats"]["leases_held"] for r in now))

        wait_until(coordinated, 30, interval=0.2, message="coordination to resume")
        mark = fleet.stats()
        wait_until(lambda: _all_serving(fleet, mark), 30, interval=0.1,
                   message="every process to be served after Redis came back")
        replies = fleet.stop()
    finally:
        fresh_redis.start()
        peak, _ = sampler.close()
    _no_errors(replies)
    for r in replies:  # each process said it once each way
        assert sum("unreachable" in m for m in r["logs"]) == 1, r["logs"]
        assert sum("answers again" in m for m in r["logs"]) == 1, r["logs"]
        assert r["stats"]["coordinator_outages"] == 1
    assert peak <= 30, peak
    print(f"\nRedis stopped and restarted: peak Threads_connected {peak}; "
          f"leases {[r['stats']['leases_held'] for r in replies]}")


def test_checkout_never_touches_redis(mariadb: MariaDB, fresh_redis: RedisServer) -> None:
    """The cost of coordination is on the connect path only: idle checkouts and returns
    send nothing to Redis (counted by Redis itself)."""
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=4,
                          coordinator=fresh_redis.url, global_max=4, lease_ttl=30)
    try:
        with fresh_redis.client() as client:
            conns = [pool.connect() for _ in range(4)]
            for c in conns:
                c.close()
            before = _commands(client)
            for _ in range(2000):
                with pool.connect() as conn:
                    conn.ping(reconnect=False)
            after = _commands(client)
        assert after == before, (before, after)
        assert pool.stats()["leases_held"] == 4 and pool.stats()["opened"] == 4
        with pytest.raises(connguard.PoolTimeout):
            other = connguard.Pool(**mariadb.connect_kwargs(), max_size=4,
                                   coordinator=fresh_redis.url, global_max=4,
                                   checkout_timeout=0.5)
            try:
                other.connect()  # the budget is spent: waits, then times out naming it
            finally:
                other.close()
    finally:
        pool.close()
    with fresh_redis.client() as client:
        wait_until(lambda: not client.hgetall(
            f"connguard:{{127.0.0.1:{mariadb.port}}}:leases"), 10, message="leases dropped")


def _commands(client: Any) -> int:
    """Script and command calls Redis has served, not counting INFO itself."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


def test_fork_child_holds_no_leases(mariadb: MariaDB, fresh_redis: RedisServer) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=4,
                          coordinator=fresh_redis.url, global_max=10, lease_ttl=30)
    held = [pool.connect() for _ in range(2)]
    parent = pool._budget.holder if pool._budget else ""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it holds before and after its own connect
        code = 1
        try:
            before = pool.stats()["leases_held"]
            with pool.connect():
                after = pool.stats()["leases_held"]
            os.write(write_end, f"{before} {after} {pool._budget.holder}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    before, after, child = os.read(read_end, 256).decode().split()
    os.close(read_end)
    try:
        assert os.WEXITSTATUS(status) == 0
        assert (before, after) == ("0", "1") and child != parent
        leases = _redis_leases(fresh_redis, mariadb)
        assert leases[parent] == 2 and leases[child] == 1
        assert pool.stats()["leases_held"] == 2
    finally:
        for conn in held:
            conn.close()
        pool.close()


def test_unreachable_coordinator_fails_open_or_closed(
        mariadb: MariaDB, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    caplog.set_level(logging.WARNING, logger="connguard.coordination")
    fail_open = connguard.Pool(**mariadb.connect_kwargs(), coordinator=url, global_max=4)
    fail_closed = connguard.Pool(**mariadb.connect_kwargs(), coordinator=url, global_max=4,
                                 coordinator_fail="closed")
    try:
        for _ in range(3):
            with fail_open.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        began = time.monotonic()
        with pytest.raises(CoordinatorUnavailable) as info:
            fail_closed.connect()  # holds nothing: refused at once, not after a wait
        assert time.monotonic() - began < 5
        stats = fail_open.stats()
        assert stats["coordinator_state"] == "fallback" and stats["leases_held"] == 1
        assert fail_closed.stats()["coordinator_state"] == "refusing"
        warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # logged once for the process, not per connect
        shown = " ".join([str(info.value), repr(stats), warnings[0]])
        assert "s3cret" not in shown and ":***@127.0.0.1" in shown
    finally:
        fail_open.close()
        fail_closed.close()
