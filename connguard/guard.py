"""OS resource guard: refuse a new connection before the kernel would.

Two local resources run out under connection churn or leaks: file descriptors (the process's
*soft* ``RLIMIT_NOFILE``; errno 24) and ephemeral ports toward one server address (every
socket toward it, TIME_WAIT included, holds one; errno 99).  :class:`ResourceGuard` is asked
before every new connection a pool opens (:meth:`ResourceGuard.preflight`) and raises
:class:`~connguard.errors.FdLimitReached` or :class:`~connguard.errors.LocalPortsExhausted`
with the numbers while a reserve of each is still left, so the rest of the process (log files,
other pools) and the rest of the host keep working.

Cost: counting sockets (a ``sock_diag`` dump, see :mod:`connguard.census`) takes ~1.5 ms on
a quiet host and 25-30 ms with 30 000 sockets, far too much for every connect.  So the
guard counts once, then *extrapolates*: every connection it admits is assumed to take one
more fd and one more port (closes are ignored, which errs on the safe side).  It counts
again only when the estimate gets near a reserve (at most every ``census_ttl`` seconds),
when the estimate says "refuse" (a refusal is always confirmed by a fresh count), or every
``FAR_TTL_FACTOR`` TTLs when far from both reserves (other processes use ports too).
Guards toward the same server share the count and the estimate (:class:`Tracker`), so a new
pool does not count again.  A checkout of an idle pooled connection never reaches the guard.
See ``docs/guard.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import resource
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Tuple

from connguard import errors
from connguard.census import census, local_port_range, resolve
from connguard.clock import Clock
from connguard.concurrency import ProcessLock
from connguard.limits import fds_in_use, max_connect_rate
from connguard.options import HOUR, RULES, check_number

log = logging.getLogger("connguard.guard")

#: Descriptors kept free under the soft limit for everything else the process opens.
DEFAULT_FD_RESERVE = 32
#: Ephemeral ports kept free toward the server: 5 % of the range, at most 1000, at least 1.
DEFAULT_PORT_RESERVE_SHARE = 0.05
DEFAULT_PORT_RESERVE_CAP = 1000
#: How often (seconds) the guard may count again when near a reserve.
DEFAULT_CENSUS_TTL = 1.0
#: Far from both reserves, count again only every this many TTLs: our own opens are
#: extrapolated, so a recount only catches what *other* processes did meanwhile.
FAR_TTL_FACTOR = 10
#: "Near" a reserve means at most max(reserve, NEAR_MARGIN_MIN) connections above it.
NEAR_MARGIN_MIN = 64

_TW_REUSE = "/proc/sys/net/ipv4/tcp_tw_reuse"



def default_port_reserve(ports_total: int) -> int:
    """The port reserve for a range of ``ports_total`` ports when none is configured."""
    share = int(ports_total * DEFAULT_PORT_RESERVE_SHARE)
    return max(1, min(DEFAULT_PORT_RESERVE_CAP, share))


@dataclasses.dataclass(frozen=True)
class GuardPolicy:
    """How much to keep free, and how stale a count may be.

    ``fd_reserve``: descriptors left under the soft limit; ``port_reserve``: ephemeral ports
    left toward the server (``None``: :func:`default_port_reserve` of the current range);
    ``census_ttl``: seconds a count stays good near a reserve.  A connect is admitted only
    if it leaves at least the reserve free.
    """

    fd_reserve: int = DEFAULT_FD_RESERVE
    port_reserve: Optional[int] = None
    census_ttl: float = DEFAULT_CENSUS_TTL

    def __post_init__(self) -> None:
        RULES["fd_reserve"].check("fd_reserve", self.fd_reserve)
        RULES["port_reserve"].check("port_reserve", self.port_reserve)
        check_number("census_ttl", self.census_ttl, 0, kind="a number of seconds",
                     maximum=HOUR)

    def ports_reserve(self, ports_total: int) -> int:
        if self.port_reserve is not None:
            return self.port_reserve
        return default_port_reserve(ports_total)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One count of this process's fds and the namespace's sockets toward the server.

    Any field is ``None`` when it could not be read; ``fd_soft`` is also ``None`` when the
    limit is unlimited.  ``census`` maps state names to counts (see :func:`census`).
    """

    taken_at: float
    fd_in_use: Optional[int] = None
    fd_soft: Optional[int] = None
    fd_hard: Optional[int] = None
    port_range: Optional[Tuple[int, int]] = None
    census: Optional[Mapping[str, int]] = None

    @property
    def ports_total(self) -> Optional[int]:
        if self.port_range is None:
            return None
        return self.port_range[1] - self.port_range[0] + 1

    @property
    def ports_in_use(self) -> Optional[int]:
        """Sockets toward the server that hold a local port: every state but LISTEN."""
        if self.census is None:
            return None
        return sum(count for state, count in self.census.items() if state != "listen")

    def fds_left(self, opens: int) -> Optional[int]:
        """Descriptors left under the soft limit after ``opens`` more connections."""
        if self.fd_soft is None or self.fd_in_use is None:
            return None
        return self.fd_soft - self.fd_in_use - opens

    def ports_free(self, opens: int) -> Optional[int]:
        """Ports free toward the server after ``opens`` more connections.

        A port is per 4-tuple, so ports used toward *other* destinations do not count.
        """
        total, used = self.ports_total, self.ports_in_use
        if total is None or used is None:
            return None
        return total - used - opens


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a connect must not happen: which resource, how much is left, the reserve."""

    resource: str  # "fds" or "ports"
    left: int
    reserve: int


# --- pure decisions -----------------------------------------------------------------------

FAR, NEAR, REFUSE, UNKNOWN = "far", "near", "refuse", "unknown"


def headroom(left: Optional[int], reserve: int) -> str:
    """Classify what is ``left`` of a resource against its ``reserve``.

    REFUSE when one more connection would leave less than the reserve; NEAR within
    max(reserve, NEAR_MARGIN_MIN) connections of that; FAR beyond; UNKNOWN without numbers.
    """
    if left is None:
        return UNKNOWN
    spare = left - reserve  # connections that still fit
    if spare < 1:
        return REFUSE
    if spare <= max(reserve, NEAR_MARGIN_MIN):
        return NEAR
    return FAR


def headrooms(snapshot: Snapshot, opens: int, policy: GuardPolicy) -> Dict[str, str]:
    """``{"fds": ..., "ports": ...}``: the :func:`headroom` of each resource."""
    ports_reserve = policy.ports_reserve(snapshot.ports_total or 0)
    return {"fds": headroom(snapshot.fds_left(opens), policy.fd_reserve),
            "ports": headroom(snapshot.ports_free(opens), ports_reserve)}


def refresh_due(snapshot: Optional[Snapshot], opens: int, now: float,
                policy: GuardPolicy) -> bool:
    """Whether to count again before deciding on the next connect."""
    if snapshot is None:
        return True
    age = now - snapshot.taken_at
    states = set(headrooms(snapshot, opens, policy).values())
    if REFUSE in states:
        # Refuse only on a real count: recount unless this very count (no admissions since)
        # already said so within the TTL; then refusals are cheap while the limit holds.
        return opens > 0 or age >= policy.census_ttl
    if NEAR in states:
        return age >= policy.census_ttl
    return age >= policy.census_ttl * FAR_TTL_FACTOR


def far_budget(snapshot: Snapshot, policy: GuardPolicy) -> int:
    """How many connects after ``snapshot`` keep every known resource FAR from its reserve.

    While fewer were admitted (and the count is younger than the far TTL) the full decision
    cannot come out differently, so the guard's fast path only compares two numbers.
    """
    budget = 1 << 62  # nothing known: no bound from the numbers
    fds_left, ports_free = snapshot.fds_left(0), snapshot.ports_free(0)
    ports_reserve = policy.ports_reserve(snapshot.ports_total or 0)
    for left, reserve in ((fds_left, policy.fd_reserve), (ports_free, ports_reserve)):
        if left is not None:
            # FAR after n admissions iff left - n - reserve > max(reserve, NEAR_MARGIN_MIN).
            budget = min(budget, left - reserve - max(reserve, NEAR_MARGIN_MIN))
    return max(0, budget)


def judge(snapshot: Snapshot, opens: int, policy: GuardPolicy) -> Optional[Refusal]:
    """The refusal for one more connect after ``opens`` admitted ones, or None to admit.

    Descriptors first: without one, no socket at all can be made.
    """
    fds_left = snapshot.fds_left(opens)
    if fds_left is not None and headroom(fds_left, policy.fd_reserve) == REFUSE:
        return Refusal("fds", fds_left, policy.fd_reserve)
    ports_free = snapshot.ports_free(opens)
    ports_reserve = policy.ports_reserve(snapshot.ports_total or 0)
    if ports_free is not None and headroom(ports_free, ports_reserve) == REFUSE:
        return Refusal("ports", ports_free, ports_reserve)
    return None


# --- probes: where the numbers come from (injectable for tests) ---------------------------


def _nofile() -> Tuple[Optional[int], Optional[int]]:
    """(soft, hard) RLIMIT_NOFILE, unlimited as None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (None if soft == resource.RLIM_INFINITY else soft,
            None if hard == resource.RLIM_INFINITY else hard)


@dataclasses.dataclass(frozen=True)
class Probes:
    """The functions the guard reads the system with; tests replace some of them."""

    census: Callable[[str, int], Mapping[str, int]] = census
    fds_in_use: Callable[[], Optional[int]] = fds_in_use
    nofile: Callable[[], Tuple[Optional[int], Optional[int]]] = _nofile
    port_range: Callable[[], Tuple[int, int]] = local_port_range
    resolve: Callable[[str], Tuple[str, ...]] = resolve


def _quietly(what: str, probe: Callable[[], Any]) -> Any:
    """``probe()``, or None if it fails: a guard that cannot measure must not break connects."""
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown", never an error
        log.debug("resource guard: cannot read %s: %s", what, exc)
        return None


# --- the guard ------------------------------------------------------------------------------


class Tracker:
    """What every guard toward one destination in this process shares: the last count,
    the connects admitted since, the resolved addresses.

    Shared because the ports toward a server are one pool of resources whichever connguard
    pool (or credentials) opens them, and so that a new pool does not pay for a count
    another one just made.  Reserves stay per guard.
    """

    def __init__(self, host: str, port: int, probes: Probes, clock: Clock) -> None:
        self.host, self.port, self.probes, self.clock = host, port, probes, clock
        self.lock = threading.Lock()  # guards snapshot and opens; never held over I/O
        self.refresh_lock = threading.Lock()  # one count at a time
        self.snapshot: Optional[Snapshot] = None
        self.opens = 0  # connects admitted since snapshot was taken
        self.addresses: Optional[Tuple[str, ...]] = None
        self.censuses = 0  # counts taken (for tests and stats)

    def refresh(self, seen: Optional[Snapshot]) -> None:
        """Count again, unless another thread did since ``seen`` was current."""
        with self.refresh_lock:
            with self.lock:
                if self.snapshot is not seen:
                    return
                opens_before = self.opens
            fresh = self._take_snapshot()
            with self.lock:
                # Connects admitted while we counted may be missing from the count: keep
                # them as extrapolated opens (at worst counted twice, the safe side).
                self.opens -= opens_before
                self.snapshot = fresh
                self.censuses += 1

    def _take_snapshot(self) -> Snapshot:
        taken_at = self.clock()
        probes = self.probes
        soft, hard = _quietly("RLIMIT_NOFILE", probes.nofile) or (None, None)
        return Snapshot(taken_at=taken_at, fd_in_use=_quietly("fds in use", probes.fds_in_use),
                        fd_soft=soft, fd_hard=hard,
                        port_range=_quietly("ip_local_port_range", probes.port_range),
                        census=self._count())

    def _count(self) -> Optional[Dict[str, int]]:
        """Sockets toward the server by state, summed over its addresses; None if unknown."""
        if self.addresses is None:
            # Resolved once; a failure is retried at the next count, never raised.
            self.addresses = _quietly(f"addresses of {self.host}",
                                      lambda: self.probes.resolve(self.host)) or None
        if not self.addresses:
            return None
        total: Counter[str] = Counter()
        for address in self.addresses:
            counts = _quietly(f"sockets toward {address}:{self.port}",
                              functools.partial(self.probes.census, address, self.port))
            if counts is None:
                return None
            total.update(counts)
        return dict(total)

    def after_fork_in_child(self) -> None:
        """A forked child starts afresh: new locks (a parent thread may have held them) and
        no count (its descriptors are not the parent's)."""
        self.lock = threading.Lock()
        self.refresh_lock = threading.Lock()
        self.snapshot = None
        self.opens = 0


_trackers: weakref.WeakValueDictionary[Hashable, Tracker] = weakref.WeakValueDictionary()
_trackers_lock = ProcessLock()  # re-made after a fork and once threading is patched


def tracker_for(host: str, port: int, probes: Probes, clock: Clock) -> Tracker:
    """The process-wide tracker for this destination (and these probes and clock)."""
    key = (host, port, probes, clock)
    with _trackers_lock:
        tracker = _trackers.get(key)
        if tracker is None:
            tracker = Tracker(host, port, probes, clock)
            _trackers[key] = tracker
        return tracker


def _after_fork_in_child() -> None:
    for tracker in list(_trackers.values()):
        tracker.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ResourceGuard:
    """Refuses a new connection to ``(host, port)`` before the kernel would.

    ``preflight()`` raises :class:`~connguard.errors.FdLimitReached` when fewer than
    ``fd_reserve`` descriptors would be left under the soft ``RLIMIT_NOFILE``, and
    :class:`~connguard.errors.LocalPortsExhausted` when fewer than ``port_reserve``
    ephemeral ports would be left toward the server; it never raises anything else.
    Thread-safe; guards toward the same destination share their count (:class:`Tracker`).
    """

    def __init__(self, host: str, port: int, *, fd_reserve: int = DEFAULT_FD_RESERVE,
                 port_reserve: Optional[int] = None, census_ttl: float = DEFAULT_CENSUS_TTL,
                 clock: Clock = time.monotonic, probes: Optional[Probes] = None) -> None:
        self.host = host
        self.port = port
        self.policy = GuardPolicy(fd_reserve, port_reserve, census_ttl)
        self._tracker = tracker_for(host, port, probes or Probes(), clock)
        self._clock = clock
        # The fast path: while the tracker's snapshot is _budget_for, fewer than _budget
        # connects were admitted since and it is before _budget_until, admit at once.
        self._budget_for: Optional[Snapshot] = None
        self._budget = 0
        self._budget_until = 0.0

    @property
    def censuses(self) -> int:
        """How many counts were taken for this destination in this process."""
        return self._tracker.censuses

    def preflight(self) -> None:
        """Raise FdLimitReached / LocalPortsExhausted if a connect would exhaust a limit."""
        now = self._clock()
        tracker = self._tracker
        with tracker.lock:
            if (tracker.opens < self._budget and now < self._budget_until
                    and tracker.snapshot is self._budget_for):
                tracker.opens += 1  # far from both reserves: nothing to decide
                return
            seen = tracker.snapshot
            due = refresh_due(seen, tracker.opens, now, self.policy)
            decision = None if due else self._admit_locked()
        if due:
            tracker.refresh(seen)
            with tracker.lock:
                decision = self._admit_locked()
        if decision is not None:
            raise self._error(*decision)

    def snapshot(self) -> Optional[Snapshot]:
        """The last count (None before the first connect)."""
        return self._tracker.snapshot

    def _admit_locked(self) -> Optional[Tuple[Refusal, Snapshot, int]]:
        """Count one connect as admitted, or return why not (with the numbers it saw).

        Called with the tracker's lock held, so concurrent connects cannot both take the
        last slot.
        """
        tracker = self._tracker
        snapshot, opens = tracker.snapshot, tracker.opens
        assert snapshot is not None
        if snapshot is not self._budget_for:
            self._budget_for = snapshot
            self._budget = far_budget(snapshot, self.policy)
            self._budget_until = snapshot.taken_at + self.policy.census_ttl * FAR_TTL_FACTOR
        refusal = judge(snapshot, opens, self.policy)
        if refusal is None:
            tracker.opens += 1
            return None
        return refusal, snapshot, opens

    # -- the error ---------------------------------------------------------------------------

    def _error(self, refusal: Refusal, snapshot: Snapshot, opens: int) -> errors.ConnGuardError:
        fds = refusal.resource == "fds"
        cls = errors.FdLimitReached if fds else errors.LocalPortsExhausted
        try:
            diagnosis = refusal_diagnosis(refusal, snapshot, opens, self.policy, self.host,
                                          self.port)
            diagnosis["tcp_tw_reuse"] = _quietly("tcp_tw_reuse", _read_tw_reuse)
            return errors.preflight_refusal(fds, diagnosis)
        except Exception:  # noqa: BLE001 - the refusal itself must still be raised
            log.exception("resource guard: could not describe %s", refusal)
            return cls(2003, f"refused before connect() to {self.host}:{self.port}: "
                             f"{refusal.left} {refusal.resource} left, reserve {refusal.reserve}")

    def __repr__(self) -> str:
        snap, opens = self._tracker.snapshot, self._tracker.opens
        if snap is None:
            return f"<ResourceGuard {self.host}:{self.port} (no count yet)>"
        return (f"<ResourceGuard {self.host}:{self.port} fds left {snap.fds_left(opens)}"
                f" ports free {snap.ports_free(opens)} | {self.policy}>")


def _read_tw_reuse() -> int:
    with open(_TW_REUSE, encoding="ascii") as handle:
        return int(handle.read())


# --- the facts behind a refusal (errors.preflight_refusal words them) -------------------

def _states_text(counts: Optional[Mapping[str, int]]) -> Optional[str]:
    """"established 38, time_wait 2": the non-zero states, largest first."""
    if not counts:
        return None
    items = sorted(((n, s) for s, n in counts.items() if n), reverse=True)
    return ", ".join(f"{state} {count:,}" for count, state in items) or "no sockets"


def refusal_diagnosis(refusal: Refusal, snapshot: Snapshot, opens: int, policy: GuardPolicy,
                      host: str, port: int) -> Dict[str, Any]:
    """Every number behind a refusal, for ``exc.diagnosis`` and the message."""
    ports_total = snapshot.ports_total
    return {
        "refused_by": "connguard resource guard",
        "resource": refusal.resource,
        "host": host,
        "port": port,
        "fd_soft": snapshot.fd_soft,
        "fd_hard": snapshot.fd_hard,
        "fd_in_use": snapshot.fd_in_use,
        "fds_left": snapshot.fds_left(opens),
        "fd_reserve": policy.fd_reserve,
        "port_range": snapshot.port_range,
        "ports_in_use": snapshot.ports_in_use,
        "ports_free": snapshot.ports_free(opens),
        "port_reserve": policy.ports_reserve(ports_total) if ports_total else None,
        "census": dict(snapshot.census) if snapshot.census is not None else None,
        "states_text": _states_text(snapshot.census),
        "opened_since_census": opens,
        "max_connect_rate": max_connect_rate(ports_total),
    }
