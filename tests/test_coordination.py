"""Coordination: the Lua scripts against a real redis-server, fallback decisions with a fake
clock, option validation. (Pools of many processes against MariaDB: test_coordination_real.)"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Optional

import pymysql
import pytest

import connguard
from connguard import coordination
from connguard.coordination import (
    BackendDown,
    Budget,
    Census,
    CoordinatedGate,
    Coordinator,
    CoordinatorUnavailable,
    GateVerdict,
    Health,
    LeaseUnavailable,
)
from connguard.redis_coordination import RedisCoordinator
from connguard.storm import ConnectGate, StormPolicy
from tests.fakes import FakeClock
from tests.fakes import refused as refused_error
from tests.mariadb import wait_until
from tests.redis_server import RedisServer, fresh_redis_fixture, redis_server_fixture  # noqa: F401

DEST = "10.0.0.5:3306"


def _lease(coord: RedisCoordinator, holder: str, want: bool = True, held: int = 0,
           released: int = 0, resync: bool = False, cap: int = 4, ttl: float = 30.0) -> Census:
    return coord.lease(DEST, holder, want=want, held=held, released=released, resync=resync,
                       cap=cap, ttl=ttl, needy_ttl=1.5)


@pytest.fixture
def coords(fresh_redis: RedisServer) -> Any:
    """Two coordinators on the same Redis: two processes, as far as Redis can tell."""
    made = [RedisCoordinator(fresh_redis.url) for _ in range(2)]
    yield made
    for c in made:
        c.close()


# --- the lease script -----------------------------------------------------------------------


def test_leases_are_granted_up_to_the_cap(coords: Any) -> None:
    a, b = coords
    granted = [_lease(a, "a", held=n) for n in range(3)]
    assert [c.granted for c in granted] == [True, True, True]
    assert granted[-1].total == 3 and granted[-1].mine == 3 and granted[-1].holders == 1
    c = _lease(b, "b")
    assert c.granted and c.total == 4 and c.holders == 2 and c.share == 2
    refused = _lease(b, "b", held=1)
    assert not refused.granted and refused.total == 4 and refused.mine == 1
    assert a.holders(DEST) == {"a": 3, "b": 1}


def test_released_leases_go_back_to_the_budget(coords: Any) -> None:
    a, _ = coords
    for n in range(4):
        assert _lease(a, "a", held=n).granted
    assert not _lease(a, "a", held=4).granted
    census = _lease(a, "a", want=False, held=2, released=2)  # a refresh that sends releases
    assert census.total == 2 and census.mine == 2
    assert _lease(a, "a", held=2).granted


def test_a_silent_holder_loses_its_leases_after_the_ttl(coords: Any) -> None:
    a, b = coords
    for n in range(4):
        assert _lease(a, "dead", held=n, ttl=0.5).granted
    began = time.monotonic()
    assert not _lease(b, "alive").granted
    wait_until(lambda: _lease(b, "alive", held=0).granted, 10, interval=0.05,
               message="the silent holder's leases to expire")
    assert time.monotonic() - began < 5
    assert "dead" not in b.holders(DEST)


def test_an_unknown_holder_is_taken_at_its_word(coords: Any, fresh_redis: RedisServer) -> None:
    a, _ = coords
    for n in range(3):
        _lease(a, "a", held=n)
    with fresh_redis.client() as client:
        client.flushall()  # what a Redis restart without persistence does
    census = _lease(a, "a", want=False, held=3, released=1)
    assert census.mine == 3 and census.total == 3  # absolute count, not 0 - 1
    census = _lease(a, "a", want=False, held=1, resync=True)
    assert census.mine == 1  # after an error the process resends its count


def test_fairness_a_pool_below_its_share_gets_the_next_lease(coords: Any) -> None:
    a, b = coords
    _lease(b, "b", want=False)  # b is alive, holding nothing
    for n in range(4):
        assert _lease(a, "a", held=n).granted
    refused = _lease(b, "b")
    assert not refused.granted and refused.share == 2
    census = _lease(a, "a", want=False, held=4)
    assert census.needy == 1 and census.surplus(4) == 1  # a is told to give one back
    census = _lease(a, "a", want=False, held=3, released=1)
    assert census.total == 3
    assert not _lease(a, "a", held=3).granted  # not a: b waits below its share
    assert _lease(b, "b").granted
    census = _lease(a, "a", want=False, held=3)
    assert census.needy == 1 and census.surplus(4) == 1  # b has 1 of its share of 2
    _lease(a, "a", want=False, held=2, released=1)
    assert _lease(b, "b", held=1).granted
    census = _lease(a, "a", want=False, held=2)
    assert census.needy == 0 and census.surplus(4) == 0 and census.total == 4


def test_surplus_after_a_fallback_brings_the_total_back_under_the_cap() -> None:
    census = Census(granted=False, total=7, mine=5, holders=2, share=2, needy=0)
    assert census.surplus(cap=4) == 3
    assert Census(False, 4, 3, 2, 2, 0).surplus(4) == 0  # at the cap, nobody waits


def test_drop_forgets_the_holder(coords: Any) -> None:
    a, _ = coords
    _lease(a, "a")
    a.drop(DEST, "a")
    assert a.holders(DEST) == {}


def test_keys_expire_on_their_own(coords: Any, fresh_redis: RedisServer) -> None:
    a, _ = coords
    _lease(a, "a", ttl=10)
    a.gate_admit(DEST, 10.0, 5, 1.0)
    with fresh_redis.client() as client:
        ttls = [client.pttl(k) for k in a.lease_keys(DEST) + [a.gate_key(DEST)]]
    assert -1 not in ttls and ttls.count(-2) <= 1, ttls  # -1: no expiry; -2: no key (needy)


# --- the gate scripts -----------------------------------------------------------------------


def test_shared_bucket_is_one_for_all_processes(coords: Any) -> None:
    a, b = coords
    verdicts = [c.gate_admit(DEST, 10.0, 3, 1.0).action for c in (a, b, a, b)]
    assert verdicts == ["go", "go", "go", "wait"]
    wait = b.gate_admit(DEST, 10.0, 3, 1.0).wait
    assert 0 < wait <= 0.1
    wait_until(lambda: a.gate_admit(DEST, 10.0, 3, 1.0).action == "go", 5, interval=0.01)


def test_shared_breaker_opens_for_everyone_and_lets_one_probe(coords: Any) -> None:
    a, b = coords
    for _ in range(2):
        a.gate_failed(DEST, 3, 0.3, "ServerUnavailable: refused")
        assert b.gate_admit(DEST, 100.0, 50, 5.0).action == "go"
    a.gate_failed(DEST, 3, 0.3, "ServerUnavailable: refused")
    verdict = b.gate_admit(DEST, 100.0, 50, 5.0)
    assert verdict.action == "open" and 0 < verdict.wait <= 0.3
    assert verdict.failures == 3 and verdict.cause == "ServerUnavailable: refused"
    wait_until(lambda: b.gate_admit(DEST, 100.0, 50, 5.0).action == "probe", 5,
               interval=0.02, message="the breaker to half-open")
    busy = a.gate_admit(DEST, 100.0, 50, 5.0)
    assert busy.action == "busy" and busy.wait > 4  # one probe at a time
    b.gate_failed(DEST, 3, 0.5, "ServerUnavailable: refused")  # the probe failed
    assert a.gate_admit(DEST, 100.0, 50, 5.0).action == "open"
    wait_until(lambda: a.gate_admit(DEST, 100.0, 50, 5.0).action == "probe", 5,
               interval=0.02, message="the next probe")
    a.gate_succeeded(DEST)
    assert b.gate_admit(DEST, 100.0, 50, 5.0) == GateVerdict("go", 0.0, 0, "")


def test_a_lost_probe_lapses(coords: Any) -> None:
    a, b = coords
    for _ in range(3):
        a.gate_failed(DEST, 3, 0.05, "x")
    wait_until(lambda: a.gate_admit(DEST, 100.0, 50, 0.3).action == "probe", 5, interval=0.01)
    # Its process died mid-handshake: after the probe timeout another may probe.
    wait_until(lambda: b.gate_admit(DEST, 100.0, 50, 0.3).action == "probe", 5, interval=0.02)


def test_one_process_discovering_the_outage_makes_the_others_fail_fast(coords: Any) -> None:
    a, b = coords
    policy = StormPolicy(breaker_threshold=3, backoff_initial=0.5, backoff_max=1.0,
                         backoff_jitter=0.0)
    gates = [ConnectGate(policy, "10.0.0.5", 3306, shared=[CoordinatedGate(c, DEST, policy)])
             for c in (a, b)]
    for _ in range(3):
        gates[0].admit(time.monotonic() + 10)
        gates[0].failed(refused_error("10.0.0.5"))
    with pytest.raises(connguard.CircuitOpen) as info:
        gates[1].admit(time.monotonic() + 10, fail_fast=True)
    assert gates[1].attempts == 0  # no network: the other process's word was enough
    assert "ServerUnavailable" in str(info.value.last_cause)
    assert 0 < info.value.retry_after <= 1.0
    with pytest.raises(connguard.CircuitOpen):
        gates[1].admit(time.monotonic() + 10, fail_fast=True)
    stats = gates[1].stats()
    assert stats["fast_failures"] == 2 and stats["shared_refusals"] == 1  # asked Redis once
    # Without fail_fast a caller whose time ends before the shared probe is due gets the
    # outage, with the cause the other process reported.
    with pytest.raises(connguard.ServerUnavailable) as unavailable:
        gates[1].admit(time.monotonic() + 0.05)
    assert not isinstance(unavailable.value, connguard.CircuitOpen)
    assert "ServerUnavailable" in str(unavailable.value.last_cause)
    assert gates[1].attempts == 0


# --- fallback decisions with a fake clock ---------------------------------------------------


class FakeCoordinator(Coordinator):
    """The lease semantics in a dict, switchable off; records every call."""

    address = "fake://coordinator"

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.counts: Dict[str, int] = {}
        self.down = False
        self.calls: List[str] = []

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise BackendDown("ConnectionError: refused")

    def lease(self, destination: str, holder: str, *, want: bool, held: int, released: int,
              resync: bool, cap: int, ttl: float, needy_ttl: float) -> Census:
        self._check("lease")
        mine = held if resync or holder not in self.counts else max(
            0, self.counts[holder] - released)
        total = mine + sum(v for h, v in self.counts.items() if h != holder)
        granted = want and total < cap
        mine += granted
        self.counts[holder] = mine
        share = max(1, cap // len(self.counts))
        return Census(granted, total + granted, mine, len(self.counts), share, 0)

    def drop(self, destination: str, holder: str) -> None:
        self._check("drop")
        self.counts.pop(holder, None)

    def gate_admit(self, destination: str, rate: float, burst: int,
                   probe_timeout: float) -> GateVerdict:
        self._check("gate_admit")
        return GateVerdict("go", 0.0, 0)

    def gate_failed(self, destination: str, threshold: int, wait: float, cause: str) -> None:
        self._check("gate_failed")

    def gate_succeeded(self, destination: str) -> None:
        self._check("gate_succeeded")


def _budget(clock: FakeClock, fail: str = "open", cap: int = 4, max_size: int = 10
            ) -> Budget:
    return Budget(FakeCoordinator(clock), DEST, cap=cap, ttl=3.0, fail=fail,
                  max_size=max_size, clock=clock)


def test_health_falls_back_once_and_retries_one_caller_at_a_time(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    health = Health("redis://127.0.0.1:1/0", clock=clock, retry_initial=0.25, retry_max=1.0)
    caplog.set_level(logging.WARNING, logger="connguard.coordination")
    assert health.usable()
    for _ in range(5):
        health.down("ConnectionError: refused")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "coordinator redis://127.0.0.1:1/0 unreachable"]
    assert health.outages == 1 and not health.usable()
    clock.now += 0.25
    assert health.usable() and not health.usable()  # one caller tries, the others fall back
    health.down("ConnectionError: refused")
    clock.now += 0.25
    assert not health.usable()  # the interval doubled ...
    clock.now += 0.75
    assert health.usable()
    health.down("x")
    clock.now += 1.0
    assert health.usable()  # ... up to retry_max
    health.ok()
    assert health.up and health.usable() and health.usable()
    assert "answers again" in caplog.records[-1].getMessage()
    assert len(caplog.records) == 2


def test_budget_falls_back_to_its_share_while_the_coordinator_is_down() -> None:
    clock = FakeClock()
    budget = _budget(clock, cap=8)
    fake: Any = budget.coordinator
    fake.counts["other"] = 5  # another pool: two holders, share 4
    for _ in range(3):
        budget.acquire()
    assert not _try(budget) and budget.held == 3  # the cap: 5 + 3
    fake.down = True
    clock.now += 10
    budget.acquire()  # fallback: up to max(held then, share) = 4
    assert budget.state() == "fallback" and budget.held == 4
    with pytest.raises(LeaseUnavailable) as info:
        budget.acquire()
    assert info.value.fallback and budget.held == 4
    assert fake.calls.count("lease") == 5  # 4 answered, 1 failed, then none while down


def test_budget_that_never_reached_the_coordinator_falls_back_to_the_cap() -> None:
    clock = FakeClock()
    budget = _budget(clock, cap=3, max_size=10)
    budget.coordinator.down = True  # type: ignore[attr-defined]
    for _ in range(3):
        budget.acquire()
    assert not _try(budget)


def test_budget_failing_closed_refuses_while_down() -> None:
    clock = FakeClock()
    budget = _budget(clock, fail="closed")
    budget.acquire()
    budget.coordinator.down = True  # type: ignore[attr-defined]
    with pytest.raises(CoordinatorUnavailable) as info:
        budget.acquire()
    assert budget.state() == "refusing" and budget.held == 1
    assert isinstance(info.value, pymysql.err.OperationalError)
    assert "fake://coordinator" in str(info.value)


def test_budget_resends_its_count_when_the_coordinator_is_back() -> None:
    clock = FakeClock()
    budget = _budget(clock, cap=8)
    fake: Any = budget.coordinator
    budget.acquire()
    fake.down = True
    clock.now += 1
    budget.acquire()
    budget.acquire()  # two connections opened in fallback
    budget.release()
    fake.down = False
    fake.counts.clear()  # the coordinator came back empty
    clock.now += 1
    budget.refresh()
    assert budget.state() == "ok" and fake.counts[budget.holder] == 2 == budget.held


def test_releases_are_counted_now_and_sent_by_the_reaper() -> None:
    clock = FakeClock()
    budget = _budget(clock)
    fake: Any = budget.coordinator
    budget.acquire()
    budget.acquire()
    calls = len(fake.calls)
    budget.release()
    assert budget.held == 1 and len(fake.calls) == calls  # no I/O on release
    budget.refresh()
    assert fake.counts[budget.holder] == 1
    budget.refresh()
    assert len(fake.calls) == calls + 1  # nothing new to send, not due yet
    clock.now += 1.0  # ttl / 3
    budget.refresh()
    assert len(fake.calls) == calls + 2


def test_budget_after_fork_holds_nothing() -> None:
    clock = FakeClock()
    budget = _budget(clock)
    budget.acquire()
    parent = budget.holder
    budget.after_fork()
    assert budget.held == 0 and budget.holder != parent and budget.census is None


def test_coordinated_gate_falls_back_or_refuses_while_down() -> None:
    clock = FakeClock()
    fake = FakeCoordinator(clock)
    fake.down = True
    policy = StormPolicy()
    open_gate = CoordinatedGate(fake, DEST, policy, fail="open")
    assert open_gate.admit(clock.now + 5, clock, clock.sleep) is None
    closed_gate = CoordinatedGate(fake, DEST, policy, fail="closed")
    with pytest.raises(CoordinatorUnavailable):
        closed_gate.admit(clock.now + 5, clock, clock.sleep)
    assert fake.calls == ["gate_admit"]  # asked once; then the fallback, without asking


def _try(budget: Budget) -> bool:
    try:
        budget.acquire()
    except LeaseUnavailable:
        return False
    return True


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, word", [
    ({"global_max": 20}, "needs a coordinator"),
    ({"coordinator": "http://x", "global_max": 2}, "scheme"),
    ({"coordinator": "redis://x", "global_max": 0}, "global_max"),
    ({"coordinator": "redis://x", "coordinator_fail": "maybe"}, "coordinator_fail"),
    ({"coordinator": "redis://x", "lease_ttl": 1}, "lease_ttl"),
    ({"coordinator": 6379}, "coordinator must be"),
])
def test_bad_coordination_options_are_named(options: Dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError) as info:
        connguard.Pool(host="127.0.0.1", **options)
    assert word in str(info.value)


def test_passwords_in_coordinator_urls_are_never_shown() -> None:
    redact = coordination.redact_url
    assert redact("redis://:s3cret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    assert redact("rediss://app:s3cret@r:6380/1") == "rediss://app:***@r:6380/1"
    assert "s3cret" not in redact("unix:///run/redis.sock?db=0&password=s3cret")
    with pytest.raises(ValueError) as info:
        coordination.CoordinationSettings(coordinator="http://u:s3cret@x/0")
    assert "s3cret" not in str(info.value)


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(ImportError) as info:
        RedisCoordinator("redis://127.0.0.1:1/0")
    assert "connguard[redis]" in str(info.value)


def test_no_coordinator_by_default() -> None:
    pool = connguard.Pool(host="127.0.0.1", port=1)
    try:
        assert pool._budget is None and "leases_held" not in pool.stats()
        assert "coordinator" not in pool.stats()
    finally:
        pool.close()


def test_lease_unavailable_pickles_and_says_why() -> None:
    import pickle

    exc = LeaseUnavailable(DEST, 20, Census(False, 20, 3, 8, 2, 1), 0.1)
    assert "20 of global_max 20" in str(exc) and "8 pools" in str(exc)
    again: Optional[Any] = pickle.loads(pickle.dumps(exc))
    assert again is not None and str(again) == str(exc) and again.retry_after == 0.1
