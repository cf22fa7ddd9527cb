"""The upkeep of :class:`connguard.sqlalchemy_pool.GuardedQueuePool` outside checkouts:
the global budget's leases (given back with every closed connection, refreshed and
rebalanced from the plugin's reaper pass) and a forked child's fresh start."""

from __future__ import annotations

from typing import Any

from connguard import coordination
from connguard.concurrency import Condition
from connguard.sqlalchemy_pool_state import GuardedPoolState
from connguard.storm import Ceiling


class PoolUpkeep(GuardedPoolState):
    """The global budget's housekeeping, and the fork."""

    def _close_connection(self, connection: Any, *args: Any, **kw: Any) -> None:
        # Every DBAPI connection this pool closes (return, invalidate, recycle, reaper,
        # dispose) held a lease: counted now, sent by the next refresh (no I/O here).
        try:
            super()._close_connection(connection, *args, **kw)
        finally:
            if self._budget is not None:
                self._budget.release()

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
        with queue.mutex:
            idle = queue.queue
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

    def connguard_after_fork(self) -> None:
        """In a forked child: new locks; the parent's leases stay the parent's."""
        self._cond = Condition()  # (interrupt-safe: connguard.concurrency)
        self._local = self._new_local()
        self._opening = self._waiting = self._in_place_waiting = 0
        if self._admission.lease_ceiling is not None:
            self._admission.lease_ceiling = Ceiling(coordination.LEASE_PROBE)
        if self._budget is not None:
            self._budget.after_fork()
