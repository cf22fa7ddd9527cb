"""State that the pools of many processes share: a global connection budget and connect gate.

A pool on its own sees one process. The limit that matters once a service runs on several
hosts is the server's ``max_connections``, shared by every worker of every host, and a
reconnect storm is the sum of all of them. With ``coordinator=`` a pool keeps that shared
state in a backend (Redis: :mod:`connguard.redis_coordination`):

* **the budget** (``global_max``): a lease per open server connection per destination. A pool
  takes one before it connects and gives it back when it closes the connection; its leases
  live in the coordinator under a TTL that the process refreshes from the reaper thread, so a
  process that dies (even ``kill -9``) loses them within the TTL. A pool that gets no lease
  waits for one of its own connections, as under the adaptive ceiling, instead of failing.
* **the gate**: one token bucket and one breaker per destination for all processes
  (:class:`CoordinatedGate`, the shared half of a :class:`~connguard.storm.ConnectGate`).

The coordinator is asked on the connect path only (and by the reaper thread): never on the
checkout of an idle connection, never on its return. When it does not answer, pools fall back
to their local gate and budget and the process logs it once (``coordinator_fail="open"``, the
default) or refuses new connections (``"closed"``); it is asked again, one caller at a time,
with a growing interval, and picked up again without a restart.

Without ``coordinator`` nothing here is used: the in-process gate and the pool's own
``max_size`` apply as before. ``host_gate`` (:mod:`connguard.hostgate`) is the other shared
backend of the gate, for the processes of one host.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import socket
import threading
import time
from typing import Any, Dict, Hashable, Optional, TypeVar, Union

from connguard import errors, redaction
from connguard.backend import (  # noqa: F401 - the backend interface, re-exported
    BACKENDS,
    BackendDown,
    Census,
    Coordinator,
    GateVerdict,
    Health,
    coordinator_for,
)
from connguard.clock import Clock, Sleep
from connguard.errors import CoordinatorUnavailable, LeaseUnavailable  # noqa: F401 - re-exported
from connguard.options import FAIL_MODES, RULES  # noqa: F401 - FAIL_MODES re-exported
from connguard.storm import StormPolicy

log = logging.getLogger("connguard.coordination")

T = TypeVar("T")

# How a connect attempt ended, as the gate's shared backends are told.
SUCCEEDED, OUTAGE, CAPACITY, PERMANENT, ABANDONED = (
    "succeeded", "outage", "capacity", "permanent", "abandoned")


def summary(exc: Optional[BaseException], limit: int = 300) -> str:
    """``ClassName: first line`` of an exception, bounded and with its secrets masked by
    structure (it goes over the wire, into Redis, where every process of the fleet reads it)."""
    return errors.redact(errors.summary(exc) or "")[:limit]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the only form that is ever shown.

    By structure (:func:`connguard.redaction.redact_url`): the userinfo up to the URL's last
    ``@`` (a password may hold ``@``, ``/`` and blanks), and a ``password=`` query parameter."""
    return redaction.redact_url(url)


# --- settings -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoordinationSettings:
    """The pool options of this module, validated. ``coordinator=None``: nothing shared.

    ``global_max``: leases (open server connections) all pools toward the destination may
    hold together; without it only the gate is shared. ``fail``: ``"open"`` (fall back to the
    local gate and budget) or ``"closed"`` (refuse new connections) while the coordinator is
    unreachable. ``lease_ttl``: seconds a process's leases outlive its last refresh (it
    refreshes every third of that from the reaper thread). ``key``: the name the budget and
    the gate are kept under; by default ``host:port`` as the pool connects, so every process
    must name the server the same way (or all set the same ``coordinator_key``).
    """

    coordinator: Union[None, str, Coordinator] = None
    global_max: Optional[int] = None
    fail: str = "open"
    lease_ttl: float = 15.0
    key: Optional[str] = None

    def __repr__(self) -> str:
        # The coordinator URL may hold a password: shown only without it.
        spec = self.coordinator
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["coordinator"] = redact_url(spec) if isinstance(spec, str) else spec
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in values.items())})"

    def __post_init__(self) -> None:
        for option, field in POOL_OPTION_FIELDS.items():
            RULES[option].check(option, getattr(self, field))
        # None is the default, as for the pool options (settings_from_options drops them).
        for field in ("fail", "lease_ttl"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, getattr(CoordinationSettings, field))
        if self.global_max is not None and self.coordinator is None:
            raise ValueError("global_max needs a coordinator (coordinator='redis://...'): "
                             "without one no process can see the others' connections")


#: Pool options of this module and the CoordinationSettings field each one sets.
POOL_OPTION_FIELDS = {
    "coordinator": "coordinator",
    "global_max": "global_max",
    "coordinator_fail": "fail",
    "lease_ttl": "lease_ttl",
    "coordinator_key": "key",
}


def settings_from_options(options: Dict[str, Any]) -> CoordinationSettings:
    """CoordinationSettings from pool options; raises ValueError naming a bad one."""
    return CoordinationSettings(**{field: options[name]
                                   for name, field in POOL_OPTION_FIELDS.items()
                                   if name in options and options[name] is not None})


def destination_key(host: str, port: int, override: Optional[str] = None) -> str:
    """The name a destination's shared state is kept under."""
    if override:
        return override
    if not port:  # a unix socket names a server of this host only
        return f"unix:{socket.gethostname()}:{host}"
    return f"{host}:{port}"


# --- the shared half of the connect gate ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SharedOpen:
    """A shared backend's answer that the breaker is open (the gate fails fast with it)."""

    retry_after: float
    failures: int
    cause: str = ""


class CoordinatedGate:
    """The cluster-wide half of a :class:`~connguard.storm.ConnectGate`: one token bucket and
    one breaker per destination for every process, kept in a coordinator.

    The local gate decides first (its own bucket, backoff and breaker, no I/O); then this
    asks the coordinator once per attempt. A process that sees the shared breaker open fails
    fast and holds its local breaker open for the same time, so it asks again only then.
    """

    def __init__(self, coordinator: Coordinator, destination: str, policy: StormPolicy,
                 fail: str = "open", probe_timeout: float = 11.0) -> None:
        self.coordinator = coordinator
        self.destination = destination
        self.policy = policy
        self.fail = fail
        self.probe_timeout = probe_timeout
        self.key: Hashable = ("coordinated", id(coordinator), destination, fail, probe_timeout)
        self._attempt = threading.local()  # what admit() saw, for finished() on this thread
        self.refusals = 0

    @property
    def health(self) -> Health:
        return self.coordinator.health

    def admit(self, deadline: float, clock: Clock, sleep: Sleep) -> Optional[SharedOpen]:
        """None: go. A :class:`SharedOpen`: the shared breaker is open. Waits for a shared
        token until ``deadline`` (then CircuitOpen); raises CoordinatorUnavailable when the
        coordinator is down and the pool fails closed."""
        self._attempt.report = False
        while True:
            reached, verdict = self.health.call(lambda: self.coordinator.gate_admit(
                self.destination, self.policy.rate, self.policy.burst, self.probe_timeout))
            if not reached or verdict is None:
                if self.fail == "closed":
                    raise CoordinatorUnavailable(self.coordinator.address,
                                                 self.health.last_error, self.health.retry_in())
                return None  # fail open: the local gate alone decides
            if verdict.action in ("go", "probe"):
                self._attempt.report = verdict.failures > 0 or verdict.action == "probe"
                self._attempt.failures = verdict.failures
                return None
            if verdict.action in ("open", "busy"):
                self.refusals += 1
                wait = verdict.wait if verdict.action == "open" else min(
                    verdict.wait, self.policy.backoff_max)
                return SharedOpen(wait, verdict.failures, verdict.cause)
            now = clock()
            if now + verdict.wait > deadline:
                raise errors.GateTimeout(verdict.wait, scope="cluster-wide")
            sleep(verdict.wait)

    def finished(self, outcome: str, error: Optional[BaseException] = None) -> None:
        """Tell the shared breaker how the attempt ended (outage failures, and a success
        only when the breaker had counted failures or this was its probe)."""
        report = getattr(self._attempt, "report", False)
        self._attempt.report = False
        if outcome == OUTAGE:
            seen = getattr(self._attempt, "failures", 0)
            wait = self.policy.backoff(seen + 1)
            self.health.call(lambda: self.coordinator.gate_failed(
                self.destination, self.policy.breaker_threshold, wait, summary(error)))
        elif outcome in (SUCCEEDED, CAPACITY, PERMANENT) and report:
            # The server answered (even "full" or "access denied"): it is not down.
            self.health.call(lambda: self.coordinator.gate_succeeded(self.destination))
        # ABANDONED: a probe slot this attempt held lapses after probe_timeout.


# --- the budget -----------------------------------------------------------------------------

_serial = itertools.count(1)

#: Seconds between lease requests of a pool below its fair share that was refused: short,
#: so a freed lease finds it soon. A pool at or above its share backs off to LEASE_PROBE_MAX.
LEASE_PROBE = 0.1
LEASE_PROBE_MAX = 1.0
#: Seconds a refused pool below its share stays marked needy without asking again.
NEEDY_TTL = 1.5


class Budget:
    """One pool's part of a destination's global connection budget.

    ``held`` counts the leases the pool holds (one per open server connection or handshake
    under way). :meth:`acquire` runs on the connect path; :meth:`release` only counts (no
    I/O: it runs wherever a connection is closed, return included); the coordinator hears of
    releases, and of the pool being alive, from :meth:`refresh` on the reaper thread (every
    ``ttl / 3`` s, or at the next pass after a release) or with the next lease request.

    A pool's calls to the coordinator are serialized by a lock of their own (never the
    pool's lock), so the count the coordinator keeps for the pool is exactly ``held`` plus
    the releases not sent yet, and a count sent afresh (after an error) is never overtaken
    by an older one. Connects of one pool are few and rate-limited: the wait is short.

    While the coordinator is down a fail-open pool allows itself its *fallback budget*: the
    larger of what it held at the last answer and its fair share then (``global_max`` if it
    never had an answer), at most ``max_size``. When it answers again the pool's count is
    sent afresh (it may have opened connections meanwhile) and pools above their share give
    connections back until the total is under the cap again.
    """

    def __init__(self, coordinator: Coordinator, destination: str, *, cap: int, ttl: float,
                 fail: str = "open", max_size: int = 10, clock: Clock = time.monotonic) -> None:
        self.coordinator = coordinator
        self.destination = destination
        self.cap, self.ttl, self.fail, self.max_size = cap, ttl, fail, max_size
        self._clock = clock
        self._lock = threading.Lock()  # the counters; never held across I/O
        self._io = threading.Lock()  # one coordinator call at a time for this pool
        self.held = 0
        self._unsent = 0  # releases the coordinator has not heard of yet
        self._resync = True  # send the absolute count: first contact, or after an error
        self.census: Optional[Census] = None
        self.surplus = 0
        self.denied = 0
        self._denied_in_row = 0
        self._next_refresh = 0.0
        self._closed = False
        self._holder: Optional[str] = None
        coordinator.register(self)

    @property
    def holder(self) -> str:
        """This pool's name in the coordinator: host, pid, a serial and a random tag."""
        if self._holder is None:
            self._holder = (f"{socket.gethostname()}:{os.getpid()}:{next(_serial)}:"
                            f"{random.getrandbits(24):06x}")
        return self._holder

    @property
    def health(self) -> Health:
        return self.coordinator.health

    def state(self) -> str:
        """``"ok"``, ``"fallback"`` (down, fail open) or ``"refusing"`` (down, fail closed)."""
        if self.health.up:
            return "ok"
        return "fallback" if self.fail == "open" else "refusing"

    # -- connect path ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Take a lease for one new connection, or raise LeaseUnavailable (the pool waits)
        or CoordinatorUnavailable (down and failing closed)."""
        census = self._call(want=True)
        if census is not None:
            if census.granted:
                return
            raise LeaseUnavailable(self.destination, self.cap, census,
                                   self._probe_interval(census))
        if self.fail == "closed":
            raise CoordinatorUnavailable(self.coordinator.address, self.health.last_error,
                                         self.health.retry_in())
        with self._lock:
            if self.held < self.fallback_cap():
                self.held += 1
                return
        raise LeaseUnavailable(self.destination, self.cap, None, 0.5, fallback=True)

    def fallback_cap(self) -> int:
        census = self.census
        if census is None:
            return min(self.max_size, self.cap)
        return min(self.max_size, max(census.mine, census.share))

    def _probe_interval(self, census: Census) -> float:
        if census.mine < census.share:
            base = LEASE_PROBE
        else:
            base = min(LEASE_PROBE_MAX, LEASE_PROBE * 2 ** max(0, self._denied_in_row - 1))
        return base * random.uniform(0.5, 1.5)  # processes must not ask in step

    def _call(self, want: bool, drop: bool = False) -> Optional[Census]:
        """One lease call (or the drop), or None when the coordinator is down."""
        with self._io:
            if not self.health.usable():
                return None
            with self._lock:
                held = self.held
                released, self._unsent = self._unsent, 0
                resync, self._resync = self._resync, False
            try:
                if drop:
                    self.coordinator.drop(self.destination, self.holder)
                    census = None
                else:
                    census = self.coordinator.lease(
                        self.destination, self.holder, want=want, held=held,
                        released=released, resync=resync, cap=self.cap, ttl=self.ttl,
                        needy_ttl=NEEDY_TTL)
            except BaseException as exc:
                with self._lock:
                    # Whether it was applied is unknown: the next call sends the count afresh.
                    self._unsent += released
                    self._resync = True
                if isinstance(exc, BackendDown):
                    self.health.down(str(exc))
                    return None
                self.health.abandon()
                raise
            self.health.ok()
            with self._lock:
                if census is None:
                    return None
                self.census = census
                self.surplus = census.surplus(self.cap)
                self._next_refresh = self._clock() + self.ttl / 3
                if want and census.granted:
                    self.held += 1
                    self._denied_in_row = 0
                elif want:
                    self.denied += 1
                    self._denied_in_row += 1
            return census

    # -- release and housekeeping (no I/O but on the reaper thread and at close) -----------
    def release(self) -> None:
        """One leased connection was closed (counted now, sent at the next refresh)."""
        with self._lock:
            if self.held > 0:
                self.held -= 1
                self._unsent += 1

    def take_surplus(self) -> bool:
        """Should the pool close one more connection to give its lease to another pool?"""
        with self._lock:
            if self.surplus > 0 and self.health.up:
                self.surplus -= 1
                return True
            return False

    def refresh(self) -> None:
        """From the reaper: keep the registration alive (every ``ttl / 3`` s) and send
        releases (at the next pass after one)."""
        with self._lock:
            due = not self._closed and (self._clock() >= self._next_refresh or self._unsent > 0)
        if due:
            self._call(want=False)

    def close(self) -> None:
        """The pool closed: send its releases, and forget it once it holds nothing."""
        with self._lock:
            self._closed = True
            held = self.held
        self._call(want=False, drop=held == 0)

    def after_fork(self) -> None:
        """In a forked child: it holds none of the parent's leases and is a new holder."""
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self.held = self._unsent = self.surplus = self._denied_in_row = 0
        self._resync = True
        self.census = None
        self._holder = None
        self._next_refresh = 0.0

    def stats(self) -> Dict[str, Any]:
        census = self.census
        return {"coordinator": self.coordinator.address, "coordinator_state": self.state(),
                "coordinator_outages": self.health.outages, "global_max": self.cap,
                "leases_held": self.held,
                "leases_process": self.coordinator.process_leases(self.destination),
                "leases_global": None if census is None else census.total,
                "lease_holders": None if census is None else census.holders,
                "lease_share": None if census is None else census.share,
                "lease_denied": self.denied}



