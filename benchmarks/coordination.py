"""The cluster-wide budget and gate on Redis: what they cost and what they bound.

* **cold connect**: a checkout that must open a server connection (and a return that closes
  it), with and without a Redis coordinator: the lease and the shared gate add two Redis
  round trips to a path that already costs a TCP and a MySQL handshake.
* **idle checkout**: checkout and return of an idle connection, with and without: Redis is
  never asked there (the Redis commands served meanwhile are counted and reported).
* **outage**: N processes (1, 4, 16), each with threads calling ``pool.connect()`` against a
  server that refuses connections; connect attempts per second across all of them, with a
  gate per process versus one gate in Redis (and, in full mode, the host-wide file gate).

Starts its own ``redis-server`` on a free port (skipped, with a note, when it or the
``redis`` package is missing). The outage needs no server: a port nobody listens on refuses
connects as a stopped server does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pymysql

import connguard
from benchmarks.common import ScenarioResult, alternate, time_per_op
from testsupport.servers import RedisServer, free_port

LOCAL = "connguard Pool"
REDIS = "connguard Pool + Redis coordinator"
PER_PROCESS = "connguard gate per process"
HOST_GATE = "connguard host_gate (one host)"
REDIS_GATE = "connguard gate in Redis"

# Fast enough that the gate's rate is not what is measured in the cost scenarios.
UNTHROTTLED = {"max_connect_rate": 100000.0, "connect_burst": 10000, "max_handshakes": 8}


def _missing() -> Optional[str]:
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'connguard[redis]')"
    return None


# --- cost on the connect path, none on checkout ---------------------------------------------


def cold_connect(kwargs: Dict[str, Any], redis: RedisServer, rounds: int, ops: int
                 ) -> ScenarioResult:
    common = dict(kwargs, max_size=4, **UNTHROTTLED)
    pools = {LOCAL: connguard.Pool(**common),
             REDIS: connguard.Pool(**common, coordinator=redis.url, global_max=1000)}

    def op(pool: connguard.Pool) -> None:
        conn = pool.connect()  # nothing idle: opens a connection ...
        entry = conn._self_entry
        assert entry is not None
        entry.expires_at = 0.0  # ... which is past its lifetime when returned,
        conn.close()  # so the return closes it (COM_QUIT)

    try:
        measurements = alternate(rounds, {
            name: functools.partial(_time_ops, op, pool, ops)
            for name, pool in pools.items()}, "µs/op")
        opened = {name: pool.stats()["opened"] for name, pool in pools.items()}
    finally:
        for pool in pools.values():
            pool.close()
    medians = {m.client: m.median for m in measurements}
    return ScenarioResult(
        "coordination: cold connect", "checkout that opens a server connection, return that "
        "closes it (TCP + MySQL handshake), with and without a lease and the shared gate in "
        "Redis", False, measurements,
        [f"the Redis coordinator adds {medians[REDIS] - medians[LOCAL]:,.0f} µs per cold "
         "connect (a lease and a shared-gate admit: two round trips to a local Redis)",
         f"connections opened: {opened}"])


def idle_checkout(kwargs: Dict[str, Any], redis: RedisServer, rounds: int, ops: int
                  ) -> ScenarioResult:
    pools = {LOCAL: connguard.Pool(**kwargs, max_size=4),
             REDIS: connguard.Pool(**kwargs, max_size=4, coordinator=redis.url,
                                   global_max=1000, lease_ttl=600)}

    def op(pool: connguard.Pool) -> None:
        pool.connect().close()

    try:
        for pool in pools.values():
            for c in [pool.connect() for _ in range(4)]:
                c.close()
        before = redis.commands()
        measurements = alternate(rounds, {
            name: functools.partial(_time_ops, op, pool, ops)
            for name, pool in pools.items()}, "µs/op")
        sent = redis.commands() - before
        total_ops = rounds * ops
    finally:
        for pool in pools.values():
            pool.close()
    return ScenarioResult(
        "coordination: idle checkout", "checkout and return of an idle connection, with and "
        "without a Redis coordinator", False, measurements,
        [f"Redis commands served during the coordinated pool's {total_ops:,} checkouts: "
         f"{sent} (a reaper refresh every lease_ttl/3 s would be the only one)"])


# --- outage: attempts across processes ------------------------------------------------------


def _knock(pool: connguard.Pool, start_at: float, end: float) -> None:
    while time.monotonic() < start_at:
        time.sleep(0.001)
    while time.monotonic() < end:
        try:
            pool.connect().close()
        except pymysql.err.Error:
            time.sleep(0.01)  # an application pacing its retries a little


def _outage_worker(pipe: Any) -> None:
    """Runs in a spawned process: for each job, threads knock on a dead port through one pool."""
    # The breaker opening on a port nobody listens on is the scenario, not news: its WARNING
    # from every worker would bury the bench's own output.
    logging.getLogger("connguard.storm").setLevel(logging.ERROR)
    while True:
        job = pipe.recv()
        if job is None:
            pipe.close()
            return
        port, options, threads, start_at, seconds = job
        pool = connguard.Pool(host="127.0.0.1", port=port, user="bench", password="bench",
                              connect_timeout=1, max_size=threads, checkout_timeout=1,
                              **options)
        end = start_at + seconds
        workers = [threading.Thread(target=_knock, args=(pool, start_at, end))
                   for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        gate = pool._connector.gate
        attempts = sum(1 for t in (gate.attempt_times if gate else []) if start_at <= t < end)
        pool.close()
        pipe.send(attempts)


class _Workers:
    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: List[Any] = []
        self.procs: List[Any] = []
        for _ in range(count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_outage_worker, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def run(self, count: int, options: Dict[str, Any], threads: int, seconds: float) -> int:
        """Attempts made by ``count`` workers in ``seconds`` against a fresh dead port."""
        port = free_port()  # fresh: no gate, breaker or Redis key left from another run
        start_at = time.monotonic() + 0.3
        for pipe in self.pipes[:count]:
            pipe.send((port, options, threads, start_at, seconds))
        return sum(pipe.recv() for pipe in self.pipes[:count])

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        for pipe in self.pipes:
            pipe.close()


def outage(redis: RedisServer, sizes: Tuple[int, ...], rounds: int, seconds: float, threads: int,
           host_gate: bool) -> List[ScenarioResult]:
    clients: Dict[str, Dict[str, Any]] = {PER_PROCESS: {}}
    if host_gate:
        clients[HOST_GATE] = {"host_gate": True}
    clients[REDIS_GATE] = {"coordinator": redis.url}
    workers = _Workers(max(sizes))
    results = []
    try:
        workers.run(max(sizes), {}, 1, 0.2)  # warm: every worker imported and answering
        for size in sizes:
            measurements = alternate(rounds, {
                name: functools.partial(_attempt_rate, workers, size, options, threads, seconds)
                for name, options in clients.items()}, "attempts/s")
            medians = {m.client: m.median for m in measurements}
            results.append(ScenarioResult(
                f"coordination: outage attempts/s, {size} process{'es' if size > 1 else ''}",
                f"{size} process(es) x {threads} threads calling pool.connect() for "
                f"{seconds:g} s against a port that refuses connections (a server down): "
                "connect attempts per second across all processes, default gate settings",
                False, measurements,
                [f"per-process gates: {medians[PER_PROCESS]:.1f}/s; one gate in Redis: "
                 f"{medians[REDIS_GATE]:.1f}/s (the default rate is 10/s, and the breaker "
                 "lets one probe through per backoff period)"]))
    finally:
        workers.close()
    return results


def run_all(kwargs: Dict[str, Any], quick: bool) -> List[ScenarioResult]:
    missing = _missing()
    if missing is not None:
        names = ["coordination: cold connect", "coordination: idle checkout"] + [
            f"coordination: outage attempts/s, {n} process{'es' if n > 1 else ''}"
            for n in (1, 4, 16)]
        return [ScenarioResult(name, "skipped", False, [], [f"skipped: {missing}"])
                for name in names]
    redis = RedisServer().start()
    try:
        rounds = 3 if quick else 7
        results = [cold_connect(kwargs, redis, rounds, 30 if quick else 200),
                   idle_checkout(kwargs, redis, rounds, 2000 if quick else 20000)]
        results += outage(redis, (1, 4, 16), rounds=1 if quick else 3,
                          seconds=2.0 if quick else 5.0, threads=4, host_gate=not quick)
    finally:
        redis.destroy()
    return results


if __name__ == "__main__":  # python -m benchmarks.coordination [--quick]
    import sys

    from benchmarks.report import write_results
    from testsupport.servers import MariaDB, Template

    root = tempfile.mkdtemp(prefix="connguard-bench-")
    try:
        import os

        os.chmod(root, 0o755)
        template = Template(root)
        template.build()
        server = MariaDB(template, {"max_connections": 500}).start()
        try:
            began = time.monotonic()
            found = run_all(server.connect_kwargs(), "--quick" in sys.argv)
            print(f"(coordination scenarios took {time.monotonic() - began:.1f}s)")
            print(write_results(found, os.path.join(root, "out"), server.variable("version")))
        finally:
            server.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _time_ops(op: Callable[[connguard.Pool], None], pool: connguard.Pool, ops: int) -> float:
    return time_per_op(lambda: op(pool), ops)


def _attempt_rate(workers: Any, size: int, options: Dict[str, Any], threads: int,
                  seconds: float) -> float:
    return float(workers.run(size, options, threads, seconds)) / seconds
