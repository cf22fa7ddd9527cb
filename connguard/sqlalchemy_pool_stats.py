"""What :class:`connguard.sqlalchemy_pool.GuardedQueuePool` tells: its waits, its guard
counters (for the plugin's ``stats()``) and its repr."""

from __future__ import annotations

from typing import Any, Dict, Optional

from connguard.sqlalchemy_pool_state import GuardedPoolState


class GuardedPoolReport(GuardedPoolState):
    """The guarded pool's numbers."""

    def waited(self, checkouts: int) -> Dict[str, Any]:
        """The checkout-wait distribution; of ``checkouts``, those never observed waiting
        were served at once (the first bucket)."""
        with self._cond:
            snapshot = self._waited.snapshot()
        at_once = max(0, checkouts - snapshot["count"])
        snapshot["count"] += at_once
        snapshot["buckets"] = [[le, n + at_once] for le, n in snapshot["buckets"]]
        return snapshot

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
