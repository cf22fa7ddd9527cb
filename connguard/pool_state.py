"""What the parts of the pool share: its entries, its waiters, and its state.

``connguard.pool.Pool`` is one object built from parts that each read at once: the checkout
path and the waiting line (``pool``), the return path (``pool_return``), the reaper's upkeep
(``pool_upkeep``) and the numbers (``pool_stats``). They are mixins of that one object, not
objects of their own: a part reads the pool's state as ``self.x``, with no hop through
another object on the checkout and return paths (each hop costs instructions on every call,
see tests/test_architecture.py). :class:`PoolState` declares that state for the type checker
and for the reader: ``Pool.__init__`` sets it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Set

from connguard.liveness import Probe, peer_closed
from connguard.policies import LifetimePolicy, PoolSettings, ResetPolicy
from connguard.proxy import Lease

if TYPE_CHECKING:
    from connguard import coordination, events
    from connguard.admission import Admission
    from connguard.clock import Clock
    from connguard.connector import Connector
    from connguard.metrics import PoolMetrics
    from connguard.storm import StormPolicy

#: Why a pooled connection was closed (the ``closed`` counter's keys).
CLOSE_REASONS = ("peer_closed", "expired", "idle_timeout", "broken", "discarded", "overflow",
                 "rebalanced", "pool_closed", "reconnected")

#: What driver.restore_session did -> the stats() counter it counts in ("discard" counts
#: as the reason the connection is closed).
_RESET_COUNTERS = {"rollback": "rollbacks", "reset": "resets", "restored": "restored"}


@dataclasses.dataclass(eq=False)
class Entry:
    """One pooled server connection and what the pool knows about it."""

    conn: Any  # the driver's connection (connguard.drivers)
    opened_at: float
    expires_at: float
    autocommit: bool
    last_used: float = 0.0
    uses: int = 0
    checked_out_at: float = 0.0
    checkout_stack: Optional[str] = None
    leak_reported: bool = False
    broken: bool = False
    probe: Probe = dataclasses.field(default_factory=Probe)
    lease: Optional[Lease] = None  # the current checkout, once it made a cursor
    #: How many times the return path took it back: a caller whose return was interrupted
    #: before ``_release`` began sees the count unchanged and returns it again (never twice).
    returns: int = 0


class Slot:
    """A connect slot reserved for one caller (counted in the pool's ``_opening``).

    ``reserved`` is True while the slot is counted; freeing it (``Pool._free_slot``, or the
    connect that fills it) sets it False under the pool's lock, so that freeing it again,
    from whichever cleanup an interrupt reached first, is a no-op."""

    __slots__ = ("reserved",)
    conn = None  # what tells it from an Entry on the checkout path (one attribute read)

    def __init__(self) -> None:
        self.reserved = False


class Waiter(Slot):
    """A caller waiting for a connection, in line: the pool serves the oldest first.

    The pool hands it an entry (``entry``) or a reserved connect slot (``reserved``) under
    its lock, then wakes it; a waiter never takes for itself while older ones wait, so
    newcomers cannot barge past them (HikariCP's and SQLAlchemy's hand-off, FIFO).

    It waits outside the pool's lock, on a lock of its own (``gate``, held until it is woken):
    whatever interrupts the wait, the pool's lock is not held, so nothing is left half
    released (``threading.Condition.wait`` can be left so by a signal handler that raises).
    """

    __slots__ = ("gate", "entry", "woken")

    def __init__(self) -> None:
        self.reserved = False
        self.entry: Optional[Entry] = None
        self.woken = False
        self.gate = threading.Lock()  # looked up now: gevent's once threading is patched
        self.gate.acquire()

    def wake(self) -> None:
        """Under the pool's lock: it was served, or the pool closed (once; idempotent)."""
        if not self.woken:
            self.woken = True
            self.gate.release()

    def wait(self, timeout: Optional[float]) -> None:
        """Outside the pool's lock: until woken, or ``timeout`` seconds (None: no limit)."""
        self.gate.acquire(True, -1 if timeout is None else min(timeout, threading.TIMEOUT_MAX))


def retire_reason(entry: Entry, now: float, lifetime: LifetimePolicy,
                  owner: bool = True) -> Optional[str]:
    """Why an idle entry must not be handed out any more, or None if it may be.

    ``owner``: the caller holds the entry (checkout) and may use its cached probe; the
    reaper, which does not, uses the stateless check.
    """
    if now >= entry.expires_at:
        return "expired"
    if lifetime.idle_timeout is not None and now - entry.last_used >= lifetime.idle_timeout:
        return "idle_timeout"
    sock = entry.conn._sock  # driver.raw_socket, inlined: every checkout passes here
    if sock is None or (entry.probe.dead(sock) if owner else peer_closed(sock)):
        return "peer_closed"
    return None


class PoolState:
    """The state every part of the pool reads (set by ``Pool.__init__``), and the methods
    one part calls on another, declared for the type checker only."""

    if TYPE_CHECKING:
        _driver: Any  # the seam to the driver (connguard.drivers)
        _connect_kwargs: Dict[str, Any]
        _options: Dict[str, Any]
        _settings: PoolSettings
        _lifetime: LifetimePolicy
        _reset: ResetPolicy
        _clean_return: Optional[Callable[[Any, bool], bool]]
        _clock: Clock
        _host: str
        _port: int
        _storm: Optional[StormPolicy]
        _coordination: coordination.CoordinationSettings
        _coordinator: Optional[coordination.Coordinator]
        _destination: str
        _budget: Optional[coordination.Budget]
        _admission: Admission
        _connector: Connector
        _wait_timeout: Optional[int]
        _server_limits: Dict[str, Any]
        _lock: threading.Lock
        _idle: Deque[Entry]
        _in_use: Set[Entry]
        _lost: Deque[Entry]
        _waiters: Deque[Waiter]
        _opening: int
        _top_up_running: bool
        _closed: bool
        _stats: Counter
        _metrics: PoolMetrics

        @property
        def name(self) -> str: ...
        @property
        def _listeners(self) -> events.Listeners: ...
        def _serve_waiters(self) -> None: ...
        def _may_open(self, now: float) -> bool: ...
        def _open_reserved(self, slot: Slot, deadline: float = ..., may_wait: bool = ...,
                           started: Optional[float] = ...) -> Optional[Entry]: ...
        def _release(self, entry: Entry, borrowed: bool = ...) -> None: ...
        def _free_slot(self, slot: Slot) -> None: ...
        def _close_entry(self, entry: Entry, reason: str) -> None: ...
        def _reclaim_lost(self) -> None: ...
        def _lease_held_at(self, held: int, now: float) -> None: ...
        def _describe_destination(self) -> str: ...
        def _mark_checked_out(self, entry: Entry, now: float) -> None: ...
        def statement_failed(self, entry: Entry, exc: BaseException) -> BaseException: ...
