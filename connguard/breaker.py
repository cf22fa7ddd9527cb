"""The connect gate's circuit breaker: consecutive outage failures toward one destination
open it; then one attempt (the probe) goes out per backoff interval until one succeeds.

Pure state: the gate (:class:`connguard.storm.ConnectGate`) supplies the clock and the lock.
What "the server is full" looks like (:data:`CAPACITY_CODES`) is here too: those refusals
never trip the breaker (the pool holds what it has instead).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from connguard import errors

#: MySQL codes that say "the server is full", not "the server is gone": the pool answers them
#: by holding what it has (adaptive ceiling) rather than by tripping the breaker.
CAPACITY_CODES = frozenset({1040, 1135, 1203, 1226})

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

#: Seconds after which a breaker's probe that never reported is given to another caller.
PROBE_LAPSE = 30.0


@dataclasses.dataclass
class Breaker:
    """Consecutive-failure circuit breaker; pure state, the gate supplies clock and lock."""

    threshold: int
    state: str = CLOSED
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    probe_started: float = 0.0
    last_error: Optional[BaseException] = None

    def admit(self, now: float) -> Tuple[bool, bool]:
        """(allowed, is_probe). When open and the wait is over, one caller probes; a probe
        that never reported (a thread killed mid-connect) lapses after PROBE_LAPSE."""
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
        if self.state == CLOSED:
            return True, False
        if self.probing and now - self.probe_started > PROBE_LAPSE:
            self.probing = False
        if self.state == HALF_OPEN and not self.probing:
            self.probing, self.probe_started = True, now
            return True, True
        return False, False

    def succeeded(self) -> None:
        self.state, self.failures, self.probing, self.last_error = CLOSED, 0, False, None

    def failed(self, now: float, wait: float, error: BaseException) -> None:
        self.failures += 1
        self.last_error = error  # detached by the gate: it outlives every caller
        self.probing = False
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.state, self.open_until = OPEN, now + wait

    def hold_open(self, now: float, wait: float, failures: int,
                  error: Optional[BaseException]) -> None:
        """Another process found the server down (a shared breaker is open): stay open for
        ``wait`` seconds too, without an attempt of our own."""
        self.state, self.probing = OPEN, False
        self.open_until = max(self.open_until, now + wait)
        self.failures = max(self.failures, failures)
        if self.last_error is None and error is not None:
            self.last_error = errors.detached(error)

    def retry_after(self, now: float) -> float:
        return max(0.0, self.open_until - now)


class ReportedFailure(Exception):
    """A connect failure another process reported through a shared breaker (the breaker's
    ``last_cause`` when this process saw none itself)."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.cause = summary


# Documented, pickled and reported (as ``CircuitOpen.original``) as connguard.storm's.
ReportedFailure.__module__ = "connguard.storm"

