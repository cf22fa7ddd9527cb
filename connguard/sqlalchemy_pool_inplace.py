"""How :class:`connguard.sqlalchemy_pool.GuardedQueuePool` lets SQLAlchemy reconnect a
record in place (after an invalidation on checkout, or for ``pool_recycle``) without passing
the handshake cap or the global budget: every new DBAPI connection goes through the pool's
guarded creator, which takes a handshake slot (and a lease) for a reconnect in place, within
the checkout's deadline."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from connguard import coordination, storm
from connguard.sqlalchemy_pool_state import GuardedPoolState


class ReconnectInPlace(GuardedPoolState):
    """The guarded pool's creator and the slot and lease a reconnect in place takes."""

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
