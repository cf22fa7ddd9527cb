"""The interface a shared-state backend implements, and which backend serves which URL.

:class:`Coordinator` is what :mod:`connguard.coordination` (the shared budget and gate) asks;
a backend (:mod:`connguard.redis_coordination`) implements it and raises :class:`BackendDown`
when it cannot be reached; :class:`Health` is how one process decides to fall back and when
to ask again. Backends are found by the URL's scheme (:data:`BACKENDS`), imported only when
a URL names them.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, TypeVar, Union
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from connguard.coordination import Budget

from connguard.clock import Clock
from connguard.concurrency import ProcessLock

log = logging.getLogger("connguard.coordination")

T = TypeVar("T")

#: URL scheme -> "module:class" of the backend that serves it.
BACKENDS = {scheme: "connguard.redis_coordination:RedisCoordinator"
            for scheme in ("redis", "rediss", "unix")}


class BackendDown(Exception):
    """Raised by a coordinator backend that could not be reached (internal signal)."""



# --- reachability ---------------------------------------------------------------------------


class Health:
    """Whether a coordinator answers, as one process sees it; the fallback decision.

    While it answers every caller uses it. After a failure the process falls back and logs
    that once; from then on one caller at a time tries again, first after ``retry_initial``
    seconds, the interval doubling up to ``retry_max``; the first answer ends the fallback
    (logged once too). Pure state plus a lock: clock injectable, no I/O under the lock.
    """

    def __init__(self, address: str, clock: Clock = time.monotonic,
                 retry_initial: float = 0.25, retry_max: float = 2.0) -> None:
        self.address = address
        self._clock = clock
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self._lock = threading.Lock()
        self.up = True
        self.outages = 0  # times it went from answering to not
        self.errors = 0
        self.last_error = ""
        self._retry_at = 0.0
        self._interval = retry_initial
        self._probing = False

    def usable(self) -> bool:
        """May this caller ask the coordinator now? While it is down, one caller per retry
        interval may (it must then report :meth:`ok` or :meth:`down`, or :meth:`abandon`)."""
        with self._lock:
            if self.up:
                return True
            if self._probing or self._clock() < self._retry_at:
                return False
            self._probing = True
            return True

    def retry_in(self) -> float:
        with self._lock:
            return 0.0 if self.up else max(0.0, self._retry_at - self._clock())

    def ok(self) -> None:
        with self._lock:
            recovered = not self.up
            self.up, self._probing, self._interval = True, False, self.retry_initial
        if recovered:
            log.warning("coordinator %s answers again: pools coordinate through it again",
                        self.address)

    def down(self, error: str) -> None:
        with self._lock:
            first, retried = self.up, self._probing
            self.errors += 1
            self.last_error = error
            if first:  # calls in flight when it went away fail too: only the first counts
                self.outages += 1
                self._interval = self.retry_initial
                self._retry_at = self._clock() + self._interval
            elif retried:  # the one caller let through found it still down: wait longer
                self._interval = min(self.retry_max, self._interval * 2)
                self._retry_at = self._clock() + self._interval
            self.up, self._probing = False, False
        if first:
            log.warning("coordinator %s unreachable (%s): pools fall back to their local gate "
                        "and budget (coordinator_fail='open') or refuse new connections "
                        "('closed') until it answers; asking again from time to time",
                        self.address, error)

    def abandon(self) -> None:
        """The caller that was let through while down stopped without an answer."""
        with self._lock:
            self._probing = False

    def call(self, operation: Callable[[], T]) -> Tuple[bool, Optional[T]]:
        """``(True, result)`` of ``operation`` against the coordinator, or ``(False, None)``
        when it is down (now, or not to be asked yet)."""
        if not self.usable():
            return False, None
        try:
            result = operation()
        except BackendDown as exc:
            self.down(str(exc))
            return False, None
        except BaseException:
            self.abandon()
            raise
        self.ok()
        return True, result

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._probing = False


# --- the backend interface ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Census:
    """A destination's budget as the coordinator saw it at one lease call.

    ``granted``: the lease asked for was given. ``total``: leases held by all pools, this
    one's included; ``mine``: by this pool (after the call); ``holders``: live pools of
    the destination; ``share``: ``max(1, global_max // holders)``; ``needy``: other pools
    below their share that were refused a lease recently.
    """

    granted: bool
    total: int
    mine: int
    holders: int
    share: int
    needy: int

    def surplus(self, cap: int) -> int:
        """Leases this pool should give back: those above its share while another pool
        below its share waits, or while the total is above the cap (after a fallback)."""
        if self.mine > self.share and (self.needy > 0 or self.total > cap):
            return min(self.mine - self.share, max(self.needy, self.total - cap, 1))
        return 0


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    """The shared gate's answer to a connect attempt.

    ``action``: ``"go"``; ``"probe"`` (the breaker is half-open and this attempt is its one
    probe); ``"wait"`` (no token: ``wait`` seconds until one); ``"open"`` (the breaker is
    open for ``wait`` more seconds); ``"busy"`` (half-open, another process is probing).
    ``failures``: outage failures in a row, all processes together; ``cause``: the last one.
    """

    action: str
    wait: float
    failures: int
    cause: str = ""


class Coordinator(abc.ABC):
    """Where the state that pools of many processes share is kept (one per address per
    process). Operations are atomic in the backend and raise :class:`BackendDown` when it
    cannot be reached; times are the backend's own clock, one for every host."""

    #: How the coordinator is shown (never with a password).
    address: str = "coordinator"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.health = Health(self.address, clock=clock)
        self._budgets: weakref.WeakSet[Budget] = weakref.WeakSet()

    # -- budget ----------------------------------------------------------------------------
    @abc.abstractmethod
    def lease(self, destination: str, holder: str, *, want: bool, held: int, released: int,
              resync: bool, cap: int, ttl: float, needy_ttl: float) -> Census:
        """Refresh ``holder``'s registration (expiring ``ttl`` s from now) and count; with
        ``want``, also take one lease if the cap and fairness allow.

        The holder's count becomes ``held`` when ``resync`` or when the coordinator does not
        know the holder (new, expired, or the coordinator lost its data), else its count
        less ``released``. Holders whose registration expired are dropped first, with their
        leases. A lease is granted while the total is below ``cap`` and either the holder is
        below its fair share or no other holder below its share is waiting; a holder below
        its share that is refused is marked needy for ``needy_ttl`` s.
        """

    @abc.abstractmethod
    def drop(self, destination: str, holder: str) -> None:
        """Forget ``holder`` and its leases (the pool closed)."""

    # -- gate ------------------------------------------------------------------------------
    @abc.abstractmethod
    def gate_admit(self, destination: str, rate: float, burst: int,
                   probe_timeout: float) -> GateVerdict:
        """One connect attempt asks the shared breaker, then the shared token bucket. When
        the breaker's open time is over the first asker becomes the probe; the probe slot
        lapses after ``probe_timeout`` s if its process never reports."""

    @abc.abstractmethod
    def gate_failed(self, destination: str, threshold: int, wait: float, cause: str) -> None:
        """An outage failure: count it; open the breaker for ``wait`` s when the count
        reaches ``threshold`` or the breaker was open or half-open (a failed probe)."""

    @abc.abstractmethod
    def gate_succeeded(self, destination: str) -> None:
        """The server answered: close the breaker, reset the count."""

    # -- bookkeeping -----------------------------------------------------------------------
    def register(self, budget: Budget) -> None:
        self._budgets.add(budget)

    def process_leases(self, destination: str) -> int:
        """Leases all pools of this process hold toward ``destination``."""
        return sum(b.held for b in list(self._budgets) if b.destination == destination)

    def _after_fork_in_child(self) -> None:
        self.health._after_fork_in_child()


_coordinators: Dict[str, Coordinator] = {}
_coordinators_lock = ProcessLock()  # re-made after a fork and once threading is patched


def coordinator_for(spec: Union[str, Coordinator]) -> Coordinator:
    """The process-wide coordinator for a URL (made on first use), or ``spec`` itself."""
    if isinstance(spec, Coordinator):
        return spec
    with _coordinators_lock:
        found = _coordinators.get(spec)
        if found is None:
            found = _coordinators[spec] = _backend_class(spec)(spec)
        return found


def _backend_class(url: str) -> Any:
    """The backend class for ``url``'s scheme (its module imported now)."""
    scheme = urlsplit(url).scheme
    if scheme not in BACKENDS:
        raise ValueError(f"coordinator must be a URL with scheme "
                         f"{', '.join(sorted(BACKENDS))}, got a {scheme or 'schemeless'} URL")
    module, _, name = BACKENDS[scheme].partition(":")
    return getattr(importlib.import_module(module), name)


def _after_fork_in_child() -> None:
    for coordinator in _coordinators.values():
        coordinator._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
