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
  at once; other callers wait for an idle connection or a free slot;
* an idle record whose connection was invalidated (by the reaper, or after a disconnect)
  is dropped and replaced by a new connection opened under these rules, instead of being
  reconnected in place, where a refusal could not be waited out.

Decisions are taken under the pool's own lock; connects, closes and waits happen outside it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Optional

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import queue as sqla_queue

from connguard import errors, storm
from connguard.storm import Ceiling, StormPolicy

__all__ = ["GuardedQueuePool", "capacity_code"]

Clock = Callable[[], float]

log = logging.getLogger("connguard.sqlalchemy")

#: The policy a GuardedQueuePool built without one uses (StormPolicy's defaults).
DEFAULT_POLICY = StormPolicy()

#: Probe interval when storm control is off (the policy is None), as in ``connguard.Pool``.
_PROBE_WITHOUT_POLICY = 1.0


def capacity_code(exc: BaseException) -> Optional[int]:
    """The MySQL code when ``exc`` says the server is full (1040, 1135, 1203, 1226), else None.

    Works for connguard's translated errors and the driver's own (the code is ``args[0]``),
    and for a ``CircuitOpen`` raised because the storm gate's backoff after such a refusal
    outlasted the caller's deadline.
    """
    if isinstance(exc, errors.CircuitOpen):
        cause = exc.last_cause
        return None if cause is None or cause is exc else capacity_code(cause)
    code = exc.args[0] if isinstance(exc, Exception) and exc.args else None
    return code if isinstance(code, int) and code in storm.CAPACITY_CODES else None


class GuardedQueuePool(QueuePool):
    """A ``QueuePool`` with connguard's adaptive ceiling and handshake cap.

    Takes ``QueuePool``'s arguments, plus (keyword only, so ``create_engine`` never takes
    them from its own keywords) ``connguard_policy``: the :class:`~connguard.storm.StormPolicy`
    whose ``max_handshakes`` and ``ceiling_probe`` apply, None for no handshake cap (storm
    control off); and ``connguard_clock`` for tests.
    """

    def __init__(self, creator: Any, *, connguard_policy: Optional[StormPolicy] = DEFAULT_POLICY,
                 connguard_clock: Clock = time.monotonic, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self._clock = connguard_clock
        self._cond = threading.Condition(threading.Lock())
        self._opening = 0  # connections being opened by _do_get right now
        self._waiting = 0  # callers looking for a record; seen outside the lock: waiting
        self._local = threading.local()  # the deadline of this thread's checkout
        self._counts: Counter = Counter()
        self._last_refusal: Optional[str] = None
        self._configure(connguard_policy)

    def _configure(self, policy: Optional[StormPolicy]) -> None:
        self.connguard_policy = policy
        self._max_handshakes = policy.max_handshakes if policy is not None else sys.maxsize
        self._ceiling = Ceiling(policy.ceiling_probe if policy is not None
                                else _PROBE_WITHOUT_POLICY)

    def recreate(self) -> GuardedQueuePool:
        # QueuePool.recreate builds self.__class__ with QueuePool's arguments (what
        # engine.dispose() uses); the policy goes with them, the learnt ceiling does not.
        pool = super().recreate()
        assert isinstance(pool, GuardedQueuePool)
        pool._configure(self.connguard_policy)
        pool._clock = self._clock
        return pool

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
        """May one more connection be opened now? Bounded by pool_size + max_overflow, the
        handshakes already running, and the ceiling the server taught us (a probe when due)."""
        at_limit = self._max_overflow > -1 and self._overflow >= self._max_overflow
        return (not at_limit and self._opening < self._max_handshakes
                and self._ceiling.allows(self._held(), now))

    # -- checkout --------------------------------------------------------------------------
    def _do_get(self) -> Any:
        timeout = self._timeout
        deadline = float("inf") if timeout is None else self._clock() + timeout
        while True:
            try:
                record = self._pool.get(False)  # an idle record: no lock of ours needed
            except sqla_queue.Empty:
                record = self._take_or_reserve(deadline)
                if record is None:  # a connect slot was reserved for us
                    record = self._open_reserved(deadline)
                    if record is None:  # the server is full: wait for a returned one
                        continue
                    return record
            if record.dbapi_connection is not None:
                return record
            self._drop_empty(record)

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
        while True:
            try:
                return self._pool.get(False)
            except sqla_queue.Empty:
                pass
            now = self._clock()
            if self._may_open(now):
                reserved = self._inc_overflow()
                assert reserved, "overflow is only raised under the pool's lock"
                self._opening += 1
                return None
            remaining = deadline - now
            if remaining <= 0:
                self._counts["timeouts"] += 1
                raise self._timeout_error()
            if not counted:
                self._counts["waits"] += 1
                counted = True
            # A probe that is due but blocked (handshakes, overflow limit) waits for a
            # notify like the rest; one still to come bounds the wait.
            probe_in = self._ceiling.seconds_to_probe(now)
            wait = min(remaining, probe_in) if probe_in else remaining
            self._cond.wait(None if wait == float("inf") else wait)

    def _open_reserved(self, deadline: float) -> Any:
        """Open a connection in the reserved slot. Returns the record, or None when the server
        refused for capacity while the pool holds others (the ceiling is now lowered: wait);
        raises any other error, and the refusal when the pool holds nothing."""
        self._local.deadline = deadline
        try:
            record = self._create_connection()
        except BaseException as exc:
            if not self._refused(exc):
                raise
            return None
        finally:
            self._local.deadline = None
        with self._cond:
            self._opening -= 1
            self._ceiling.grew(self._held(), self._max_total())
            self._last_refusal = None
            if self._waiting:
                self._cond.notify()  # a handshake slot is free
        return record

    def _refused(self, exc: BaseException) -> bool:
        """After a failed connect: free the slot; True when the caller should wait instead."""
        code = capacity_code(exc)
        first = False
        with self._cond:
            self._opening -= 1
            self._dec_overflow()
            held = self._held()
            wait = code is not None and held > 0
            if wait:
                first = self._ceiling.value is None
                self._ceiling.hit(held, self._clock())
                self._counts["capacity_waits"] += 1
                refusal = self._last_refusal = (
                    f"the server refused a new connection with {code} "
                    f"({type(exc).__name__}) while this pool had {held - self._opening} "
                    "open")
            if self._waiting:
                self._cond.notify()
        if wait:
            # Once when the ceiling is learnt; every refused probe after that is routine.
            (log.warning if first else log.debug)(
                "connguard: %s; holding at %d, the next probe in %.1fs", refusal, held,
                self._ceiling.probe_interval)
        return wait

    def _drop_empty(self, record: Any) -> None:
        """An idle record without a connection (invalidated): forget it, so that its
        replacement is opened under the ceiling and the handshake cap."""
        try:
            record.close()  # nothing to close; keeps the record's own bookkeeping right
        finally:
            with self._cond:
                self._dec_overflow()
                self._counts["dropped_empty"] += 1
                if self._waiting:
                    self._cond.notify()  # a slot is free (this caller may take an idle one)

    def _do_return_conn(self, record: Any) -> None:
        super()._do_return_conn(record)
        # Read without the lock, to keep the lock off the return path when nobody waits: a
        # caller counts itself before it looks at the queue, so if it is not counted yet,
        # it has yet to look and will find this record.
        if self._waiting:
            with self._cond:
                self._cond.notify()

    def _timeout_error(self) -> sa_exc.TimeoutError:
        # SQLAlchemy's own text and code, so that what callers match on still matches.
        message = (f"QueuePool limit of size {self.size()} overflow {self.overflow()} "
                   f"reached, connection timed out, timeout {self._timeout:0.2f}")
        if self._last_refusal is not None and self._ceiling.value is not None:
            message += (f"; connguard: {self._last_refusal}, the pool holds at "
                        f"{self._ceiling.value} (see docs/sqlalchemy.md)")
        return sa_exc.TimeoutError(message, code="3o7r")

    # -- introspection ---------------------------------------------------------------------
    def connect_deadline(self) -> Optional[float]:
        """The monotonic deadline of the checkout this thread is opening a connection for,
        or None outside one (e.g. SQLAlchemy reconnecting a record in place)."""
        return getattr(self._local, "deadline", None)

    def guard_stats(self) -> Dict[str, Any]:
        """``ceiling`` (None: not limited), ``opening`` (handshakes running), ``waiting``
        (callers waiting now), and the counters ``waits`` (times a checkout had to wait),
        ``capacity_waits`` (refusals turned into waits), ``timeouts``, ``dropped_empty``
        (invalidated idle records replaced by new connections)."""
        with self._cond:
            stats: Dict[str, Any] = {
                key: self._counts.get(key, 0)
                for key in ("waits", "capacity_waits", "timeouts", "dropped_empty")}
            stats.update(ceiling=self._ceiling.value, opening=self._opening,
                         waiting=self._waiting)
        return stats

    def __repr__(self) -> str:
        ceiling = self._ceiling.value
        return (f"<GuardedQueuePool [Connections: {self.checkedout()} checked out, "
                f"{self.checkedin()} idle, {self._opening} opening, max "
                f"{'unlimited' if self._max_overflow == -1 else self._max_total()}, ceiling "
                f"{'none' if ceiling is None else ceiling} | Waiting: {self._waiting}]>")
