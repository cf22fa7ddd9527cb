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
            deadline = pool._in_place_slot(record)
            pool._local.deadline = deadline
            try:
                return pool._leased(invoke, record)
            finally:
                pool._local.deadline = None
                with pool._cond:
                    pool._opening -= 1
                    pool._slot_freed()
        return invoke_creator

    def _checkout_deadline(self, record: Any) -> float:
        """The deadline of the checkout of ``record`` if it had to wait (SQLAlchemy
        reconnects in place within it, after ``_do_get`` returned), else ``pool_timeout``
        from now."""
        deadline = getattr(record, "_connguard_deadline", None)
        if deadline is not None:
            return float(deadline)
        return self._clock() + (30.0 if self._timeout is None else self._timeout)

    def _in_place_slot(self, record: Any) -> float:
        """Wait for a handshake slot for a reconnect in place (no growth: the record is
        counted already); returns the connect's deadline (the checkout's)."""
        deadline = self._checkout_deadline(record)
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
            self._lease_in_place(budget, record)
        try:
            return invoke(record)
        except BaseException:
            budget.release()
            raise

    def _lease_in_place(self, budget: coordination.Budget, record: Any) -> None:
        """A lease for a reconnect in place: asks again after each hint until the checkout's
        deadline (``pool_timeout``), then raises SQLAlchemy's TimeoutError naming the
        refusal, as a checkout waiting for a lease does: no lease is a wait, not an error.
        So is a coordinator down while failing closed (a checkout that needs a new
        connection waits it out too: the pool holds connections, this record among them)."""
        deadline = self._checkout_deadline(record)
        while True:
            try:
                budget.acquire()
                return
            except (coordination.LeaseUnavailable, coordination.CoordinatorUnavailable) as exc:
                refused = exc
            with self._cond:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self._counts["timeouts"] += 1
                    raise self._timeout_error(in_place_refusal=refused) from refused
                self._counts["lease_waits"] += 1
                self._in_place_waiting += 1  # so that a freed slot wakes everyone
                try:
                    # A return notifies (its release may be the lease); a hint past the
                    # deadline is cut to it, so the last ask is made in time.
                    self._wait_locked(min(max(refused.retry_after, 0.05), remaining))
                finally:
                    self._in_place_waiting -= 1
