"""Growth decisions (connguard.admission) and the gate's outage verdicts, with fake clocks;
the deadline-cut probe against a real listening socket that never greets."""

from __future__ import annotations

import socket
import time
from typing import Any

import pymysql
import pytest

import connguard
from connguard import coordination
from connguard.admission import HANDSHAKE_GRACE, Admission, capacity_code
from connguard.connector import Connector
from connguard.storm import PROBE_LAPSE, Breaker, ConnectGate, StormPolicy
from tests.fakes import FakeClock, refused, server_error


def _admission(limit: float = 10, budget: bool = False) -> Admission:
    return Admission.for_policy(StormPolicy(max_handshakes=2, ceiling_probe=2.0), limit,
                                budget=budget)


def test_growth_is_bounded_by_limit_handshakes_and_ceiling() -> None:
    admission = _admission(limit=3)
    assert admission.may_open(held=0, opening=0, now=0.0)
    assert not admission.may_open(held=2, opening=2, now=0.0)  # the handshake cap
    assert not admission.may_open(held=3, opening=0, now=0.0)  # the limit
    wait, news = admission.refused(server_error(1040, "Too many connections"), held=1,
                                   now=0.0)
    assert wait and news is not None and "holding at 1" in news
    assert not admission.may_open(held=1, opening=0, now=1.0)
    assert admission.next_probe(1.0) == pytest.approx(1.0)
    again, news = admission.refused(server_error(1040, "Too many connections"), held=1,
                                    now=2.0)
    assert again and news is None  # the ceiling is news once
    admission.opened(held=2)
    assert admission.last_refusal is None and admission.ceiling.value == 2


def test_a_refusal_with_nothing_held_is_passed_on() -> None:
    wait, _ = _admission().refused(server_error(1040, "Too many connections"), held=0, now=0)
    assert not wait  # nothing would come back to a waiting caller


def test_outage_and_other_errors_are_never_waited_here() -> None:
    admission = _admission()
    assert admission.refused(refused(), held=3, now=0.0) == (False, None)
    assert admission.refused(KeyboardInterrupt(), held=3, now=0.0) == (False, None)


def test_a_down_coordinator_without_a_budget_is_no_reason_to_wait() -> None:
    # The shared gate's coordinator failing closed: no lease ceiling would hold the next
    # attempt back, so waiting would be a busy loop (the reviewer's repro spun 80,000 times).
    down = coordination.CoordinatorUnavailable("redis://coord", "refused", 1.0)
    assert _admission(budget=False).refused(down, held=3, now=0.0) == (False, None)
    with_budget = _admission(budget=True)
    assert with_budget.refused(down, held=3, now=0.0) == (True, None)
    assert with_budget.lease_ceiling is not None and with_budget.lease_ceiling.value == 3
    assert not with_budget.may_open(held=3, opening=0, now=0.5)


def test_handshake_cap_waits_past_the_deadline_only_for_the_grace() -> None:
    admission = _admission()
    assert admission.handshakes_only(held=5, opening=2)
    assert admission.handshakes_only(held=5, opening=2, overrun=HANDSHAKE_GRACE / 2)
    assert not admission.handshakes_only(held=5, opening=2, overrun=HANDSHAKE_GRACE)
    assert not admission.handshakes_only(held=5, opening=1)  # a slot is free: not the cap
    admission.refused(server_error(1040, "Too many connections"), held=5, now=0.0)
    assert not admission.handshakes_only(held=5, opening=2)  # the server said full


def test_pause_is_none_for_no_deadline() -> None:
    assert _admission().pause(float("inf"), 0.0) is None
    assert _admission().pause(0.5, 0.0) == 0.5


def test_capacity_code_looks_through_waits_that_gave_up() -> None:
    full = server_error(1040, "Too many connections")
    assert capacity_code(full) == 1040
    gave_up = connguard.errors.outage_error(full, 1.0, 0.5)
    assert capacity_code(gave_up) == 1040
    assert capacity_code(connguard.errors.outage_error(refused(), 1.0, 0.5)) is None


def test_one_stale_failure_does_not_make_a_pool_timeout_an_outage() -> None:
    clock = FakeClock()
    gate = ConnectGate(StormPolicy(), "127.0.0.1", 3306, clock=clock, sleep=clock.sleep)
    gate.admit(clock.now + 10)
    gate.succeeded()
    gate.admit(clock.now + 10)
    gate.failed(refused())  # one blip, then nothing failed again
    assert gate.outage(waited=1.0) is not None  # it failed during this caller's wait
    clock.now += 5.0
    assert gate.failing and gate.outage(waited=1.0) is None  # long before this wait


def test_a_probe_that_never_reports_lapses() -> None:
    breaker = Breaker(threshold=1)
    breaker.failed(0.0, 1.0, RuntimeError("down"))
    assert breaker.admit(1.0) == (True, True)  # the probe ... and its thread dies
    assert breaker.admit(2.0) == (False, False)
    assert breaker.admit(1.0 + PROBE_LAPSE + 0.1) == (True, True)


def test_a_probe_cut_short_by_the_callers_deadline_does_not_count(tmp_path: Any) -> None:
    """A server back but slow to greet: the probe's caller had 30 ms left; its handshake
    timing out says nothing about the server, so the breaker does not count it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        gate = ConnectGate(StormPolicy(backoff_jitter=0.0, breaker_threshold=3),
                           "127.0.0.1", port)
        connector = Connector({"host": "127.0.0.1", "port": port, "user": "u",
                               "password": "pw", "connect_timeout": 10}, gate=gate)
        for _ in range(3):  # bound but not listening: refused, the breaker opens (a server
            # never reached: one attempt per call)
            with pytest.raises(connguard.ServerUnavailable):
                connector.open(time.monotonic() + 5)
        assert gate.state == "open"
        gate.reached = True  # as if it had served before (then callers wait out outages)
        listener.listen(4)  # back, but it never greets
        deadline = time.monotonic() + 30
        while gate._breaker.retry_after(time.monotonic()) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(pymysql.err.OperationalError):
            connector.open(time.monotonic() + 0.03)  # takes the probe with 30 ms left
        assert gate.stats()["consecutive_failures"] == 3  # not 4: inconclusive
        assert not gate._breaker.probing  # the next caller may probe
    finally:
        listener.close()


def test_a_server_never_reached_answers_at_once() -> None:
    """A wrong port is not an outage: one attempt, the kernel's answer, as pymysql gives."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, never listening: refused
    port = listener.getsockname()[1]
    pool = connguard.Pool(host="127.0.0.1", port=port, user="u", password="pw",
                          checkout_timeout=30)
    try:
        began = time.monotonic()
        with pytest.raises(connguard.ServerUnavailable) as info:
            pool.connect()
        assert time.monotonic() - began < 5
        assert "ECONNREFUSED" in str(info.value)
        assert pool.stats()["connect_attempts"] >= 1
    finally:
        pool.close()
        listener.close()


def test_time_left_runs_to_the_deadline_then_only_for_the_handshake_cap() -> None:
    from connguard.storm import MAX_PAUSE

    admission = _admission(limit=10)
    # Before the deadline: what is left of it, whatever holds the caller back.
    assert admission.time_left(5.0, 4.0, held=2, opening=2, server_failing=True) == 1.0
    # Past it, held back only by the handshake cap of a server that answers: a pause more,
    # within the grace.
    assert admission.time_left(5.0, 5.1, held=2, opening=2, server_failing=False) == MAX_PAUSE
    assert admission.time_left(5.0, 5.0 + HANDSHAKE_GRACE, held=2, opening=2,
                               server_failing=False) is None
    # Not the cap (the pool is full), or a failing server: time is up.
    assert admission.time_left(5.0, 5.1, held=10, opening=2, server_failing=False) is None
    assert admission.time_left(5.0, 5.1, held=2, opening=0, server_failing=False) is None
    assert admission.time_left(5.0, 5.1, held=2, opening=2, server_failing=True) is None
    # A reconnect in place does not grow the pool: the cap and the grace alone count.
    assert admission.time_left(5.0, 5.1, held=10, opening=2, server_failing=False,
                               growing=False) == MAX_PAUSE
