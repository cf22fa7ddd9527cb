"""The shared halves of a connect gate: the host-wide file gate (:mod:`connguard.hostgate`)
and the cluster-wide coordinator (:mod:`connguard.coordination`), asked in that order after
the process's own gate. One interface (:class:`SharedGate`), and the part of
:class:`connguard.storm.ConnectGate` that asks them and tells them how attempts ended."""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable, List, Optional, Protocol

from connguard import errors
from connguard.breaker import ReportedFailure
from connguard.clock import Clock, Sleep
from connguard.storm_state import GateState

log = logging.getLogger("connguard.storm")


class SharedGate(Protocol):
    """The shared half of a gate (host-wide file, cluster-wide coordinator).

    ``admit`` blocks for a shared token until ``deadline`` (then raises CircuitOpen) and
    returns None to go, or an object with ``retry_after``, ``failures`` and ``cause`` when
    a shared breaker is open. ``finished`` is told how an admitted attempt ended
    (``"succeeded"``, ``"outage"``, ``"capacity"``, ``"permanent"``, ``"abandoned"``).
    ``key`` tells backends apart (gates are shared per backend).
    """

    key: Hashable

    def admit(self, deadline: float, clock: Clock, sleep: Sleep) -> Any: ...

    def finished(self, outcome: str, error: Optional[BaseException] = None) -> None: ...


class SharedHalves(GateState):
    """How a :class:`~connguard.storm.ConnectGate` asks its shared halves (a mixin of it)."""

    def _admit_shared(self, deadline: float,
                      pause: Optional[Sleep] = None) -> Optional[errors.CircuitOpen]:
        """Ask the shared halves in turn; when a shared breaker is open, return the
        CircuitOpen for it (the local breaker then holds open as long)."""
        admitted: List[SharedGate] = []
        try:
            for backend in self._shared:
                refusal = backend.admit(deadline, self._clock,
                                        pause or self._sleep or time.sleep)
                if refusal is not None:
                    with self._lock:
                        self._release_probe()
                    self._finish_shared("abandoned", backends=admitted)
                    return self._shared_open(refusal)
                admitted.append(backend)
        except BaseException:
            with self._lock:  # this attempt never started: only the probe goes back
                self._release_probe()
            self._finish_shared("abandoned", backends=admitted)
            raise
        return None

    def _shared_open(self, refusal: Any) -> errors.CircuitOpen:
        """Another process found the server down: fail fast, and stay open locally for as
        long, so this process does not ask again before then."""
        with self._lock:
            now = self._clock()
            cause = ReportedFailure(refusal.cause) if refusal.cause else None
            self._breaker.hold_open(now, refusal.retry_after, refusal.failures, cause)
            if self._failing_since is None:
                self._failing_since = now
            self.fast_failures += 1
            self.shared_refusals += 1
            return self._circuit_open(now)

    def _finish_shared(self, outcome: str, error: Optional[BaseException] = None,
                       backends: Optional[List[SharedGate]] = None) -> None:
        """Tell the shared halves how the attempt ended. A backend that fails to hear it is
        logged, never raised: the local breaker's state is already settled by then."""
        for backend in self._shared if backends is None else backends:
            try:
                backend.finished(outcome, error)
            except Exception:  # noqa: BLE001 - a shared gate must not break connects
                log.warning("shared gate %r could not record %s", backend, outcome,
                            exc_info=True)

    @property
    def host_gate_directory(self) -> Optional[str]:
        """Where the host-wide gate's slot files are, if this gate has one."""
        for backend in self._shared:
            directory = getattr(backend, "directory", None)
            if directory is not None:
                return str(directory)
        return None
