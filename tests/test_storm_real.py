"""Reconnect storms against a real MariaDB: outage, saturation, mass KILL, bad password."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any, List, Tuple

import pytest

import connguard
from tests.load import Load, pool_query, run_for
from tests.mariadb import APP_PASSWORD, MariaDB, socket_states, wait_until


def test_outage_is_bounded_and_recovers(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    pool = connguard.Pool(**server.connect_kwargs(connect_timeout=2), max_size=16,
                          checkout_timeout=5)
    load = Load(pool_query(pool), threads=64).start()
    try:
        wait_until(lambda: load.ok_rate(time.monotonic() - 1, time.monotonic()) > 0, 60,
                   message="the load to run")
        run_for(2)
        before = pool.stats()["connect_attempts"]
        stopped = time.monotonic()
        server.stop()
        run_for(4)
        during = pool.stats()["connect_attempts"] - before
        outage = time.monotonic() - stopped
        server.start()
        started = time.monotonic()
        run_for(6)
    finally:
        load.stop()
        pool.close()
    pre_rate = load.ok_rate(stopped - 2, stopped)
    first_ok = min(t + d for t, ok, d in load.calls if ok and t + d >= started)
    # "Returns to its pre-outage level": the best second after the restart, against the
    # average of the two seconds before the outage (one noisy second must not decide).
    post_rate = max(load.ok_rate(started + k / 2, started + k / 2 + 1) for k in range(2, 10))
    failures = [d for t, ok, d in load.calls if not ok and stopped + 1 <= t < started]
    assert during <= 5 * outage, f"{during} connect attempts in a {outage:.1f}s outage"
    assert first_ok - started < 1.0, f"first success {first_ok - started:.2f}s after restart"
    assert failures and statistics.median(failures) < 0.5  # callers fail fast
    assert post_rate >= 0.8 * pre_rate, (pre_rate, post_rate)


def _saturate(server: MariaDB, max_size: int, seconds: float
              ) -> Tuple[float, List[BaseException], connguard.Pool, int]:
    pool = connguard.Pool(**server.connect_kwargs(), max_size=max_size, checkout_timeout=60)
    load = Load(pool_query(pool, "SELECT SLEEP(0.005)"), threads=64).start()
    try:
        run_for(2)  # the first seconds: growing until the server says no
        attempts_after_start = pool.stats()["connect_attempts"]
        measured_from = time.monotonic()
        run_for(seconds)
        rate = load.ok_rate(measured_from, time.monotonic())
        late_attempts = pool.stats()["connect_attempts"] - attempts_after_start
    finally:
        load.stop()
    return rate, load.errors, pool, late_attempts


def test_saturation_means_waits_not_errors(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=16)
    exact_rate, exact_errors, exact_pool, _ = _saturate(server, 16, 4)
    exact_pool.close()
    wait_until(lambda: server.status("Threads_connected") <= 1, 30,
               message="the exact-size pool's connections to go")
    rate, errors, pool, late_attempts = _saturate(server, 64, 6)
    try:
        assert not exact_errors, exact_errors[:3]
        assert not errors, errors[:3]  # (only the first 20 are kept; none is the point)
        assert rate >= 0.8 * exact_rate, (rate, exact_rate)
        assert late_attempts <= 2 * 6, late_attempts  # at most 2 connect attempts/s
        assert pool.stats()["ceiling"] is not None and pool.stats()["ceiling"] <= 16
        assert socket_states(server.port).get("close_wait", 0) == 0
    finally:
        pool.close()


def test_mass_kill_replacements_take_one_attempt_each(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=20)
    errors_before = server.status("Connection_errors_max_connections")
    pool = connguard.Pool(**server.connect_kwargs(), max_size=16, checkout_timeout=30)
    load = Load(pool_query(pool, "SELECT SLEEP(0.01)"), threads=16).start()
    try:
        wait_until(lambda: pool.stats()["opened"] >= 16, 60, message="16 pooled connections")
        gate = pool._connector.gate
        assert gate is not None
        killed_at = time.monotonic()
        assert server.kill_app_connections() >= 16
        wait_until(lambda: pool.stats()["opened"] >= 32, 60, message="16 replacements")
    finally:
        load.stop()
        pool.close()
    replacements = sorted(t for t in gate.attempt_times if t >= killed_at)
    # The server answers, so nothing is throttled (the handshake cap, 4 at a time, is all
    # that paces the replacements) and nothing is retried: one attempt per replacement.
    assert len(replacements) == 16
    assert pool.stats()["connect_failures"] == 0 and pool.stats()["breaker"] == "closed"
    assert not any(isinstance(e, connguard.TooManyConnections) for e in load.errors)
    assert server.status("Connection_errors_max_connections") == errors_before


def test_bad_password_is_one_attempt(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(password="wrong-" + APP_PASSWORD[:3]),
                          max_size=4)
    try:
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(connguard.AccessDenied) as info:
                pool.connect()
            assert time.monotonic() - began < 5
            assert info.value.transient is False
        assert pool.stats()["connect_attempts"] == 3  # one per call, no retries
        assert pool.stats()["breaker"] == "closed"
    finally:
        pool.close()


def _open_many(kwargs: Any, host_gate: Any, n: int, out: Any) -> None:
    pool = connguard.Pool(**kwargs, max_size=n, host_gate=host_gate, checkout_timeout=120)
    conns = []
    try:
        for _ in range(n):
            conns.append(pool.connect())
        gate = pool._connector.gate
        out.put(list(gate.attempt_times))
    finally:
        for c in conns:
            c.close()
        pool.close()


def test_host_gate_holds_for_four_processes(mariadb: MariaDB, tmp_path: Any) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like gunicorn workers
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_many,
                         args=(mariadb.connect_kwargs(), str(tmp_path), 8, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    stamps = sorted(t for _ in procs for t in out.get(timeout=120))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(stamps) == 32
    # One bucket for the host: burst 5, then 10/s, so 32 connects need at least 2.7 s;
    # four separate gates would have needed 0.3 s.
    assert stamps[-1] - stamps[0] >= 2.5
    assert max(sum(1 for u in stamps if t <= u < t + 1.0) for t in stamps) <= 5 + 10 + 1
