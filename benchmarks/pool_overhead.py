"""Pool scenarios: checkout cost, query round trip, connect-per-request, cold connect, threads.

Every client runs against the same server in the same run; rounds alternate between clients
so a noisy neighbour hurts them all alike.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import pymysql

import connguard
from benchmarks.common import Measurement, ScenarioResult, alternate, time_per_op
from connguard import driver

PoolFactory = Callable[[Dict[str, Any], int], Tuple[Callable[[], Any], Callable[[], None]]]


def _queuepool(pre_ping: bool) -> PoolFactory:
    def make(kwargs: Dict[str, Any], size: int) -> Tuple[Callable[[], Any], Callable[[], None]]:
        from sqlalchemy import create_engine

        # Through an engine so the pool has the MySQL dialect that pre_ping needs; the
        # benchmark still times the pool's own connect()/close().
        engine = create_engine("mysql+pymysql://", creator=lambda: pymysql.connect(**kwargs),
                               pool_size=size, max_overflow=0, pool_pre_ping=pre_ping,
                               pool_timeout=120)
        return engine.pool.connect, engine.dispose
    return make


def _dbutils(kwargs: Dict[str, Any], size: int) -> Tuple[Callable[[], Any], Callable[[], None]]:
    from dbutils.pooled_db import PooledDB

    pool = PooledDB(pymysql, maxconnections=size, mincached=0, maxcached=size, blocking=True,
                    **kwargs)
    return pool.connection, pool.close


def _connguard(kwargs: Dict[str, Any], size: int) -> Tuple[Callable[[], Any], Callable[[], None]]:
    pool = connguard.Pool(**kwargs, max_size=size, checkout_timeout=120)
    return pool.connect, pool.close


POOLS: Dict[str, PoolFactory] = {
    "connguard": _connguard,
    "sqlalchemy QueuePool": _queuepool(False),
    "sqlalchemy QueuePool pre_ping": _queuepool(True),
    "DBUtils PooledDB": _dbutils,
}


def _with_pools(kwargs: Dict[str, Any], size: int, body: Callable[[Callable[[], Any]], float],
                rounds: int, unit: str) -> List[Measurement]:
    made = {name: factory(kwargs, size) for name, factory in POOLS.items()}
    try:
        for checkout, _ in made.values():  # warm: every pool opens its connections first
            conns = [checkout() for _ in range(size)]
            for conn in conns:
                conn.close()
        return alternate(rounds, {name: functools.partial(body, checkout)
                                     for name, (checkout, _) in made.items()}, unit)
    finally:
        for _, dispose in made.values():
            dispose()


def checkout_return(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    def body(checkout: Callable[[], Any]) -> float:
        return time_per_op(lambda: checkout().close(), ops)
    return ScenarioResult(
        "checkout+return", "Take an idle connection from the pool and give it back (µs/op; "
        "connguard includes its peer-closed check).", False,
        _with_pools(kwargs, 1, body, rounds, "µs"))


def _checkout_select_return(checkout: Callable[[], Any]) -> None:
    """One unit of work: a connection, ``SELECT 1`` fetched through a cursor, both closed."""
    conn = checkout()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.close()
    conn.close()


def checkout_select_return(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    def body(checkout: Callable[[], Any]) -> float:
        return time_per_op(lambda: _checkout_select_return(checkout), ops)
    return ScenarioResult(
        "checkout+SELECT 1+return", "A checkout, one `SELECT 1` and the return (µs/op).", False,
        _with_pools(kwargs, 1, body, rounds, "µs"))


def connect_per_request(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    """Code that connects, queries and closes per request, unchanged but for the import."""
    def run(connect: Callable[..., Any], n: int) -> float:
        def one() -> None:
            conn = connect(**kwargs)
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
            conn.close()
        return 1e6 / time_per_op(one, n)

    plain_ops = max(5, ops // 20)  # plain connects leave TIME_WAIT: keep the churn small
    try:
        measurements = alternate(rounds, {
            "connguard.connect": lambda: run(connguard.connect, ops),
            "pymysql.connect": lambda: run(pymysql.connect, plain_ops)}, "ops/s")
    finally:
        connguard.close_all()
    return ScenarioResult(
        "connect-per-request", "connect + SELECT 1 + close per request (ops/s).", True,
        measurements)


def cold_connect(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    """Opening a brand-new server connection (what a pool does on a miss)."""
    def run(opener: Callable[[], Any]) -> float:
        conns: List[Any] = []
        began = time.perf_counter()
        for _ in range(ops):
            conns.append(opener())
        elapsed = (time.perf_counter() - began) / ops * 1e6
        for conn in conns:
            conn.close()
        return elapsed

    clients = {
        "connguard (cached TLS context)": lambda: run(lambda: driver.open_connection(kwargs)),
        "pymysql.connect": lambda: run(lambda: pymysql.connect(**kwargs)),
    }
    return ScenarioResult(
        "cold connect", "A new connection including the handshake (µs/op). PyMySQL >= 1.2 builds "
        "a default SSL context per connect; connguard reuses one per configuration.", False,
        alternate(rounds, clients, "µs"))


def threaded_throughput(kwargs: Dict[str, Any], rounds: int, ops: int,
                        threads: int = 64, size: int = 8) -> ScenarioResult:
    def body(checkout: Callable[[], Any]) -> float:
        per_thread = max(1, ops // threads)
        start = threading.Barrier(threads + 1)

        def worker() -> None:
            start.wait()
            for _ in range(per_thread):
                _checkout_select_return(checkout)

        pool_threads = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool_threads:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in pool_threads:
            t.join()
        return per_thread * threads / (time.perf_counter() - began)

    return ScenarioResult(
        f"{threads} threads", f"{threads} threads doing checkout + SELECT 1 + return on a pool of "
        f"{size} (ops/s).", True, _with_pools(kwargs, size, body, rounds, "ops/s"))


def run_all(kwargs: Dict[str, Any], quick: bool) -> List[ScenarioResult]:
    rounds = 3 if quick else 7
    return [
        checkout_return(kwargs, rounds, 2000 if quick else 20000),
        checkout_select_return(kwargs, rounds, 500 if quick else 5000),
        connect_per_request(kwargs, rounds, 300 if quick else 2000),
        cold_connect(kwargs, rounds, 20 if quick else 100),
        threaded_throughput(kwargs, rounds, 2000 if quick else 20000),
    ]
