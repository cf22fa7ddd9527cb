"""Checkouts and returns interrupted at random by a signal handler that raises (#26).

Celery's soft time limits, ``signal.alarm`` watchdogs and Ctrl-C raise from a signal handler,
which CPython runs wherever the main thread is (at a function's entry, a loop's back edge,
after any call): inside the pool's bookkeeping, inside a ``with lock:`` block, in a
``finally:`` cleanup, half-way through reading a reply. Each test runs 20,000 checkout/return
cycles back to back under one-shot ``SIGALRM`` timers set to random fractions of a few cycles
(of a connect, when the next cycle must open one), drawn from ``random.Random`` with a fixed
seed, against a real MariaDB, and then asserts on the final state only: nothing counted in use
or opening, every connection of ``max_size`` can be checked out at once, the server holds
exactly the sessions the pool counts, and no descriptor was left open.

Half of the interrupts are a ``BaseException`` (as KeyboardInterrupt and SystemExit), half an
``Exception`` (as Celery's ``SoftTimeLimitExceeded``), which ``except Exception`` cleanup code
may catch on the way.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List

import pytest

import connguard
from connguard import driver
from tests.mariadb import MariaDB, fd_count, wait_until

SEED = 26  # the number: intervals and exception classes are drawn from it
MAX_SIZE = 8
CYCLES = 20_000
#: A timer is set to a random fraction of this many median cycles (a timer also takes some
#: 20 us to fire at all: fast cycles run a few whole ones first).
SPREAD = 3.0

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer"),
    pytest.mark.timeout(600, method="thread"),  # the signal method would use SIGALRM too
]


class Interrupt(BaseException):
    """What KeyboardInterrupt and SystemExit are: not an Exception."""


class SoftInterrupt(Exception):
    """What Celery's SoftTimeLimitExceeded is: an Exception, which cleanup code may catch."""


class Interrupter:
    """Runs cycles back to back under one-shot SIGALRM timers: each timer, set to a random
    fraction of a few cycles, interrupts one cycle (a random number of whole ones run before
    it), so the interrupts land all over a cycle. The handler raises once per timer, and only
    while cycles run (``armed``), never in the test's own bookkeeping after them."""

    def __init__(self, cycles: int, seed: int = SEED) -> None:
        self.cycles = cycles
        rng = random.Random(seed)
        # At most one interrupt per cycle: a timer (and a class) for each.
        self.fractions = [rng.random() for _ in range(cycles)]
        self.kinds = [Interrupt if rng.random() < 0.5 else SoftInterrupt for _ in range(cycles)]
        self.armed = False
        self.kind: type = Interrupt
        self.delivered: Counter = Counter()
        self.caught: Counter = Counter()
        self.unraisable: List[str] = []
        self.dropped: Counter = Counter()  # interrupts and sockets finalizers saw
        self.slow_timers = 0  # set for a cycle that connects
        self.sites: Counter = Counter()  # where the interrupts landed: file:function

    def _handler(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            self.delivered[self.kind.__name__] += 1
            if frame is not None:
                code = frame.f_code
                self.sites[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
            raise self.kind()

    def _unraisable(self, info: Any) -> None:
        # An interrupt that landed in a finalizer is dropped by CPython (printed, never
        # raised): that is how Python is. So is a socket or file dropped when interrupted
        # while being made (socket.create_connection closes it on OSError only; an open()
        # returns it into an exception): its finalizer closes it at once, with a
        # ResourceWarning; the descriptor and server session counts at the end show that
        # nothing stays open (a dropped connection object closes its socket without a
        # warning: PyMySQL's __del__). Anything else is a failure.
        if isinstance(info.exc_value, (Interrupt, SoftInterrupt)):
            self.dropped["in a finalizer"] += 1
        elif isinstance(info.exc_value, ResourceWarning):
            self.dropped["sockets and files being made"] += 1
        elif (isinstance(info.exc_value, AttributeError)
              and info.exc_value.name == "unbuffered_active"):
            # PyMySQL's MySQLResult.__del__ reads an attribute its __init__ sets: a result
            # whose __init__ was interrupted fails there (harmless; connguard's own results
            # have it as a class default).
            self.dropped["half-made PyMySQL results"] += 1
        else:
            self.unraisable.append(f"{info.exc_type.__name__}: {info.exc_value} "
                                   f"in {info.object!r}")

    @staticmethod
    def median_cycle(cycle: Callable[[], None], n: int = 300) -> float:
        """The median time of an uninterrupted cycle (after a warm-up)."""
        for _ in range(50):
            cycle()
        times = []
        for _ in range(n):
            began = time.perf_counter()
            cycle()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    def run(self, cycle: Callable[[], None], needs_connect: Callable[[], bool],
            connect_time: float) -> None:
        """``needs_connect``: the next cycle opens a connection (none is idle), which takes
        about ``connect_time``: its timer is set within that, or no connect would ever end
        (an interrupt that made the pool discard its only connection would be the last
        cycle of the test to reach a connection at all)."""
        unit = self.median_cycle(cycle)
        previous = signal.signal(signal.SIGALRM, self._handler)
        hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        done = timers = 0
        try:
            while done < self.cycles:
                self.kind = self.kinds[timers % self.cycles]
                slow = needs_connect()
                self.slow_timers += slow
                span = 1.2 * connect_time if slow else SPREAD * unit
                interval = max(1e-6, self.fractions[timers % self.cycles] * span)
                timers += 1
                try:
                    self.armed = True
                    signal.setitimer(signal.ITIMER_REAL, interval)
                    while done < self.cycles and self.armed:  # (an interrupt can be swallowed)
                        done += 1
                        cycle()
                    self.armed = False  # last: past this line the handler raises nothing
                except (Interrupt, SoftInterrupt) as exc:
                    self.caught[type(exc).__name__] += 1
        finally:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            gc.collect()  # finalizers of what the interrupts left behind run under the hook
            sys.unraisablehook = hook
        between = self.sites.pop(f"{os.path.basename(__file__)}:run", 0)  # the loop's own
        inside = sum(self.delivered.values()) - between
        print(f"\n{self.cycles} cycles of {unit * 1e6:.0f} us under {timers} timers ("
              f"{self.slow_timers} for a connect of {connect_time * 1e3:.1f} ms); interrupts "
              f"delivered {dict(self.delivered)} ({between} between cycles), reached the caller "
              f"{dict(self.caught)}; in a cycle they landed in {len(self.sites)} functions, "
              f"most in {self.sites.most_common(15)}; finalizers saw {dict(self.dropped)}")
        assert not self.unraisable, self.unraisable[:5]
        # The test must be able to fail: many cycles were interrupted somewhere inside.
        assert inside > self.cycles // 20, (inside, self.delivered)


def server_sessions(server: MariaDB) -> int:
    return len(server.app_threads())


@pytest.fixture
def baseline(mariadb: MariaDB) -> Iterator[Dict[str, int]]:
    """The application user's server sessions and this process's descriptors before."""
    gc.collect()
    wait_until(lambda: server_sessions(mariadb) == 0, 30, message="no app sessions left")
    yield {"sessions": 0, "fds": fd_count()}


def _select_one(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def _assert_pool_intact(pool: connguard.Pool, server: MariaDB, before: Dict[str, int]) -> None:
    # Handles an interrupt made the caller drop before close() go back through the reaper.
    gc.collect()
    wait_until(lambda: pool.stats()["in_use"] == 0, 30,
               message=f"nothing in use: {pool!r}, stats {pool.stats()}")
    stats = pool.stats()
    print(f"pool: opened {stats['opened']}, closed {stats['closed']} "
          f"(broken {stats['broken']}), lost handles {stats['lost']}; {pool!r}")
    assert stats["opening"] == 0 and pool._opening == 0, pool
    assert not pool._in_use and not pool._waiters, pool
    held = [pool.connect() for _ in range(MAX_SIZE)]  # all of max_size at once
    for conn in held:
        _select_one(conn)
    for conn in held:
        conn.close()
    assert pool.stats()["in_use"] == 0 and pool.stats()["idle"] == MAX_SIZE, pool
    # The server holds exactly the sessions the pool counts: none left open behind its back.
    wait_until(lambda: server_sessions(server) == MAX_SIZE, 30,
               message=f"{MAX_SIZE} app sessions on the server, {server_sessions(server)} now")
    pool.close()
    wait_until(lambda: server_sessions(server) == before["sessions"], 30,
               message="the server's app sessions gone after close()")
    assert fd_count() == before["fds"], "a descriptor was left open"


#: Connections the pool must replace are not paced (reconnect_rate): every interrupted
#: connect or lost handle would otherwise make the next cycles wait for the pace, and the
#: interrupts land in that wait instead of in the checkout and return.
UNPACED = {"reconnect_rate": 1e6, "reconnect_burst": 1000}


@pytest.fixture
def pool(mariadb: MariaDB) -> Iterator[connguard.Pool]:
    p = connguard.Pool(**mariadb.connect_kwargs(), max_size=MAX_SIZE, checkout_timeout=5,
                       **UNPACED)
    yield p
    p.close()


def connect_time(opener: Callable[[], Any]) -> float:
    """The median time ``opener`` takes to open (and close) a connection."""
    times = []
    for _ in range(10):
        began = time.perf_counter()
        opener().close()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def pool_connect_time(server: MariaDB) -> float:
    return connect_time(lambda: driver.open_connection(server.connect_kwargs()))


def test_checkout_and_return(mariadb: MariaDB, baseline: Dict[str, int],
                             pool: connguard.Pool) -> None:
    def cycle() -> None:
        conn = pool.connect()
        try:
            pass
        finally:
            conn.close()

    Interrupter(CYCLES).run(cycle, lambda: not pool._idle, pool_connect_time(mariadb))
    _assert_pool_intact(pool, mariadb, baseline)


def test_checkout_select_and_return(mariadb: MariaDB, baseline: Dict[str, int],
                                    pool: connguard.Pool) -> None:
    def cycle() -> None:
        with pool.connect() as conn:
            _select_one(conn)

    Interrupter(CYCLES).run(cycle, lambda: not pool._idle, pool_connect_time(mariadb))
    _assert_pool_intact(pool, mariadb, baseline)


def _interrupt_in(exc: BaseException) -> Any:
    """The test's interrupt, if ``exc`` is one or came of one (cause, context, ``orig``)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, (Interrupt, SoftInterrupt)):
            return exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


#: Cycles through the SQLAlchemy plugin engine: fewer than the Pool's 20,000 while it fails
#: (below): 2,000 already leave every connection counted checked out.
ENGINE_CYCLES = 2_000
NO_TLS = {"ssl_disabled": True}


@pytest.mark.skip(reason=(
    "#26 open: interrupts in SQLAlchemy's own checkout and checkin (pool/base.py: "
    "_ConnectionRecord.checkout, _finalize_fairy; a plain QueuePool engine leaks the same) and "
    "in GuardedQueuePool (_take_or_reserve, _open_reserved: its _opening) leak: after 200 "
    "cycles 1 record is counted checked out with no connection object alive, after 1,000 7 "
    "are and opening is 1, after 2,000 all 8 of pool_size; and an interrupt inside logging's "
    "Handler.acquire on this thread (SQLAlchemy logs 'Exception during reset' here) leaves "
    "the handler's lock held: the plugin tests run after it in one process then failed"))
def test_plugin_engine_connect_select(mariadb: MariaDB, baseline: Dict[str, int]) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    # Without TLS: PyMySQL >= 1.2 builds a new TLS context for each connect (~0.1 s here),
    # and nearly every interrupt costs the engine a connection (SQLAlchemy invalidates it).
    engine = sqlalchemy.create_engine(
        mariadb.url() + "?plugin=connguard", pool_size=MAX_SIZE, max_overflow=0,
        pool_timeout=5, connect_args=NO_TLS, **{f"connguard_{k}": v for k, v in UNPACED.items()})
    query = sqlalchemy.text("SELECT 1")
    pool = engine.pool

    def cycle() -> None:
        try:
            with engine.connect() as conn:
                assert conn.execute(query).scalar() == 1
        except BaseException as exc:
            # SQLAlchemy wraps an Exception raised in a statement (StatementError, the
            # interrupt as .orig), and its own cleanup may raise in place of an interrupt
            # that landed in it (Transaction.close's assert): with or without the plugin.
            # What this test looks at is the pool's state, after whatever the caller got.
            interrupt = _interrupt_in(exc)
            if interrupt is None:
                raise
            raise interrupt from None

    try:
        # The dialect's connect, which the plugin calls (PyMySQL's own TLS context each time).
        unpooled = sqlalchemy.create_engine(mariadb.url(), poolclass=sqlalchemy.pool.NullPool,
                                            connect_args=NO_TLS)
        opening = connect_time(unpooled.raw_connection)
        unpooled.dispose()
        Interrupter(ENGINE_CYCLES).run(cycle, lambda: pool.checkedin() == 0, opening)
        gc.collect()
        wait_until(lambda: pool.checkedout() == 0, 15,
                   message=f"nothing checked out: {pool.status()}")
        guarded = connguard.stats(engine)
        print(f"engine: {pool.status()}; connguard: opening {guarded['opening']}, "
              f"connects {guarded['connects']}, invalidated {guarded['invalidated']}")
        assert guarded["opening"] == 0 and guarded["waiting"] == 0, guarded
        assert pool._opening == 0, pool.status()
        held = [engine.connect() for _ in range(MAX_SIZE)]  # all of pool_size at once
        for conn in held:
            assert conn.execute(query).scalar() == 1
        for conn in held:
            conn.close()
        assert pool.checkedout() == 0 and pool.checkedin() == MAX_SIZE, pool.status()
        wait_until(lambda: server_sessions(mariadb) == MAX_SIZE, 30,
                   message=f"{MAX_SIZE} app sessions, {server_sessions(mariadb)} now")
    finally:
        engine.dispose()
    wait_until(lambda: server_sessions(mariadb) == baseline["sessions"], 30,
               message="the server's app sessions gone after dispose()")
    assert fd_count() == baseline["fds"], "a descriptor was left open"


class _InterruptAfterReleaseLock:
    """The pool's lock, which, once armed, acts as a signal handler that runs right after
    ``_release``'s ``with self._lock:`` ends: meanwhile another caller checks out (the
    handler's Python code lets other threads run), then the handler raises."""

    def __init__(self, pool: Any) -> None:
        self.inner = threading.Lock()
        self.pool = pool
        self.armed = False
        self.taken: List[Any] = []

    def acquire(self, *args: Any) -> bool:
        return self.inner.acquire(*args)

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> bool:
        return self.inner.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.inner.release()
        if self.armed and exc[0] is None and sys._getframe(1).f_code.co_name == "_release":
            self.armed = False
            self.taken.append(self.pool.connect())  # "another thread" takes the parked entry
            raise Interrupt


def test_interrupt_after_park_does_not_park_a_reused_entry(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2, checkout_timeout=5)
    try:
        lock = pool._lock = _InterruptAfterReleaseLock(pool)
        first = pool.connect()
        lock.armed = True
        with pytest.raises(Interrupt):
            first.close()
        assert lock.taken, "the interrupt never fired"
        (other,) = lock.taken
        entry = other._self_entry
        assert entry is not None
        # `other` holds the entry now: it must be counted in use only, never idle too.
        assert entry in pool._in_use
        assert entry not in pool._idle, "entry held by a caller is also idle"
        again = pool.connect()
        assert again._self_entry is not entry, "one connection checked out twice"
        again.close()
        other.close()
        assert not pool._in_use and pool._opening == 0
    finally:
        pool.close()
