"""``GuardedQueuePool``: SQLAlchemy's ``QueuePool`` that turns "server full" into waits.

The connguard plugin puts it in place of ``QueuePool`` (``docs/sqlalchemy.md``). It changes
one method, ``_do_get`` (SQLAlchemy's template method for "give me a record"), and keeps the
rest of ``QueuePool``: the idle queue, the overflow accounting (``_inc_overflow`` /
``_dec_overflow``), ``status()``, ``dispose()``, events.

What ``_do_get`` adds, the same rules as ``connguard.Pool``:

* an **adaptive ceiling** (:class:`connguard.storm.Ceiling`): when the server refuses a new
  connection because it is full (1040, 1135, 1203, 1226) and the pool holds at least one,
  the pool stops growing past what it holds and the caller waits for a connection to come
  back, up to ``pool_timeout``, instead of getting the error. Every ``ceiling_probe``
  seconds one checkout may try one more; when it succeeds the ceiling rises by one. When the
  pool holds nothing, nothing would come back: the refusal reaches the caller as before;
* a **handshake cap**: at most ``max_handshakes`` connections of this pool are being opened
  at once, reconnects in place included (SQLAlchemy reconnecting a record after an
  invalidation or for ``pool_recycle``); other callers wait for an idle connection or a free
  slot, past ``pool_timeout`` when the cap is all that holds them while the server answers;
* during an **outage** (connects failing, see :mod:`connguard.storm`) a caller waits for the
  next probe within its ``pool_timeout``; one whose time runs out gets
  :class:`~connguard.errors.ServerUnavailable` (last cause, how long connects have failed)
  rather than SQLAlchemy's pool ``TimeoutError``;
* an idle record whose connection was invalidated (by the reaper, or after a disconnect)
  is dropped and replaced by a new connection opened under these rules, instead of being
  reconnected in place, where a refusal could not be waited out;
* with a **global budget** (``connguard_budget``, a factory of
  :class:`connguard.coordination.Budget`): a lease is taken before every new DBAPI
  connection (outside the pool's lock) and given back when the pool closes it. No lease to
  be had is handled like a capacity refusal: the pool holds at what it has, callers wait
  for a returned connection, and the pool asks again after the coordinator's hint. The
  coordinator is never asked on the checkout or return of an idle connection.

The growth rules are :class:`connguard.admission.Admission`'s, the same object
``connguard.Pool`` asks. Decisions are taken under the pool's own lock; connects, closes and
waits happen outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlalchemy.util import queue as sqla_queue

from connguard import coordination, dbapis, storm
from connguard.admission import Admission, capacity_code
from connguard.clock import Clock
from connguard.metrics import Histogram
from connguard.storm import Ceiling, ConnectGate, StormPolicy

__all__ = ["GuardedAsyncQueuePool", "GuardedQueuePool", "capacity_code"]

#: Makes the pool's Budget, given the pool's pool_size + max_overflow (one per pool: a
#: pool made again by ``dispose()`` gets a new one).
BudgetFactory = Callable[[int], coordination.Budget]
#: The connect gate of the engine's destination, if any (the plugin's connector may change).
GateSource = Callable[[], Optional[ConnectGate]]

log = logging.getLogger("connguard.sqlalchemy")

#: The policy a GuardedQueuePool built without one uses (StormPolicy's defaults).
DEFAULT_POLICY = StormPolicy()

#: ``record.info`` key: when the connection went idle (monotonic), for the plugin's reaper.
IDLE_SINCE = "connguard_idle_since"

class GuardedQueuePool(QueuePool):
    """A ``QueuePool`` with connguard's adaptive ceiling and handshake cap.

    Takes ``QueuePool``'s arguments, plus (keyword only, so ``create_engine`` never takes
    them from its own keywords) ``connguard_policy``: the :class:`~connguard.storm.StormPolicy`
    whose ``max_handshakes`` and ``ceiling_probe`` apply, None for no handshake cap (storm
    control off); ``connguard_budget``, a factory of the pool's global-budget
    :class:`~connguard.coordination.Budget` (None: no global budget); ``connguard_gate``,
    a callable returning the engine's connect gate (to tell an outage from a busy pool);
    and ``connguard_clock`` for tests.
    """

    def __init__(self, creator: Any, *, connguard_policy: Optional[StormPolicy] = DEFAULT_POLICY,
                 connguard_budget: Optional[BudgetFactory] = None,
                 connguard_gate: Optional[GateSource] = None,
                 connguard_clock: Clock = time.monotonic, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self._clock = connguard_clock
        # Re-entrant: the garbage collector may return a forgotten connection (SQLAlchemy's
        # finalizer calls _do_return_conn) in the very thread that holds the lock, inside any
        # allocation; with a plain lock that thread would wait on itself for ever.
        self._cond = threading.Condition(threading.RLock())
        self._opening = 0  # connections being opened right now (in place ones included)
        self._waiting = 0  # callers looking for a record; seen outside the lock: waiting
        self._in_place_waiting = 0  # reconnects in place waiting for a handshake slot
        self._local = self._new_local()  # the deadline of this thread's checkout
        self._counts: Counter = Counter()
        self._waited = Histogram()  # checkouts that waited (observed under self._cond)
        # Where the engine's gate and the budget come from, in one attribute: this object
        # stays below 30 attributes, CPython's limit for the compact layout that keeps every
        # ``self.x`` of the checkout path fast (tests/test_architecture.py).
        self._wiring: Tuple[Optional[GateSource], Optional[BudgetFactory]] = (
            connguard_gate, connguard_budget)
        self._budget: Optional[coordination.Budget] = None
        if connguard_budget is not None:
            self._budget = connguard_budget(self._max_total_or(sys.maxsize))
        self._configure(connguard_policy)
        # Every new DBAPI connection, in-place reconnects included, goes through the pool's
        # _invoke_creator (set from the creator by Pool.__init__).
        self._invoke_creator = self._guarded_creator(  # type: ignore[assignment]
            self._invoke_creator)

    def _configure(self, policy: Optional[StormPolicy]) -> None:
        self.connguard_policy = policy
        self._admission = Admission.for_policy(policy, self._max_total(),
                                               budget=self._budget is not None)

    def recreate(self) -> GuardedQueuePool:
        # QueuePool.recreate builds self.__class__ with QueuePool's arguments (what
        # engine.dispose() uses); the policy goes with them, the learnt ceiling does not.
        pool = super().recreate()
        assert isinstance(pool, GuardedQueuePool)
        pool._clock = self._clock
        gate_source, budget_factory = self._wiring
        pool._wiring = (gate_source, pool._wiring[1])
        if budget_factory is not None and pool._budget is None:
            pool._wiring = (gate_source, budget_factory)
            pool._budget = budget_factory(pool._max_total_or(sys.maxsize))
        pool._configure(self.connguard_policy)
        return pool

    # -- how a caller waits: overridden for async engines (GuardedAsyncQueuePool) ----------
    @staticmethod
    def _new_local() -> Any:
        """Where a checkout keeps its deadline and slot while it connects: per thread."""
        return threading.local()

    def _wait_locked(self, timeout: Optional[float], for_record: bool = False) -> None:
        """Under the lock: wait up to ``timeout`` (None: until woken) for a return or a
        freed slot (``for_record``: a checkout's wait, which a return may serve). A record
        returned since the caller looked (by the garbage collector, in this very thread: the
        lock is re-entrant) means no wait."""
        if for_record and not self._pool.empty():
            return
        self._cond.wait(timeout)

    def _max_total_or(self, unlimited: int) -> int:
        total = self._max_total()
        return unlimited if total == sys.maxsize else total

    # -- bookkeeping (under self._cond) ----------------------------------------------------
    def _held(self) -> int:
        """Records this pool has: idle, checked out, and being opened (QueuePool counts the
        ones being opened in ``_overflow`` already)."""
        return self._pool.maxsize + self._overflow

    def _max_total(self) -> int:
        if self._max_overflow == -1:
            return sys.maxsize
        return self._pool.maxsize + self._max_overflow

    def _may_open(self, now: float) -> bool:
        """May one more connection be opened now? (see Admission)"""
        return self._admission.may_open(self._held(), self._opening, now)

    def _slot_freed(self) -> None:
        """Under the lock: a handshake slot (or a record) is free. Reconnects in place wait
        on the same condition as checkouts, for a different thing: wake them all then, so
        that a checkout cannot swallow the wake-up meant for one of them."""
        if self._in_place_waiting:
            self._cond.notify_all()
        elif self._waiting:
            self._cond.notify()

    def _gate(self) -> Optional[ConnectGate]:
        source = self._wiring[0]
        return source() if source is not None else None

    def _server_failing(self) -> bool:
        gate = self._gate()
        return gate is not None and gate.failing

    # -- checkout --------------------------------------------------------------------------
    def _do_get(self) -> Any:
        # The fast path: an idle record, no lock of ours. Nothing but the assignment happens
        # inside ``except Empty``: an error raised there (a failed connect, the checkout
        # timeout) would carry the queue's Empty as its __context__, in every traceback.
        try:
            record = self._pool.get(False)
        except sqla_queue.Empty:
            record = None
        if record is not None:
            if record.dbapi_connection is not None:
                return record
            self._drop_empty(record)
        return self._wait_or_open(self._checkout_deadline_from_now())

    def _checkout_deadline_from_now(self) -> float:
        return float("inf") if self._timeout is None else self._clock() + self._timeout

    def _wait_or_open(self, deadline: float) -> Any:
        """A record for a checkout not served at once: one returned (waiting for it until
        ``deadline``) or one opened in a connect slot reserved for it."""
        # A reconnect in place later in this checkout keeps its deadline (set here, off the
        # fast path: a checkout served at once has nearly all of it left).
        self._local.checkout_deadline = deadline
        while True:
            record = self._take_or_reserve(deadline)
            if record is None:  # a connect slot was reserved for us
                record = self._open_reserved(deadline)
                if record is None:  # the server is full: wait for a returned one
                    continue
                return record
            if record.dbapi_connection is not None:
                return record
            self._drop_empty(record)

    def _idle_record(self) -> Any:
        """An idle record, or None. Nothing else happens inside ``except Empty``: an error
        raised there (a failed connect, the checkout timeout) would carry the queue's
        ``Empty`` as its ``__context__``, and every traceback would show it."""
        try:
            return self._pool.get(False)
        except sqla_queue.Empty:
            return None

    def _take_or_reserve(self, deadline: float) -> Any:
        """An idle record, or None with a connect slot reserved (overflow counted); waits
        for one or the other until ``deadline``, then raises SQLAlchemy's TimeoutError."""
        with self._cond:
            # Counted before the first look at the queue: a record put back after that look
            # finds us counted, and notifies (see _do_return_conn). Seen from outside the
            # lock, only callers inside wait() are counted.
            self._waiting += 1
            try:
                return self._take_or_reserve_locked(deadline)
            finally:
                self._waiting -= 1

    def _take_or_reserve_locked(self, deadline: float) -> Any:
        counted = False
        began = 0.0  # when this caller started to wait (timed from here: no timeout math)
        while True:
            record = self._idle_record()
            if record is not None:
                if counted:  # waited for it
                    self._waited.observe(self._clock() - began)
                return record
            now = self._clock()
            if self._may_open(now):
                if counted:  # waited for a connect slot
                    self._waited.observe(now - began)
                reserved = self._inc_overflow()
                assert reserved, "overflow is only raised under the pool's lock"
                self._opening += 1
                return None
            remaining = self._admission.time_left(deadline, now, self._held(), self._opening,
                                                  self._server_failing())
            if remaining is None:
                self._counts["timeouts"] += 1
                raise self._timeout_error()
            if not counted:
                self._counts["waits"] += 1
                counted, began = True, now
            self._wait_locked(self._admission.pause(remaining, now), for_record=True)

    def _open_reserved(self, deadline: float) -> Any:
        """Open a connection in the reserved slot. Returns the record, or None when the
        refusal means "wait" (server full, no lease: see Admission.refused); raises any
        other error."""
        budget = self._budget
        if budget is not None:
            try:
                budget.acquire()  # outside the pool's lock, like the connect
            except BaseException as exc:
                if self._connect_refused(exc):
                    return None
                raise
            self._local.leased = True  # the lease the creator is to use
        self._local.deadline = deadline
        self._local.reserved = True
        try:
            record = self._create_connection()
        except BaseException as exc:
            if self._connect_refused(exc):
                return None
            raise
        finally:
            self._local.deadline = None
            self._local.reserved = False
            if getattr(self._local, "leased", False):  # the creator never ran
                self._local.leased = False
                assert budget is not None
                budget.release()
        with self._cond:
            self._opening -= 1
            self._admission.opened(self._held())
            self._slot_freed()  # a handshake slot is free
        return record

    def _connect_refused(self, exc: BaseException) -> bool:
        """After a failed connect (or lease): free the slot; True when the caller should
        wait for a returned connection or the next probe instead (Admission.refused)."""
        with self._cond:
            self._opening -= 1
            self._dec_overflow()
            wait, news = self._admission.refused(exc, self._held(), self._clock())
            if wait:
                lease = isinstance(exc, (coordination.LeaseUnavailable,
                                         coordination.CoordinatorUnavailable))
                self._counts["lease_waits" if lease else "capacity_waits"] += 1
            self._slot_freed()
        if news is not None:  # once when the ceiling is learnt
            log.warning("connguard: %s (see docs/sqlalchemy.md)", news)
        return wait

    def _guarded_creator(self, invoke: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``invoke`` (the pool's creator) for every new DBAPI connection. One opened by
        ``_open_reserved`` has its slot (and lease) already; a reconnect in place
        (SQLAlchemy reconnecting a record after an invalidation on checkout, or for
        ``pool_recycle``) takes a handshake slot here, and a lease with a global budget, so
        that a mass KILL or a restart cannot open more at once than the cap allows.

        The pool is held weakly: a closure over it, stored on it, would be a reference
        cycle, and the pool (with its engine's listeners) would wait for the garbage
        collector instead of going when its engine goes."""
        pool_ref = weakref.ref(self)

        def invoke_creator(record: Any) -> Any:
            pool = pool_ref()
            if pool is None:
                return invoke(record)
            if getattr(pool._local, "reserved", False):
                return pool._leased(invoke, record)
            deadline = pool._in_place_slot()
            pool._local.deadline = deadline
            try:
                return pool._leased(invoke, record)
            finally:
                pool._local.deadline = None
                with pool._cond:
                    pool._opening -= 1
                    pool._slot_freed()
        return invoke_creator

    def _checkout_deadline(self) -> float:
        """The deadline of this thread's checkout if it had to wait (SQLAlchemy reconnects
        in place within it, after ``_do_get`` returned), else ``pool_timeout`` from now. A
        deadline left from an earlier checkout of this thread can only shorten the wait."""
        now = self._clock()
        deadline = getattr(self._local, "checkout_deadline", None)
        if deadline is not None and deadline > now:
            return float(deadline)
        return now + (30.0 if self._timeout is None else self._timeout)

    def _in_place_slot(self) -> float:
        """Wait for a handshake slot for a reconnect in place (no growth: the record is
        counted already); returns the connect's deadline (the checkout's)."""
        deadline = self._checkout_deadline()
        with self._cond:
            self._waiting += 1
            self._in_place_waiting += 1
            try:
                while self._opening >= self._admission.max_handshakes:
                    remaining = self._admission.time_left(
                        deadline, self._clock(), self._held(), self._opening,
                        self._server_failing(), growing=False)
                    if remaining is None:
                        self._counts["timeouts"] += 1
                        raise self._timeout_error()
                    self._wait_locked(min(remaining, storm.MAX_PAUSE))
                self._opening += 1
            finally:
                self._waiting -= 1
                self._in_place_waiting -= 1
        return deadline

    def _leased(self, invoke: Callable[[Any], Any], record: Any) -> Any:
        """``invoke(record)`` under a lease when there is a global budget: the one
        ``_open_reserved`` took, or one taken here for a reconnect in place. A failed
        connect gives it back."""
        budget = self._budget
        if budget is None:
            return invoke(record)
        if getattr(self._local, "leased", False):
            self._local.leased = False
        else:
            self._lease_in_place(budget)
        try:
            return invoke(record)
        except BaseException:
            budget.release()
            raise

    def _lease_in_place(self, budget: coordination.Budget) -> None:
        """A lease for a reconnect in place: asks again after each hint until the checkout's
        deadline (``pool_timeout``), then raises the refusal."""
        deadline = self._checkout_deadline()
        while True:
            try:
                budget.acquire()
                return
            except coordination.LeaseUnavailable as exc:
                wait = max(exc.retry_after, 0.05)
                if self._clock() + wait > deadline:
                    raise
                with self._cond:
                    self._counts["lease_waits"] += 1
                    self._in_place_waiting += 1  # so that a freed slot wakes everyone
                    try:
                        self._wait_locked(wait)  # a return notifies: its release may be it
                    finally:
                        self._in_place_waiting -= 1

    def _close_connection(self, connection: Any, *args: Any, **kw: Any) -> None:
        # Every DBAPI connection this pool closes (return, invalidate, recycle, reaper,
        # dispose) held a lease: counted now, sent by the next refresh (no I/O here).
        try:
            super()._close_connection(connection, *args, **kw)
        finally:
            if self._budget is not None:
                self._budget.release()

    def _drop_empty(self, record: Any, counted: bool = True) -> None:
        """An idle record without a connection (invalidated): forget it, so that its
        replacement is opened under the ceiling and the handshake cap."""
        try:
            record.close()  # nothing to close; keeps the record's own bookkeeping right
        finally:
            with self._cond:
                self._dec_overflow()
                if counted:
                    self._counts["dropped_empty"] += 1
                self._slot_freed()  # this caller may take an idle one

    def _do_return_conn(self, record: Any) -> None:
        # When it went idle, for the plugin's reaper (here rather than in a checkin listener:
        # one event dispatch less on every return).
        record.info[IDLE_SINCE] = time.monotonic()
        super()._do_return_conn(record)
        # Read without the lock, to keep the lock off the return path when nobody waits: a
        # caller counts itself before it looks at the queue, so if it is not counted yet,
        # it has yet to look and will find this record.
        if self._waiting:
            with self._cond:
                self._slot_freed()

    def _timeout_error(self) -> BaseException:
        """Under the lock. While connects fail for want of a server: the outage
        (ServerUnavailable, a DBAPI error SQLAlchemy wraps as OperationalError, as without
        a pool). Otherwise SQLAlchemy's own TimeoutError, text and code, so that what
        callers match on still matches, naming the refusal that holds the pool back."""
        gate = self._gate()
        # An outage only if the pool could have grown (a full pool of healthy connections
        # timing out is SQLAlchemy's TimeoutError, whatever failed before).
        could_grow = self._held() < self._admission.limit
        outage = (gate.outage(self._timeout or 0.0) if gate is not None and could_grow
                  else None)
        if outage is not None:  # as the engine's driver's error, which SQLAlchemy wraps
            facts = dbapis.facts_for(self._dialect) if hasattr(self, "_dialect") else None
            return outage if facts is None else facts.own_error(outage)
        message = (f"QueuePool limit of size {self.size()} overflow {self.overflow()} "
                   f"reached, connection timed out, timeout {self._timeout:0.2f}")
        refusal = self._admission.refusal_text()
        held_at = self._admission.ceiling.value
        if held_at is None and self._admission.lease_ceiling is not None:
            held_at = self._admission.lease_ceiling.value
        if refusal is not None and held_at is not None:
            message += (f"; connguard: {refusal}, the pool holds at {held_at} (see "
                        "docs/sqlalchemy.md)")
        return sa_exc.TimeoutError(message, code="3o7r")

    # -- the global budget: housekeeping --------------------------------------------------
    def dispose(self) -> None:
        super().dispose()  # closes the idle connections: their leases are released
        if self._budget is not None:
            self._budget.close()  # sends the releases now: nobody refreshes this pool again

    def connguard_refresh(self) -> None:
        """From the plugin's reaper pass (never under the pool's lock): give idle connections
        back when the pool holds more than its share, and keep the leases alive / send the
        releases (:meth:`~connguard.coordination.Budget.refresh`)."""
        budget = self._budget
        if budget is None:
            return
        if budget.surplus:
            self._give_back_surplus(budget)
        budget.refresh()

    def _give_back_surplus(self, budget: coordination.Budget) -> None:
        taken = []
        queue = self._pool
        with queue.mutex:  # type: ignore[attr-defined]
            idle = queue.queue  # type: ignore[attr-defined]
            while idle and budget.take_surplus():
                taken.append(idle.popleft())  # the coldest first
        if not taken:
            return
        with self._cond:
            if self._admission.lease_ceiling is not None:
                self._admission.lease_ceiling.hit(self._held() - len(taken), self._clock(),
                                                  coordination.LEASE_PROBE_MAX)
            self._counts["rebalanced"] += len(taken)
        for record in taken:
            self._drop_empty(record, counted=False)  # closes it: the lease goes back

    def waited(self, checkouts: int) -> Dict[str, Any]:
        """The checkout-wait distribution; of ``checkouts``, those never observed waiting
        were served at once (the first bucket)."""
        with self._cond:
            snapshot = self._waited.snapshot()
        at_once = max(0, checkouts - snapshot["count"])
        snapshot["count"] += at_once
        snapshot["buckets"] = [[le, n + at_once] for le, n in snapshot["buckets"]]
        return snapshot

    def connguard_after_fork(self) -> None:
        """In a forked child: new locks; the parent's leases stay the parent's."""
        self._cond = threading.Condition(threading.RLock())
        self._local = self._new_local()
        self._opening = self._waiting = self._in_place_waiting = 0
        if self._admission.lease_ceiling is not None:
            self._admission.lease_ceiling = Ceiling(coordination.LEASE_PROBE)
        if self._budget is not None:
            self._budget.after_fork()

    # -- introspection ---------------------------------------------------------------------
    def connect_deadline(self) -> Optional[float]:
        """The monotonic deadline of the checkout this thread is opening a connection for,
        or None outside one (e.g. SQLAlchemy reconnecting a record in place)."""
        return getattr(self._local, "deadline", None)

    def guard_stats(self) -> Dict[str, Any]:
        """``ceiling`` (None: not limited), ``opening`` (handshakes running), ``waiting``
        (callers waiting now), and the counters ``waits`` (times a checkout had to wait),
        ``capacity_waits`` (refusals turned into waits), ``timeouts``, ``dropped_empty``
        (invalidated idle records replaced by new connections); with a global budget also
        ``lease_waits``, ``lease_ceiling``, ``rebalanced`` and the Budget's own stats
        (``coordinator``, ``coordinator_state``, ``global_max``, ``leases_held``, ...)."""
        with self._cond:
            stats: Dict[str, Any] = {
                key: self._counts.get(key, 0)
                for key in ("waits", "capacity_waits", "timeouts", "dropped_empty")}
            stats.update(ceiling=self._admission.ceiling.value, opening=self._opening,
                         waiting=self._waiting)
            if self._admission.lease_ceiling is not None:
                stats.update(lease_waits=self._counts.get("lease_waits", 0),
                             lease_ceiling=self._admission.lease_ceiling.value,
                             rebalanced=self._counts.get("rebalanced", 0))
        if self._budget is not None:
            stats.update(self._budget.stats())  # no I/O: what the last lease call saw
        return stats

    def __repr__(self) -> str:
        ceiling = self._admission.ceiling.value
        return (f"<GuardedQueuePool [Connections: {self.checkedout()} checked out, "
                f"{self.checkedin()} idle, {self._opening} opening, max "
                f"{'unlimited' if self._max_overflow == -1 else self._max_total()}, ceiling "
                f"{'none' if ceiling is None else ceiling} | Waiting: {self._waiting}]>")


class _GreenletLocal:
    """``threading.local`` for SQLAlchemy's greenlets: the checkouts of an async engine
    interleave on the event loop's one thread, each in a greenlet of its own (one per
    awaited call), so a checkout's deadline and reserved slot are kept per greenlet."""

    def __init__(self) -> None:
        object.__setattr__(self, "_by_greenlet", weakref.WeakKeyDictionary())

    def _mine(self) -> Dict[str, Any]:
        import greenlet  # there whenever an async engine is: SQLAlchemy's asyncio needs it

        mine: Dict[str, Any] = self._by_greenlet.setdefault(greenlet.getcurrent(), {})
        return mine

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mine()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._mine()[name] = value


class _Waiter:
    """One caller waiting in an async pool's line: its place (``ticket``, kept when it waits
    again within the same checkout), whether a returned record may be handed to it, and the
    future it sleeps on (set to the record, or to None: look again)."""

    __slots__ = ("ticket", "for_record", "future")

    def __init__(self, ticket: int, for_record: bool, future: asyncio.Future) -> None:
        self.ticket, self.for_record, self.future = ticket, for_record, future

    def gone(self) -> bool:
        """Its loop closed under it (never to run again): it waits for nothing."""
        return self.future.get_loop().is_closed()


class GuardedAsyncQueuePool(GuardedQueuePool):
    """:class:`GuardedQueuePool` for async engines (in place of SQLAlchemy's
    ``AsyncAdaptedQueuePool``): the same ceiling, handshake cap and outage waits, but a
    caller never blocks its thread (the event loop's): it waits on a future of its own, in
    line. A returned connection goes straight to the oldest waiting checkout (hand-off, as
    ``connguard.Pool`` does), and a newcomer does not take past those already waiting; a
    freed slot wakes the oldest to look again, and a caller that found nothing keeps its
    place. A checkout's state is kept per greenlet (an async engine's checkouts interleave
    on one thread). The pool's lock is only ever held between two awaits, so taking it
    never waits.

    Fairness has a price when the pool is saturated and connections are held for no time
    at all: each checkout is then a task switch (30 tasks on 3 connections doing nothing
    else: ~35% fewer checkouts per second than SQLAlchemy's pool, which lets the returning
    task take its connection back at once and times others out)."""

    _is_asyncio = True
    _queue_class = AsyncAdaptedQueuePool._queue_class
    _dialect = AsyncAdaptedQueuePool._dialect

    def __init__(self, creator: Any, **kw: Any) -> None:
        # Waiting callers by ticket, oldest first. Made before the base class wires
        # anything that could wake them.
        self._line: List[_Waiter] = []
        self._tickets = itertools.count()
        super().__init__(creator, **kw)

    @staticmethod
    def _new_local() -> Any:
        return _GreenletLocal()

    def _do_get(self) -> Any:
        local = self._local
        local.woken, local.handed, local.ticket = False, None, None  # this checkout's own
        if not self._waiting_for_records():
            return super()._do_get()
        # Callers wait in line: a newcomer goes behind them (no look at the idle queue first).
        return self._wait_or_open(self._checkout_deadline_from_now())

    def _waiting_for_records(self) -> bool:
        """Whether a checkout still waits in line to be served (one served or woken, about to
        resume, does not; waiters whose loop closed are dropped)."""
        if any(waiter.gone() for waiter in self._line):
            with self._cond:
                self._line = [waiter for waiter in self._line if not waiter.gone()]
        return any(waiter.for_record and not waiter.future.done() for waiter in self._line)

    def _idle_record(self) -> Any:
        handed = getattr(self._local, "handed", None)
        if handed is not None:  # a return served this checkout while it waited
            self._local.handed = None
            return handed
        if not getattr(self._local, "woken", False) and self._waiting_for_records():
            return None  # the oldest looks first
        return super()._idle_record()

    def _wait_locked(self, timeout: Optional[float], for_record: bool = False) -> None:
        from sqlalchemy.util import await_only

        if for_record and not self._pool.empty():
            # Returned meanwhile with nobody in line to hand it to (a garbage-collected one,
            # on this thread): this caller takes it. Without ``woken`` it would not look at
            # the queue while others wait, and come straight back here: a loop that never
            # yields to the event loop.
            self._local.woken = True
            return
        ticket = getattr(self._local, "ticket", None)
        if ticket is None:  # the first wait of this checkout: the end of the line
            ticket = self._local.ticket = next(self._tickets)
        waiter = _Waiter(ticket, for_record, asyncio.get_running_loop().create_future())
        place = next((i for i, w in enumerate(self._line) if w.ticket > ticket), len(self._line))
        self._line.insert(place, waiter)  # by ticket (bisect takes no key before 3.10)
        self._local.woken = False
        leaving = True
        self._cond.release()
        try:
            await_only(asyncio.wait([waiter.future], timeout=timeout))
            leaving = False
        finally:
            self._cond.acquire()
            self._left_line(waiter, leaving)

    def _left_line(self, waiter: _Waiter, leaving: bool) -> None:
        """Under the lock: ``waiter`` stops waiting (served, woken, timed out, or
        ``leaving`` with an exception: cancelled). What was given to it is never lost: a
        record is taken, or passed on when it is leaving; a wake-up is passed on too."""
        with contextlib.suppress(ValueError):
            self._line.remove(waiter)
        self._local.woken = True
        future = waiter.future
        if not future.done():
            future.cancel()
            return
        if future.cancelled():
            return
        record = future.result()
        if record is None:
            if leaving:
                self._slot_freed()  # its wake-up goes to the next in line
        elif not leaving:
            self._local.handed = record
        elif not self._serve_line(record):
            QueuePool._do_return_conn(self, record)  # idle again

    def _serve_line(self, record: Any) -> bool:
        """Under the lock: hand ``record`` to the oldest checkout waiting on this thread's
        loop; False when there is none."""
        for waiter in self._line:
            if waiter.for_record and not waiter.future.done() and _on_its_loop(waiter.future):
                self._line.remove(waiter)
                waiter.future.set_result(record)
                return True
        return False

    def _slot_freed(self) -> None:
        """Under the lock: wake the oldest waiter to look again (all of them while
        reconnects in place wait for a slot, as the base class does); one whose loop closed
        is skipped."""
        for waiter in list(self._line):
            if not waiter.future.done() and _wake(waiter.future) and not self._in_place_waiting:
                return

    def _do_return_conn(self, record: Any) -> None:
        record.info[IDLE_SINCE] = time.monotonic()
        if self._line:
            with self._cond:
                if self._serve_line(record):
                    return  # still checked out: now the waiter's
        QueuePool._do_return_conn(self, record)
        if self._line:
            with self._cond:
                self._slot_freed()

    def connguard_after_fork(self) -> None:
        super().connguard_after_fork()
        self._line = []  # the parent's waiters live on in the parent only


def _on_its_loop(future: asyncio.Future) -> bool:
    """Whether this thread runs ``future``'s loop (a garbage-collected connection may be
    returned from any thread: such a return only wakes, it never hands over)."""
    try:
        return asyncio.get_running_loop() is future.get_loop()
    except RuntimeError:
        return False


def _wake(future: asyncio.Future) -> bool:
    """Let ``future``'s waiter look again, from any thread; False when its loop is closed
    (nobody will ever run it)."""
    if _on_its_loop(future):
        future.set_result(None)
        return True
    try:
        future.get_loop().call_soon_threadsafe(_wake_later, future)
    except RuntimeError:  # its loop closed
        return False
    return True


def _wake_later(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
