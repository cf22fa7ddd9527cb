"""What a pool tells about itself: ``stats()`` (the schema every pool kind shares, see
``connguard.metrics`` and docs/metrics.md, plus the pool's own counters) and its name."""

from __future__ import annotations

from typing import Any, Dict

from connguard import events
from connguard.pool_state import CLOSE_REASONS, PoolState


class PoolReport(PoolState):
    """PoolReport: see the module doc."""

    def stats(self) -> Dict[str, Any]:
        """Counters and gauges: idle, in_use, opening, waiting, opened, closed, peer_closed, …"""
        with self._lock:
            stats: Dict[str, Any] = {
                key: self._stats.get(key, 0)
                for key in ("opened", "closed", "peer_closed", "expired", "idle_timeout",
                            "broken", "discarded", "waits", "timeouts", "rollbacks", "resets",
                            "restored", "leaks", "lost")}
            stats.update(idle=len(self._idle), in_use=len(self._in_use),
                         opening=self._opening, waiting=len(self._waiters),
                         max_size=self._settings.max_size,
                         max_overflow=self._settings.max_overflow,
                         overflow_closed=self._stats.get("overflow", 0),
                         wait_timeout=self._wait_timeout,
                         idle_timeout=self._lifetime.idle_timeout,
                         ceiling=self._admission.ceiling.value,
                         capacity_waits=self._stats.get("capacity_waits", 0))
            if self._budget is not None:
                stats.update(lease_waits=self._stats.get("lease_waits", 0),
                             lease_ceiling=self._admission.lease_ceiling.value
                             if self._admission.lease_ceiling is not None else None,
                             rebalanced=self._stats.get("rebalanced", 0))
            stats.update(self._schema())
        gate = self._connector.gate
        if gate is not None:
            gate_stats = gate.stats()
            stats.update(gate_stats)
            stats["counters"]["breaker_opens"] = gate_stats["breaker_opens"]
        if self._budget is not None:
            stats.update(self._budget.stats())
        elif self._coordinator is not None:
            health = self._coordinator.health
            stats.update(coordinator=self._coordinator.address,
                         coordinator_state="ok" if health.up else (
                             "fallback" if self._coordination.fail == "open" else "refusing"),
                         coordinator_outages=health.outages)
        return stats

    def _schema(self) -> Dict[str, Any]:
        """Under the lock: the part every pool kind shares (connguard.metrics, docs/metrics.md)."""
        checkouts = self._metrics.retired_uses + sum(e.uses for e in self._idle) + sum(
            e.uses for e in self._in_use)
        waited = self._metrics.waited.snapshot()
        served_at_once = max(0, checkouts - waited["count"])  # counted, never observed
        waited["count"] += served_at_once
        waited["buckets"] = [[le, n + served_at_once] for le, n in waited["buckets"]]
        with self._metrics.lock:
            closed = {reason: self._stats.get(reason, 0) for reason in CLOSE_REASONS
                      if self._stats.get(reason, 0)}
            counters = {
                "checkouts": checkouts, "opened": self._stats.get("opened", 0),
                "closed": closed, "peer_closed": self._stats.get("peer_closed", 0),
                "reaped": self._stats.get("reaped", 0),
                "timeouts": self._stats.get("timeouts", 0),
                "waits": self._stats.get("waits", 0),
                "connect_failures": dict(self._metrics.failures),
                "rollbacks": self._stats.get("rollbacks", 0),
                "resets": self._stats.get("resets", 0), "breaker_opens": 0}
        return {"name": self.name, "kind": "pool",
                "sizes": {"idle": len(self._idle), "in_use": len(self._in_use),
                          "opening": self._opening, "max": self._settings.max_size,
                          "ceiling": self._admission.ceiling.value},
                "counters": counters,
                "distributions": {"checkout_wait_s": waited,
                                  "connect_s": self._metrics.connect_time.snapshot(),
                                  "hold_s": self._metrics.hold_snapshot()}}

    @property
    def name(self) -> str:
        """The pool's name in stats, events and exports (``name=``; default user@host/db)."""
        return self._metrics.name

    @property
    def _listeners(self) -> events.Listeners:
        return self._metrics.listeners

    def _describe_destination(self) -> str:
        user = self._connect_kwargs.get("user") or ""
        where = self._host if not self._port else f"{self._host}:{self._port}"
        db = self._connect_kwargs.get("database") or self._connect_kwargs.get("db")
        return f"{user}@{where}" + (f"/{db}" if db else "")
