"""Storm-control policies with a fake clock: bucket, backoff, breaker, ceiling, gate."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List

import pymysql
import pytest

import connguard
from connguard.storm import Breaker, Ceiling, ConnectGate, StormPolicy, TokenBucket
from tests.fakes import FakeClock, refused, server_error


def test_token_bucket_rate_and_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0  # one token refilled after 1/rate
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


def test_backoff_grows_and_is_bounded() -> None:
    policy = StormPolicy(backoff_initial=0.1, backoff_max=0.8, backoff_jitter=0.0)
    waits = [policy.backoff(n) for n in range(1, 8)]
    assert waits[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert max(waits) == pytest.approx(0.8)
    jittered = StormPolicy(backoff_jitter=0.2)
    assert len({round(jittered.backoff(2), 6) for _ in range(20)}) > 1  # jitter spreads retries


def test_breaker_opens_after_threshold_and_probes_once() -> None:
    breaker = Breaker(threshold=3)
    err = RuntimeError("down")
    for _ in range(2):
        breaker.failed(0.0, 1.0, err)
    assert breaker.admit(0.0) == (True, False)
    breaker.failed(0.0, 1.0, err)
    assert breaker.admit(0.5) == (False, False)  # open: fail fast
    assert breaker.admit(1.0) == (True, True)  # half-open: one probe
    assert breaker.admit(1.0) == (False, False)  # the others still fail fast
    breaker.failed(1.0, 2.0, err)
    assert breaker.state == "open" and breaker.retry_after(1.5) == pytest.approx(1.5)
    assert breaker.admit(3.0) == (True, True)
    breaker.succeeded()
    assert breaker.admit(3.0) == (True, False) and breaker.failures == 0


def _open_breaker(clock: FakeClock, **policy: Any) -> ConnectGate:
    """A gate whose breaker three refused connects opened."""
    gate = ConnectGate(StormPolicy(breaker_threshold=3, backoff_jitter=0.0, **policy),
                       "127.0.0.1", 3306, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        gate.admit(clock.now + 60)
        gate.failed(refused())
    assert gate.state == "open"
    clock.slept.clear()
    return gate


def test_fail_fast_answers_an_open_breaker_with_circuit_open() -> None:
    clock = FakeClock()
    gate = _open_breaker(clock)
    with pytest.raises(connguard.CircuitOpen) as info:
        gate.admit(clock.now + 60, fail_fast=True)
    assert isinstance(info.value, pymysql.err.OperationalError)
    assert info.value.retry_after > 0
    assert isinstance(info.value.last_cause, connguard.ServerUnavailable)
    assert gate.attempts == 3 and gate.fast_failures == 1 and clock.slept == []
    clock.now += 1.0  # past the backoff: one probe goes through and closes the breaker
    assert gate.admit(clock.now + 60, fail_fast=True) is True
    gate.succeeded()
    assert gate.state == "closed"


def test_open_breaker_makes_callers_wait_for_the_probe() -> None:
    clock = FakeClock()
    gate = _open_breaker(clock, backoff_initial=0.1, backoff_max=0.25)
    opened = clock.now
    assert gate.admit(clock.now + 60) is True  # waited for the probe's turn, then probes
    assert clock.now - opened == pytest.approx(0.25)  # backoff(3) = min(0.1 x 4, 0.25)
    assert gate.fast_failures == 0 and gate.outage_waits == 1 and gate.attempts == 4


def test_deadline_before_the_next_probe_is_server_unavailable_with_the_outage() -> None:
    clock = FakeClock()
    began = clock.now
    gate = _open_breaker(clock, backoff_initial=1.0, backoff_max=1.0)
    clock.now += 0.5
    with pytest.raises(connguard.ServerUnavailable) as info:
        gate.admit(clock.now + 0.2)  # the probe is due in 0.5 s: no point in waiting
    err = info.value
    assert not isinstance(err, connguard.CircuitOpen)
    assert err.args[0] == 2003 and err.down_for == pytest.approx(clock.now - began)
    assert isinstance(err.last_cause, connguard.ServerUnavailable)
    assert err.__cause__ is err.last_cause
    assert f"for {clock.now - began:g} s (3 failures in a row)" in str(err)
    assert "ECONNREFUSED" in str(err) and gate.attempts == 3


def test_waiting_callers_go_the_moment_the_probe_succeeds() -> None:
    gate = ConnectGate(StormPolicy(breaker_threshold=1, backoff_initial=0.05, backoff_max=0.05,
                                   backoff_jitter=0.0))  # real clock, waits on a condition
    gate.admit(time.monotonic() + 60)
    gate.failed(refused())
    gate.admit(time.monotonic() + 60)  # the probe, once the 50 ms are over
    admitted: List[float] = []
    waiters = [threading.Thread(target=lambda: (gate.admit(time.monotonic() + 60),
                                                admitted.append(time.monotonic())))
               for _ in range(3)]
    for t in waiters:
        t.start()
    deadline = time.monotonic() + 30
    while gate.outage_waits < 3 and time.monotonic() < deadline:
        time.sleep(0.005)  # until all three wait for the probe's outcome
    assert not admitted
    succeeded = time.monotonic()
    gate.succeeded()
    for t in waiters:
        t.join(30)
    assert len(admitted) == 3
    assert max(admitted) - succeeded < 0.5  # woken, not polling the breaker's next window


def test_breaker_transitions_are_logged_once_each(caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="connguard.storm")
    clock = FakeClock()
    began = clock.now
    gate = _open_breaker(clock)
    for _ in range(3):  # failed probes re-open the breaker: routine, not news
        clock.now += 1.0
        gate.admit(clock.now + 60)
        gate.failed(refused())
    clock.now += 1.0
    gate.admit(clock.now + 60)
    gate.succeeded()
    gate.admit(clock.now + 60)
    gate.succeeded()
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO], records
    assert "breaker open for 127.0.0.1:3306 after 3 failures" in records[0][1]
    assert f"closed the breaker again after {clock.now - began:.1f} s" in records[1][1]


def test_gate_backs_off_between_failures() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(backoff_initial=0.1, backoff_jitter=0.0, rate=1000, burst=100),
                       clock=clock, sleep=clock.sleep)
    gate.admit(clock.now + 60)
    gate.failed(refused())
    gate.admit(clock.now + 60)
    assert clock.slept == []  # one failure alone is retried at once
    gate.failed(refused())
    gate.admit(clock.now + 60)
    assert clock.slept == pytest.approx([0.2])  # backoff from the second in a row: 0.1 x 2


def test_gate_never_taxes_a_server_that_answers() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(rate=5.0, burst=2), clock=clock, sleep=clock.sleep)
    for _ in range(50):  # a cold start of 50 connections, callers with no time to wait
        gate.admit(clock.now)
        gate.succeeded()
    assert clock.slept == [] and gate.attempts == 50


def test_gate_rate_limits_attempts_while_they_fail() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(rate=5.0, burst=2, breaker_threshold=100,
                                   backoff_initial=0.001, backoff_max=0.001,
                                   backoff_jitter=0.0), clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(12):
        gate.admit(clock.now + 60)
        gate.failed(refused())
    # The first attempt finds no failure yet; then 2 from the burst and 5/s: 9 more, 1.8 s.
    assert clock.now - start == pytest.approx(1.8, abs=0.02)
    gate.admit(clock.now + 60)
    gate.succeeded()
    before = clock.now
    for _ in range(10):  # relaxed at the first success
        gate.admit(clock.now)
        gate.succeeded()
    assert clock.now == before


def test_permanent_errors_never_count() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(breaker_threshold=1), clock=clock, sleep=clock.sleep)
    for _ in range(5):
        gate.admit(clock.now + 60)
        gate.failed(server_error(
            1045, "Access denied for user 'app'@'localhost' (using password: YES)"))
    assert gate.state == "closed" and clock.slept == []


def test_capacity_errors_back_off_without_opening_the_breaker() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(breaker_threshold=1, backoff_jitter=0.0), clock=clock,
                       sleep=clock.sleep)
    for _ in range(2):
        gate.admit(clock.now + 60)
        gate.failed(server_error(1040, "Too many connections"))
    assert gate.state == "closed"
    gate.admit(clock.now + 60)
    assert clock.slept and clock.slept[0] > 0


def test_gate_gives_up_at_the_deadline() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(rate=1.0, burst=1, breaker_threshold=10), clock=clock,
                       sleep=clock.sleep)
    gate.admit(clock.now + 60)
    gate.failed(refused())  # failing: the bucket paces attempts now
    gate.admit(clock.now + 60)
    with pytest.raises(connguard.ServerUnavailable) as info:
        gate.admit(clock.now + 0.5)  # the next token is 1 s away
    assert not isinstance(info.value, connguard.CircuitOpen)


def test_ceiling_holds_then_probes_upward() -> None:
    ceiling = Ceiling(probe_interval=2.0)
    assert ceiling.allows(100, 0.0)
    ceiling.hit(15, now=0.0)
    assert ceiling.allows(14, 0.5) and not ceiling.allows(15, 0.5)
    assert ceiling.seconds_to_probe(0.5) == pytest.approx(1.5)
    assert ceiling.allows(15, 2.0)  # one probe per interval ...
    assert not ceiling.allows(15, 2.1)  # ... not two
    ceiling.grew(16, max_size=64)
    assert ceiling.value == 16
    ceiling.grew(64, max_size=64)
    assert ceiling.value is None


@pytest.mark.parametrize("kwargs, word", [
    ({"rate": 0}, "rate"), ({"burst": 0}, "burst"), ({"max_handshakes": 1.5}, "max_handshakes"),
    ({"backoff_jitter": -1}, "backoff_jitter"), ({"breaker_threshold": True}, "breaker_threshold"),
])
def test_bad_policy_values_are_named(kwargs: Any, word: str) -> None:
    with pytest.raises(ValueError) as info:
        StormPolicy(**kwargs)
    assert word in str(info.value)




def test_the_gate_keeps_no_frame_of_a_failed_caller_alive() -> None:
    # The gate lives as long as the process; the error it keeps for its messages must not
    # keep the failed caller's frames (and their engines, pools, connections) alive with it.
    import gc
    import weakref

    class Engine:
        pass

    def fail_inside(engine: Engine) -> BaseException:
        import socket

        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        try:  # PyMySQL's own error: its socket error attached, with a traceback
            pymysql.connect(host="127.0.0.1", port=port, connect_timeout=5)
        except pymysql.err.OperationalError as exc:
            assert exc.original_exception.__traceback__ is not None
            return connguard.translate(exc, host="127.0.0.1", port=port, diagnose=False)
        raise AssertionError("connected to a closed port")

    clock = FakeClock()
    gate = ConnectGate(StormPolicy(breaker_threshold=1), "127.0.0.1", 3306, clock=clock,
                       sleep=clock.sleep)
    engine = Engine()
    alive = weakref.ref(engine)
    error = fail_inside(engine)
    gate.admit(clock.now + 60)
    gate.failed(error)
    del engine, error
    gc.collect()
    assert alive() is None
    with pytest.raises(connguard.CircuitOpen) as info:  # and the message still names it
        gate.admit(clock.now + 60, fail_fast=True)
    assert "ServerUnavailable" in str(info.value) or "cannot reach" in str(info.value)
