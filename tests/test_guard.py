"""The OS resource guard: decisions with a fake clock, then real ports, fds and a real pool.

The pure tests count how often the guard measures (its cost lives there); the real ones run
a pool into an 40-port range inside a network namespace, and into a lowered RLIMIT_NOFILE,
and check that the guard refuses first, with numbers that agree with ``ss``.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import resource
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pymysql
import pytest

import connguard
from connguard import errors
from connguard.arguments import POOL_OPTIONS
from connguard.census import local_port_range
from connguard.errors import FdLimitReached, LocalPortsExhausted
from connguard.guard import (
    DEFAULT_CENSUS_TTL,
    DEFAULT_FD_RESERVE,
    FAR_TTL_FACTOR,
    GuardPolicy,
    Probes,
    ResourceGuard,
    default_port_reserve,
    far_budget,
    headroom,
    judge,
    refresh_due,
)
from connguard.tcpstates import STATE_NAMES
from tests.mariadb import APP_PASSWORD, MariaDB, fd_count, wait_until
from tests.netns import run_in_netns

# Connect-rate limiting (another feature) would only slow these tests down.
NO_STORM: Dict[str, Any] = {"storm_control": False} if "storm_control" in POOL_OPTIONS else {}

RANGE = (41000, 41999)  # 1000 ports, for the fake probes
TOTAL = RANGE[1] - RANGE[0] + 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def counts(**nonzero: int) -> Dict[str, int]:
    """A census-shaped result: every state name, zero unless given."""
    result = dict.fromkeys(STATE_NAMES.values(), 0)
    result.update(nonzero)
    return result


class FakeSystem:
    """Probes that answer with settable numbers and count how often they are asked."""

    def __init__(self, established: int = 0, time_wait: int = 0, fds: int = 10,
                 soft: Optional[int] = 100_000, hard: Optional[int] = 100_000) -> None:
        self.sockets = counts(established=established, time_wait=time_wait)
        self.fds = fds
        self.soft, self.hard = soft, hard
        self.census_calls: List[Tuple[str, int]] = []
        self.resolve_calls = 0
        self.addresses: Tuple[str, ...] = ("10.0.0.5",)

    def census(self, host: str, port: int) -> Mapping[str, int]:
        self.census_calls.append((host, port))
        return dict(self.sockets)

    def resolve(self, host: str) -> Tuple[str, ...]:
        self.resolve_calls += 1
        return self.addresses

    def probes(self) -> Probes:
        return Probes(census=self.census, fds_in_use=lambda: self.fds,
                      nofile=lambda: (self.soft, self.hard), port_range=lambda: RANGE,
                      resolve=self.resolve)


def make_guard(system: FakeSystem, clock: FakeClock, **options: Any) -> ResourceGuard:
    return ResourceGuard("db.example", 3306, clock=clock, probes=system.probes(), **options)


def admit_until_refused(guard: ResourceGuard, limit: int, tick: Callable[[], None]
                        ) -> Tuple[int, Optional[errors.ConnGuardError]]:
    """Call preflight until it refuses (or ``limit`` times); return (admitted, refusal)."""
    for admitted in range(limit):
        try:
            guard.preflight()
        except (FdLimitReached, LocalPortsExhausted) as exc:
            return admitted, exc
        tick()
    return limit, None


# --- pure decisions ---------------------------------------------------------------------------


def test_headroom_boundaries() -> None:
    assert headroom(None, 10) == "unknown"
    assert headroom(10, 10) == "refuse"  # one more would leave 9 < 10
    assert headroom(11, 10) == "near"
    assert headroom(10 + 64, 10) == "near"
    assert headroom(10 + 65, 10) == "far"
    assert headroom(1, 0) == "near"
    assert headroom(0, 0) == "refuse"


def test_default_port_reserve() -> None:
    assert default_port_reserve(60999 - 32768 + 1) == 1000  # 5 % = 1411, capped
    assert default_port_reserve(10_000) == 500
    assert default_port_reserve(40) == 2
    assert default_port_reserve(5) == 1
    assert GuardPolicy().fd_reserve == DEFAULT_FD_RESERVE
    assert GuardPolicy(port_reserve=7).ports_reserve(28232) == 7


@pytest.mark.parametrize("options", [{"fd_reserve": -1}, {"port_reserve": 1.5},
                                     {"census_ttl": -0.1}, {"fd_reserve": True}])
def test_bad_policy_is_named(options: Dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        ResourceGuard("127.0.0.1", 3306, **options)


def test_refresh_and_budget_agree() -> None:
    # The fast path (a budget of admissions) must never admit what the full rule would not.
    policy = GuardPolicy(fd_reserve=8, port_reserve=50, census_ttl=1.0)
    system = FakeSystem(established=700)
    snapshot = make_guard(system, FakeClock())._tracker._take_snapshot()
    budget = far_budget(snapshot, policy)
    assert budget == TOTAL - 700 - 50 - 64
    now = snapshot.taken_at + 0.5
    assert not refresh_due(snapshot, budget - 1, now, policy)
    assert refresh_due(snapshot, budget + 1, now + 1.0, policy)  # near now: TTL applies
    assert judge(snapshot, TOTAL - 700 - 50 - 1, policy) is None
    refusal = judge(snapshot, TOTAL - 700 - 50, policy)
    assert refusal is not None and (refusal.resource, refusal.left) == ("ports", 50)


# --- the guard with fake probes: how often it measures --------------------------------------


def test_far_from_limits_counts_once_per_far_ttl() -> None:
    system, clock = FakeSystem(established=10), FakeClock()
    guard = make_guard(system, clock)

    def connected() -> None:
        system.sockets["established"] += 1
        clock.advance(0.001)

    admitted, refusal = admit_until_refused(guard, 500, connected)
    assert (admitted, refusal) == (500, None)
    assert len(system.census_calls) == 1, "a census per connect is far too expensive"
    clock.advance(FAR_TTL_FACTOR * 1.0)  # another process may have used ports meanwhile
    guard.preflight()
    assert len(system.census_calls) == 2
    assert system.resolve_calls == 1  # the host is resolved once


def test_extrapolation_refuses_at_the_reserve_with_few_counts() -> None:
    # Nothing else changes: every admitted connect is a new established socket.
    system, clock = FakeSystem(established=100), FakeClock()
    guard = make_guard(system, clock, port_reserve=50)

    def connected() -> None:
        system.sockets["established"] += 1
        system.fds += 1
        clock.advance(0.0005)

    admitted, refusal = admit_until_refused(guard, 2000, connected)
    assert admitted == TOTAL - 100 - 50
    assert isinstance(refusal, LocalPortsExhausted)
    assert isinstance(refusal, pymysql.err.OperationalError)
    assert refusal.args[0] == 2003
    # One count at the start, one per TTL once near (the run lasts ~0.4 s), one to confirm.
    assert len(system.census_calls) <= 3
    diagnosis = refusal.diagnosis
    assert diagnosis["ports_free"] == 50 and diagnosis["port_reserve"] == 50
    assert diagnosis["census"]["established"] == TOTAL - 50
    assert diagnosis["port_range"] == RANGE
    assert diagnosis["opened_since_census"] == 0  # the refusal rests on a real count
    assert "50 of 1,000 local ports free" in str(refusal)
    assert refusal.original is None and refusal.__cause__ is None


def test_refusal_is_cached_for_the_ttl_then_rechecked() -> None:
    system, clock = FakeSystem(established=TOTAL - 10), FakeClock()
    guard = make_guard(system, clock, port_reserve=10, census_ttl=1.0)
    for _ in range(50):
        with pytest.raises(LocalPortsExhausted):
            guard.preflight()
        clock.advance(0.01)
    assert len(system.census_calls) == 1  # refusing costs nothing while the count is fresh
    system.sockets["established"] -= 5  # connections were closed elsewhere
    clock.advance(1.0)
    guard.preflight()
    assert len(system.census_calls) == 2


def test_near_the_reserve_counts_every_ttl() -> None:
    system, clock = FakeSystem(established=TOTAL - 50), FakeClock()
    guard = make_guard(system, clock, port_reserve=10, census_ttl=1.0)
    for _ in range(30):  # 30 connects over 3 s, each one held: 3 counts, not 30
        guard.preflight()
        system.sockets["established"] += 1
        clock.advance(0.1)
    assert len(system.census_calls) == 3


def test_time_wait_holds_ports_and_other_destinations_do_not() -> None:
    system, clock = FakeSystem(established=0, time_wait=TOTAL - 20), FakeClock()
    guard = make_guard(system, clock, port_reserve=10)

    def connected() -> None:
        system.sockets["established"] += 1

    admitted, refusal = admit_until_refused(guard, 100, connected)
    assert admitted == 10
    assert isinstance(refusal, LocalPortsExhausted)
    assert "TIME_WAIT" in str(refusal) and "tcp_tw_reuse" in str(refusal)
    assert system.census_calls[0] == ("10.0.0.5", 3306)  # counted toward this server only


def test_guards_toward_one_server_share_the_count_and_the_opens() -> None:
    system, clock = FakeSystem(established=TOTAL - 200), FakeClock()
    probes = system.probes()
    first = ResourceGuard("db.example", 3306, clock=clock, probes=probes, port_reserve=10)
    second = ResourceGuard("db.example", 3306, clock=clock, probes=probes, port_reserve=100)

    def connect(guard: ResourceGuard) -> None:
        guard.preflight()
        system.sockets["established"] += 1

    connect(first)
    connect(second)  # no count of its own: the first one's is fresh
    assert len(system.census_calls) == 1
    for _ in range(97):
        connect(first)  # 99 admitted in all: 101 ports left
    connect(second)  # one more would leave 100: fine...
    with pytest.raises(LocalPortsExhausted):
        second.preflight()  # ...but not another, though this guard opened only two itself
    connect(first)  # the first guard's reserve is smaller
    other = ResourceGuard("db2.example", 3306, clock=clock, probes=probes)
    other.preflight()
    assert len(system.census_calls) == 3  # the refusal's confirmation + another server


def test_every_address_of_the_host_counts() -> None:
    system, clock = FakeSystem(established=300), FakeClock()
    system.addresses = ("127.0.0.1", "::1")
    guard = make_guard(system, clock, port_reserve=10)
    guard.preflight()
    snapshot = guard.snapshot()
    assert snapshot is not None and snapshot.ports_in_use == 600
    assert system.census_calls == [("127.0.0.1", 3306), ("::1", 3306)]


def test_fd_refusal_names_soft_and_hard() -> None:
    system, clock = FakeSystem(fds=20, soft=64, hard=4096), FakeClock()
    guard = make_guard(system, clock, fd_reserve=16)

    def opened() -> None:
        system.fds += 1

    admitted, refusal = admit_until_refused(guard, 100, opened)
    assert admitted == 64 - 20 - 16
    assert isinstance(refusal, FdLimitReached)
    assert (refusal.diagnosis["fd_soft"], refusal.diagnosis["fd_hard"]) == (64, 4096)
    assert refusal.diagnosis["fds_left"] == 16
    assert "raise_fd_soft_limit" in str(refusal)


def test_concurrent_connects_never_take_more_than_allowed() -> None:
    system, clock = FakeSystem(established=TOTAL - 310), FakeClock()
    guard = make_guard(system, clock, port_reserve=10)
    admitted: List[int] = []
    lock = threading.Lock()
    threads_n = 8
    start = threading.Barrier(threads_n)

    def worker() -> None:
        start.wait()
        for _ in range(100):
            try:
                guard.preflight()
            except LocalPortsExhausted:
                continue
            with lock:  # the connect made its socket
                system.sockets["established"] += 1
                admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # (TOTAL - established) - reserve; a count taken while connects are between the guard
    # and their socket misses those: at most one per thread over.
    assert 300 <= sum(admitted) <= 300 + threads_n - 1


def test_guard_raises_only_its_own_errors() -> None:
    clock = FakeClock()

    def broken(*args: Any) -> Any:
        raise RuntimeError("probe broken")

    def unresolvable(host: str) -> Tuple[str, ...]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    everything_broken = Probes(census=broken, fds_in_use=broken, nofile=broken,
                               port_range=broken, resolve=unresolvable)
    guard = ResourceGuard("no-such-host.invalid", 3306, clock=clock, probes=everything_broken)
    for _ in range(3):
        guard.preflight()  # nothing known: admit, the connect will say what is wrong
        clock.advance(FAR_TTL_FACTOR * 1.0)
    # The fd check still works when only the port side is unknown.
    system = FakeSystem(fds=60, soft=64, hard=64)
    partly = dataclasses.replace(system.probes(), resolve=unresolvable)
    guard = ResourceGuard("no-such-host.invalid", 3306, clock=clock, probes=partly,
                          fd_reserve=8)
    with pytest.raises(FdLimitReached):
        guard.preflight()


# --- real: a pool, a real MariaDB, real fds ---------------------------------------------------


def guard_of(pool: connguard.Pool) -> ResourceGuard:
    guard = pool._connector.guard
    assert isinstance(guard, ResourceGuard)
    return guard


def test_checkout_never_calls_the_guard_and_cold_connects_share_a_count(
        mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=20, **NO_STORM)
    try:
        guard = guard_of(pool)
        counted_before = guard.censuses  # another pool toward this server may have counted
        calls: List[int] = []
        real_preflight = guard.preflight

        def counted() -> None:
            calls.append(1)
            real_preflight()

        guard.preflight = counted  # type: ignore[method-assign]
        held = [pool.connect() for _ in range(20)]  # 20 cold connects
        for conn in held:
            conn.close()
        assert len(calls) == 20
        # Far from every limit: at most one count for all of them.
        assert guard.censuses - counted_before <= 1
        for _ in range(500):
            pool.connect().close()  # idle checkouts
        assert len(calls) == 20
    finally:
        pool.close()


def test_resource_guard_false_means_no_guard(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), resource_guard=False)
    try:
        assert pool._connector.guard is None
    finally:
        pool.close()
    with pytest.raises(ValueError, match="fd_reserve"):
        connguard.Pool(**mariadb.connect_kwargs(), fd_reserve=-5)


@pytest.fixture
def lowered_fd_limit() -> Iterator[Callable[[int], Tuple[int, int]]]:
    """Lower this process's soft RLIMIT_NOFILE for one test; always restored."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower(headroom: int) -> Tuple[int, int]:
        soft = fd_count() + headroom
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, original[1]))
        return soft, original[1]

    yield lower
    resource.setrlimit(resource.RLIMIT_NOFILE, original)


def _open_until_refused(pool: connguard.Pool, limit: int) -> Tuple[List[Any], BaseException]:
    held: List[Any] = []
    for _ in range(limit):
        try:
            held.append(pool.connect())
        except pymysql.err.OperationalError as exc:
            return held, exc
    raise AssertionError(f"{limit} connections opened without a refusal")


def test_fd_limit_refused_before_emfile_and_fds_return_to_baseline(
        mariadb: MariaDB, lowered_fd_limit: Callable[[int], Tuple[int, int]]) -> None:
    gc.collect()
    baseline = fd_count()
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=500, fd_reserve=10, **NO_STORM)
    held: List[Any] = []
    try:
        soft, hard = lowered_fd_limit(40)
        held, refusal = _open_until_refused(pool, 200)
        # Each connection is one socket: the guard stopped 10 short of the soft limit.
        assert isinstance(refusal, FdLimitReached), refusal
        assert refusal.original is None, "the kernel's EMFILE reached the caller"
        diagnosis = refusal.diagnosis
        assert (diagnosis["fd_soft"], diagnosis["fd_hard"]) == (soft, hard)
        assert diagnosis["fds_left"] == 10 and diagnosis["fd_reserve"] == 10
        # fd_count() saw its own listing descriptor, so 41 were free: 41 - 10 sockets.
        assert len(held) == 31
        assert f"soft limit of {soft:,}" in str(refusal)
        assert APP_PASSWORD not in str(refusal) and APP_PASSWORD not in repr(diagnosis)
    finally:
        for conn in held:
            conn.close()
        pool.close()
    wait_until(lambda: fd_count() == baseline, 30, message="fds back to the baseline")


def test_without_the_guard_the_kernel_says_emfile(
        mariadb: MariaDB, lowered_fd_limit: Callable[[int], Tuple[int, int]]) -> None:
    # The counterpart of the test above: what the guard spares the caller.
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=500, resource_guard=False,
                          **NO_STORM)
    held: List[Any] = []
    try:
        lowered_fd_limit(15)
        held, failure = _open_until_refused(pool, 100)
        assert isinstance(failure, FdLimitReached)
        assert getattr(failure.original, "args", (None,))[0] == 2003
        assert _errnos(failure) & {errno.EMFILE}
    finally:
        for conn in held:
            conn.close()
        pool.close()


def _errnos(exc: BaseException) -> set:
    """Every errno in an exception's chain (cause, context, PyMySQL's original_exception)."""
    found, seen = set(), set()
    todo: List[Any] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno:
            found.add(item.errno)
        todo += [item.__cause__, item.__context__, getattr(item, "original_exception", None),
                 getattr(item, "original", None)]
    return found


# --- real: port exhaustion inside a network namespace ----------------------------------------

NS_PORTS = (40000, 40039)  # 40 ports
NS_RESERVE = 10


SS_STATES = {"ESTAB": "established", "SYN-SENT": "syn_sent", "SYN-RECV": "syn_recv",
             "FIN-WAIT-1": "fin_wait1", "FIN-WAIT-2": "fin_wait2", "TIME-WAIT": "time_wait",
             "UNCONN": "close", "CLOSE-WAIT": "close_wait", "LAST-ACK": "last_ack",
             "LISTEN": "listen", "CLOSING": "closing"}


def ss_toward(port: int) -> Dict[str, int]:
    """Non-zero states of every TCP socket toward ``port`` in this namespace, per ``ss``."""
    out = subprocess.run(["ss", "-tanH", "state", "all", f"dport = :{port}"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    found: Dict[str, int] = {}
    for line in out.splitlines():
        if line.strip():
            state = SS_STATES[line.split()[0]]
            found[state] = found.get(state, 0) + 1
    return found


def _nonzero(census: Mapping[str, int]) -> Dict[str, int]:
    return {state: n for state, n in census.items() if n}


def _until_refused(pool: connguard.Pool, held: List[Any], limit: int) -> Dict[str, Any]:
    """Open connections into ``held`` until one fails; describe the failure."""
    for _ in range(limit):
        try:
            held.append(pool.connect())
        except pymysql.err.OperationalError as exc:
            diagnosis = getattr(exc, "diagnosis", {})
            return {"class": type(exc).__name__,
                    "operational_error": isinstance(exc, pymysql.err.OperationalError),
                    "errnos": sorted(_errnos(exc)),
                    "by_guard": diagnosis.get("refused_by") is not None,
                    "census": _nonzero(diagnosis.get("census") or {}),
                    "ports_free": diagnosis.get("ports_free"),
                    "port_reserve": diagnosis.get("port_reserve"),
                    "ss": ss_toward(3306),
                    "message": str(exc)}
    return {"class": None}


def ports_body(server: MariaDB, reserve: int) -> Dict[str, Any]:
    """Inside the namespace: a guarded pool, an unguarded one, then a guarded one on TIME_WAIT."""
    low, high = local_port_range()
    kwargs = dict(server.connect_kwargs(), max_size=1000, **NO_STORM)
    result: Dict[str, Any] = {"ports": high - low + 1}
    guarded = connguard.Pool(**kwargs, port_reserve=reserve)
    unguarded = connguard.Pool(**kwargs, resource_guard=False)
    held: List[Any] = []
    try:
        result["guarded"] = _until_refused(guarded, held, 100)
        result["guarded_opened"] = len(held)
        before = len(held)
        result["unguarded"] = _until_refused(unguarded, held, 100)
        result["unguarded_opened"] = len(held) - before
    finally:
        for conn in held:
            conn.close()
        guarded.close()
        unguarded.close()
    # Every port we used now sits in TIME_WAIT (we closed first): they still count.
    wait_until(lambda: set(ss_toward(3306)) <= {"time_wait"}, 60,
               message="closed client sockets to settle in TIME_WAIT")
    result["after_close"] = ss_toward(3306)
    fresh = connguard.Pool(**kwargs, port_reserve=reserve)
    # Pools toward one server share the guard's count, and a refusal stands for census_ttl:
    # let it age so the next connect counts the TIME_WAIT sockets afresh.
    last = guard_of(fresh).snapshot()
    assert last is not None
    wait_until(lambda: time.monotonic() - last.taken_at > DEFAULT_CENSUS_TTL, 30,
               message="the refusal's count to age past the TTL")
    held = []
    try:
        result["time_wait"] = _until_refused(fresh, held, 100)
        result["time_wait_opened"] = len(held)
    finally:
        for conn in held:
            conn.close()
        fresh.close()
    return result


@pytest.mark.netns
def test_port_exhaustion_is_refused_before_errno_99(mariadb_template: Any) -> None:
    result = run_in_netns("tests.test_guard:ports_body", mariadb_template, port_range=NS_PORTS,
                          tw_reuse=0, server_options={}, kwargs={"reserve": NS_RESERVE})
    ports = result["ports"]
    assert ports == 40
    guarded = result["guarded"]
    # The guard refused while NS_RESERVE ports were still free; no errno 99 anywhere.
    assert guarded["class"] == "LocalPortsExhausted" and guarded["operational_error"]
    assert guarded["by_guard"] and guarded["errnos"] == []
    assert result["guarded_opened"] == ports - NS_RESERVE
    assert guarded["ports_free"] == guarded["port_reserve"] == NS_RESERVE
    assert guarded["census"] == guarded["ss"] == {"established": ports - NS_RESERVE}
    assert "10 of 40 local ports free" in guarded["message"]
    assert APP_PASSWORD not in guarded["message"]
    # Without the guard the same pool runs into the kernel: errno 99 at the last port.
    unguarded = result["unguarded"]
    assert result["unguarded_opened"] == NS_RESERVE
    assert unguarded["class"] == "LocalPortsExhausted" and not unguarded["by_guard"]
    assert unguarded["errnos"] == [errno.EADDRNOTAVAIL]
    # After closing, TIME_WAIT sockets keep their ports: the guard counts them as ss does.
    time_wait = result["time_wait"]
    held_after_close = sum(result["after_close"].values())
    assert time_wait["class"] == "LocalPortsExhausted" and time_wait["by_guard"]
    assert result["time_wait_opened"] == max(0, ports - held_after_close - NS_RESERVE)
    assert time_wait["census"] == time_wait["ss"]
    assert time_wait["census"].get("time_wait", 0) >= 1
