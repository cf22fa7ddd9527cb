"""What a connect gate tells: its state and counters, whether connects toward its server
fail, and the errors its refusals raise (:class:`~connguard.errors.ServerUnavailable`,
:class:`~connguard.errors.CircuitOpen`) with the live numbers in them."""

from __future__ import annotations

from typing import Any, Dict, Optional

from connguard import errors
from connguard.breaker import CAPACITY_CODES, CLOSED, OPEN
from connguard.storm_state import GateState


class GateReport(GateState):
    """A :class:`~connguard.storm.ConnectGate`'s numbers and errors (a mixin of it)."""

    @property
    def state(self) -> str:
        return self._breaker.state

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {"breaker": self._breaker.state, "consecutive_failures": self._breaker.failures,
                    "connect_attempts": self.attempts, "connect_failures": self.failures,
                    "fast_failures": self.fast_failures, "outage_waits": self.outage_waits,
                    "shared_refusals": self.shared_refusals, "breaker_opens": self.opens,
                    "host_gate_directory": self.host_gate_directory}

    @property
    def failing(self) -> bool:
        """Did the last attempt toward this destination fail (a streak not yet ended)?"""
        return self._failing_since is not None

    def outage(self, waited: float) -> Optional[errors.ServerUnavailable]:
        """The error for a caller of a pool that waited ``waited`` seconds while connects to
        this destination kept failing for want of a server (not a full one), else None:
        the breaker is open, or an attempt failed during that wait (one stale failure of
        long ago says nothing about why this caller waited)."""
        with self._lock:
            last = self._breaker.last_error
            now = self._clock()
            if self._failing_since is None or last is None or (
                    last.args and last.args[0] in CAPACITY_CODES):
                return None
            if self._breaker.state == CLOSED and now - self._failed_at > waited:
                return None
            return self._outage_error(now, waited)

    def _target(self) -> str:
        return f"{self.host}:{self.port}" if self.port else (self.host or "the server")

    def _circuit_open(self, now: float) -> errors.CircuitOpen:
        return errors.CircuitOpen(self._breaker.last_error, self._breaker.retry_after(now),
                                  host=self.host, port=self.port or None,
                                  failures=self._breaker.failures)

    def _unavailable(self, now: float, started: float) -> errors.ConnGuardError:
        """Under the lock: the caller's deadline comes before its next chance to connect."""
        if self._breaker.state == OPEN and self._breaker.failures == 0:
            return self._circuit_open(now)  # opened by another process, no cause of ours
        return self._outage_error(now, now - started)

    def _outage_error(self, now: float, waited: float) -> errors.ServerUnavailable:
        since = self._failing_since
        return errors.outage_error(self._breaker.last_error,
                                   0.0 if since is None else now - since, waited,
                                   failures=self._breaker.failures or None, host=self.host,
                                   port=self.port or None, reached=self.reached)
