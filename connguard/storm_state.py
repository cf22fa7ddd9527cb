"""What the parts of :class:`connguard.storm.ConnectGate` share: the state
``ConnectGate.__init__`` sets and the method one part calls on another, declared for the type
checker only (the parts are mixins of the one gate object)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from connguard import errors
    from connguard.breaker import Breaker
    from connguard.clock import Clock, Sleep


class GateState:
    """The gate's state every part reads (under ``_lock`` unless said otherwise)."""

    if TYPE_CHECKING:
        host: str
        port: int
        reached: bool
        attempts: int
        failures: int
        fast_failures: int
        outage_waits: int
        opens: int
        shared_refusals: int
        _clock: Clock
        _sleep: Optional[Sleep]
        _lock: threading.RLock  # re-entrant: see ConnectGate._pause
        _breaker: Breaker
        _failing_since: Optional[float]
        _failed_at: float
        _shared: Tuple[Any, ...]  # the SharedGate halves, in the order they are asked

        def _release_probe(self) -> None: ...
        def _circuit_open(self, now: float) -> errors.CircuitOpen: ...
        @property
        def host_gate_directory(self) -> Optional[str]: ...
