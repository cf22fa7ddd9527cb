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

import logging
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional, Tuple

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import queue as sqla_queue

from connguard import coordination, dbapis, errors
from connguard.admission import Admission, capacity_code
from connguard.clock import Clock
from connguard.concurrency import Condition
from connguard.metrics import Histogram
from connguard.sqlalchemy_pool_inplace import ReconnectInPlace
from connguard.sqlalchemy_pool_stats import GuardedPoolReport
from connguard.sqlalchemy_pool_upkeep import PoolUpkeep
from connguard.storm import ConnectGate, StormPolicy

__all__ = ["GuardedQueuePool", "capacity_code"]

#: Makes the pool's Budget, given the pool's pool_size + max_overflow (one per pool: a
#: pool made again by ``dispose()`` gets a new one).
BudgetFactory = Callable[[int], coordination.Budget]
#: The connect gate of the engine's destination, if any (the plugin's connector may change).
GateSource = Callable[[], Optional[ConnectGate]]

log = logging.getLogger("connguard.sqlalchemy")

#: The policy a GuardedQueuePool built without one uses (StormPolicy's defaults).
DEFAULT_POLICY = StormPolicy()

class GuardedQueuePool(ReconnectInPlace, PoolUpkeep, GuardedPoolReport, QueuePool):
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
        timeout = self._timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout != timeout):
            # NaN compares false with everything: every wait would end at once ("timeout
            # nan"); plain QueuePool would wait for ever instead. Neither is meant.
            raise sa_exc.ArgumentError(f"pool_timeout must be a number of seconds or None, "
                                       f"got {timeout!r}")
        self._clock = connguard_clock
        # Re-entrant: the garbage collector may return a forgotten connection (SQLAlchemy's
        # finalizer calls _do_return_conn) in the very thread that holds the lock, inside any
        # allocation; with a plain lock that thread would wait on itself for ever.
        self._cond = Condition()  # (interrupt-safe: connguard.concurrency)
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
        while True:
            record = self._take_or_reserve(deadline)
            if record is None:  # a connect slot was reserved for us
                record = self._open_reserved(deadline)
                if record is None:  # the server is full: wait for a returned one
                    continue
            elif record.dbapi_connection is None:
                self._drop_empty(record)
                continue
            # A reconnect in place later in this checkout keeps its deadline: on the record
            # (not a thread-local: the async pool's tasks share one thread), set here, off
            # the fast path (a checkout served at once has nearly all of it left), and
            # cleared by the return.
            record._connguard_deadline = deadline
            return record

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
            log.warning("connguard: %s (see: connguard explain too-many-connections)", news)
        return wait

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
        # one event dispatch less on every return). An attribute of the record, not a key of
        # record.info, which is the user's dict; set on every return, so a record that
        # reconnected never shows the idle time of its previous connection in the queue.
        record._connguard_idle_since = time.monotonic()
        record._connguard_deadline = None  # that checkout's (see _wait_or_open)
        super()._do_return_conn(record)
        # Read without the lock, to keep the lock off the return path when nobody waits: a
        # caller counts itself before it looks at the queue, so if it is not counted yet,
        # it has yet to look and will find this record.
        if self._waiting:
            with self._cond:
                self._slot_freed()

    def _timeout_error(self, in_place_refusal: Optional[BaseException] = None) -> BaseException:
        """Under the lock. While connects fail for want of a server: the outage
        (ServerUnavailable, a DBAPI error SQLAlchemy wraps as OperationalError, as without
        a pool). Otherwise SQLAlchemy's own TimeoutError, text and code, so that what
        callers match on still matches, naming the refusal that holds the pool back
        (``in_place_refusal``: the lease refused to a reconnect in place)."""
        gate = self._gate()
        # An outage only if the pool could have grown (a full pool of healthy connections
        # timing out is SQLAlchemy's TimeoutError, whatever failed before).
        could_grow = self._held() < self._admission.limit
        outage = (gate.outage(self._timeout or 0.0) if gate is not None and could_grow
                  else None)
        if outage is not None:  # as the engine's driver's error, which SQLAlchemy wraps
            facts = dbapis.facts_for(self._dialect) if hasattr(self, "_dialect") else None
            return outage if facts is None else facts.own_error(outage)
        # pool_timeout=None: only a reconnect in place times out (after 30 s, see
        # _checkout_deadline); "%0.2f" of None is a TypeError.
        timeout = "None" if self._timeout is None else f"{self._timeout:0.2f}"
        message = (f"QueuePool limit of size {self.size()} overflow {self.overflow()} "
                   f"reached, connection timed out, timeout {timeout}")
        refusal = self._admission.refusal_text()
        held_at = self._admission.ceiling.value
        if held_at is None and self._admission.lease_ceiling is not None:
            held_at = self._admission.lease_ceiling.value
        if in_place_refusal is not None:  # LeaseUnavailable or CoordinatorUnavailable
            page = getattr(in_place_refusal, "docs", "lease-unavailable")
            message += (f"; connguard: no connection lease to reconnect in place "
                        f"({errors.summary(in_place_refusal)}; see: connguard explain {page})")
        elif refusal is not None and held_at is not None:
            message += (f"; connguard: {refusal}, the pool holds at {held_at} (see: "
                        "connguard explain too-many-connections)")
        return sa_exc.TimeoutError(message, code="3o7r")


def quiet_as_sqlalchemy(pool_class: type) -> None:
    """SQLAlchemy logs a pool's life ("Pool disposed", "Pool recreating": INFO) under the
    pool class's module and name, and sets its own loggers to WARN at import unless the
    application set them: a QueuePool says nothing under a root logger at INFO. The guarded
    pools' loggers get that default too (``echo_pool=True`` still shows everything)."""
    logger = logging.getLogger(f"{pool_class.__module__}.{pool_class.__name__}")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARN)


quiet_as_sqlalchemy(GuardedQueuePool)
