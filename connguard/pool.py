"""The connection pool: hands out live connections, takes them back clean.

Rules the code keeps (after httpcore and SQLAlchemy's pool):

* decide under the lock, do I/O outside it: no connect, close, query or liveness check runs
  while ``_lock`` is held, so a slow server never stalls callers that could be served;
* every idle connection is checked for a peer close before it is handed out (one
  non-blocking syscall, no round trip); dead ones are dropped and replaced silently;
* a connection that saw a connection-level error is never returned to the idle set.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import threading
import time
import traceback
from collections import Counter, deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import pymysql

from connguard import coordination, drivers, errors, events, metrics, reaper, storm
from connguard.admission import Admission
from connguard.arguments import POOL_OPTIONS, split_arguments
from connguard.clock import Clock
from connguard.connector import Connector
from connguard.guard import ResourceGuard
from connguard.hostgate import HostGate, check_option
from connguard.liveness import Probe, peer_closed
from connguard.metrics import BOUNDS, PoolMetrics
from connguard.policies import (
    KeepalivePolicy,
    LifetimePolicy,
    PoolSettings,
    ResetPolicy,
    keepalive_from_option,
)
from connguard.proxy import Lease, PooledConnection
from connguard.storm import Ceiling, StormPolicy

log = logging.getLogger("connguard.pool")
_bucket = bisect.bisect_left


#: Why a pooled connection was closed (the ``closed`` counter's keys).
CLOSE_REASONS = ("peer_closed", "expired", "idle_timeout", "broken", "discarded", "overflow",
                 "rebalanced", "pool_closed", "reconnected")

#: What driver.restore_session did -> the stats() counter it counts in ("discard" counts
#: as the reason the connection is closed).
_RESET_COUNTERS = {"rollback": "rollbacks", "reset": "resets", "restored": "restored"}


@dataclasses.dataclass(eq=False)
class Entry:
    """One pooled server connection and what the pool knows about it."""

    conn: pymysql.connections.Connection
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


class Waiter:
    """A caller waiting for a connection, in line: the pool serves the oldest first.

    The pool hands it an entry (``entry``) or a reserved connect slot (``may_open``) under
    its lock, then wakes it; a waiter never takes for itself while older ones wait, so
    newcomers cannot barge past them (HikariCP's and SQLAlchemy's hand-off, FIFO).
    """

    __slots__ = ("cond", "entry", "may_open")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.entry: Optional[Entry] = None
        self.may_open = False


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


def build_policies(options: Dict[str, Any]) -> Tuple[PoolSettings, LifetimePolicy, ResetPolicy]:
    """The policy objects for a pool's options; raises ValueError naming a bad option."""
    storm.policy_from_options(options)  # validated here too, before anything is started
    coordination.settings_from_options(options)
    keepalive_from_option(options.get("keepalive", True))
    check_option(options.get("host_gate", False))
    settings = PoolSettings(**{k: v for k, v in options.items()
                               if k in PoolSettings.__dataclass_fields__})
    lifetime = LifetimePolicy(
        max_lifetime=options.get("max_lifetime", LifetimePolicy.max_lifetime),
        jitter=options.get("lifetime_jitter", LifetimePolicy.jitter),
        idle_timeout=options.get("idle_timeout", LifetimePolicy.idle_timeout))
    return settings, lifetime, ResetPolicy(options.get("reset", ResetPolicy.mode))


class Pool:
    """A thread-safe pool of PyMySQL connections to one server with one set of credentials.

    ``Pool(**pymysql_connect_arguments, max_size=10, ...)``; see ``docs/pool.md`` for every
    option. ``pool.connect()`` returns a connection that behaves like PyMySQL's and whose
    ``close()`` (or ``with`` block end) returns it to the pool.
    """

    def __init__(self, *, clock: Clock = time.monotonic, **kwargs: Any) -> None:
        self._driver: Any = drivers.seam(kwargs.get("driver", "pymysql"))
        options, self._connect_kwargs = split_arguments(kwargs, where="connguard.Pool")
        self._settings, self._lifetime, self._reset = build_policies(options)
        self._tracked_reset = self._reset.mode == "rollback"  # read on every return
        self._clock = clock
        self._host, self._port = self._driver.destination(self._connect_kwargs)
        self._storm: Optional[StormPolicy] = (
            storm.policy_from_options(options) if options.get("storm_control", True) else None)
        self._coordination = coordination.settings_from_options(options)
        self._coordinator = (coordination.coordinator_for(self._coordination.coordinator)
                             if self._coordination.coordinator is not None else None)
        self._destination = coordination.destination_key(self._host, self._port,
                                                          self._coordination.key)
        self._budget = self._make_budget()
        # Growth: handshake cap, the ceilings learnt from the server and the global budget.
        self._admission = Admission.for_policy(self._storm, self._settings.limit,
                                               budget=self._budget is not None)
        keepalive: Optional[KeepalivePolicy] = keepalive_from_option(
            options.get("keepalive", True))
        self._connector = Connector(self._connect_kwargs, driver=self._driver,
                                    guard=self._make_guard(options),
                                    gate=self._make_gate(options),
                                    server_facts=self._server_facts,
                                    keepalive=keepalive.as_tuple() if keepalive else None,
                                    fail_fast=bool(self._storm and self._storm.fail_fast))
        self._options = dict(options)  # as given: the drop-in compares later calls to them
        self._wait_timeout: Optional[int] = None
        self._server_limits: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self._idle: Deque[Entry] = deque()
        self._in_use: Set[Entry] = set()
        self._lost: Deque[Entry] = deque()  # entries whose handle was garbage collected
        self._waiters: Deque[Waiter] = deque()  # oldest first
        self._opening = 0
        self._top_up_running = False
        self._closed = False
        self._stats: Counter = Counter()
        name = options.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self._metrics = PoolMetrics(metrics.claim_name(name or self._describe_destination(),
                                                       self), events.Listeners())
        metrics.register(self)
        reaper.register(self)

    def _make_guard(self, options: Dict[str, Any]) -> Optional[ResourceGuard]:
        if not options.get("resource_guard", True) or not self._port:
            return None  # opted out, or a unix socket: no ephemeral port to run out of
        reserves = {k: options[k] for k in ("fd_reserve", "port_reserve") if k in options}
        return ResourceGuard(self._host, self._port, **reserves)

    def _make_gate(self, options: Dict[str, Any]) -> Optional[storm.ConnectGate]:
        if self._storm is None:
            return None
        host_gate = None
        chosen = options.get("host_gate", False)
        if chosen:
            directory = chosen if isinstance(chosen, str) else None
            host_gate = HostGate(self._host, self._port, self._storm.max_handshakes, directory)
        shared = []
        if self._coordinator is not None:
            # The probe slot lapses a little after the longest a handshake may take.
            probe_timeout = float(self._connect_kwargs.get("connect_timeout") or 10) + 1.0
            shared.append(coordination.CoordinatedGate(
                self._coordinator, self._destination, self._storm,
                fail=self._coordination.fail, probe_timeout=probe_timeout))
        return storm.gate_for(self._host, self._port, self._storm, host_gate, shared=shared)

    def _make_budget(self) -> Optional[coordination.Budget]:
        settings = self._coordination
        if self._coordinator is None or settings.global_max is None:
            return None
        return coordination.Budget(self._coordinator, self._destination,
                                   cap=settings.global_max, ttl=settings.lease_ttl,
                                   fail=settings.fail, max_size=self._settings.max_size,
                                   clock=self._clock)

    # -- checkout --------------------------------------------------------------------------
    def connect(self) -> PooledConnection:
        """A live connection from the pool; waits up to ``checkout_timeout`` for one."""
        try:
            entry = self._checkout()
        except errors.ConnGuardError as exc:  # also the driver's class (mysqlclient's)
            own = self._driver.own_error(exc)
            if own is exc:
                raise
            raise own from exc.__cause__
        handle = None
        try:
            handle = self._driver.Handle(entry.conn)
            handle._self_pool = self
            handle._self_entry = entry
            return handle
        except BaseException:  # interrupted before the caller could hold it
            if handle is not None:
                handle._self_entry = None  # its __del__ must not give the entry back again
            self._release(entry)
            raise

    def _checkout(self) -> Entry:
        """An entry checked out for the caller: live, not expired, not idle too long."""
        if self._lost:
            self._reclaim_lost()
        now = started = self._clock()
        while True:
            entry = self._take_or_reserve(started)
            if entry is None:
                # With no time to wait (drop-in pools), the server's refusal itself.
                entry = self._open_reserved(started + self._settings.checkout_timeout,
                                            may_wait=self._settings.checkout_timeout > 0,
                                            started=started)
                if entry is not None:
                    if "checkout" in events.wanted:
                        self._announce(entry, "checkout", waited=self._clock() - started)
                    return entry
                # Refused (server full, no lease): wait in line; the ceiling now holds
                # growth back, and past the deadline the line answers with the timeout.
                now = self._clock()
                continue
            try:
                reason = retire_reason(entry, now, self._lifetime)
                if reason is None:
                    if self._settings.leak_threshold is None:  # _mark_checked_out, inlined
                        entry.uses += 1
                        entry.checked_out_at = now
                    else:
                        self._mark_checked_out(entry, now)
                    if events.wanted:  # a listener's BaseException: discarded below, once
                        events.dispatch(self._listeners, self.name, "checkout",
                                        waited=now - started)
                    return entry
            except BaseException:
                self._discard(entry, "broken")
                raise
            self._discard(entry, reason)
            now = self._clock()

    def _take_or_reserve(self, started: float) -> Optional[Entry]:
        """Under the lock: an idle entry (now in use), or None with a connect slot reserved.

        Served at once only when nobody waits; otherwise in line behind the waiters, until
        ``checkout_timeout`` after ``started``."""
        # ``with self._lock`` rather than the Condition: same lock, without the Python-level
        # __enter__/__exit__ of threading.Condition on the hot path.
        with self._lock:
            if self._closed:
                raise errors.PoolClosed(repr(self))
            if not self._waiters:
                if self._idle:
                    entry = self._idle.pop()  # most recently used: warmest, least likely dead
                    self._in_use.add(entry)
                    return entry
                if self._may_open(self._clock()):
                    self._opening += 1
                    return None
            return self._wait_in_line(started + self._settings.checkout_timeout, started)

    def _wait_in_line(self, deadline: float, started: float) -> Optional[Entry]:
        """Under the lock: queue up and wait to be served an entry or a slot, or time out.

        Whatever happens (timeout, close, KeyboardInterrupt while waiting), an entry or slot
        handed to this waiter is passed on, never lost."""
        waiter = Waiter(self._lock)
        self._waiters.append(waiter)
        self._stats["waits"] += 1
        try:
            while True:
                self._serve_waiters()
                if waiter.entry is not None or waiter.may_open:
                    if waiter.entry is not None:  # served a returned connection
                        self._metrics.waited.observe(self._clock() - started)
                    return waiter.entry
                if self._closed:
                    raise errors.PoolClosed(repr(self))
                now = self._clock()
                gate = self._connector.gate
                remaining = self._admission.time_left(
                    deadline, now, len(self._in_use) + len(self._idle) + self._opening,
                    self._opening, gate is not None and gate.failing)
                if remaining is None:
                    self._stats["timeouts"] += 1
                    raise self._timeout_error()
                waiter.cond.wait(self._admission.pause(remaining, now))
        except BaseException:
            self._give_back(waiter)
            raise

    def _give_back(self, waiter: Waiter) -> None:
        """Under the lock: a waiter leaves without using what it was served."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        entry, waiter.entry = waiter.entry, None
        if entry is not None:
            self._in_use.discard(entry)
            if self._closed:
                entry.broken = True  # dropped without a word: no network I/O under the lock
                self._metrics.retired_uses += entry.uses
                self._close_entry(entry, "pool_closed")
            else:
                self._idle.append(entry)
        if waiter.may_open:
            waiter.may_open = False
            self._opening -= 1
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        """Under the lock: hand idle entries, then connect slots, to the oldest waiters."""
        while self._waiters and not self._closed:
            head = self._waiters[0]
            if self._idle:
                head.entry = self._idle.pop()
                self._in_use.add(head.entry)
            elif self._may_open(self._clock()):
                self._opening += 1
                head.may_open = True
            else:
                return
            self._waiters.popleft()
            head.cond.notify()

    def _may_open(self, now: float) -> bool:
        """Under the lock: may one more connection be opened now? (see Admission)"""
        return self._admission.may_open(len(self._in_use) + len(self._idle) + self._opening,
                                        self._opening, now)

    def _timeout_error(self) -> errors.ConnGuardError:
        """Under the lock. While connects fail for want of a server, the outage is the
        answer (last cause, how long); otherwise PoolTimeout, naming the server's refusal
        when that is why nothing could be opened."""
        waited = self._settings.checkout_timeout
        gate = self._connector.gate
        held = len(self._in_use) + len(self._idle) + self._opening
        # An outage only if the pool could have grown (a full pool of healthy connections
        # timing out is a PoolTimeout, whatever failed before) and connects failed lately.
        outage = (gate.outage(waited) if gate is not None and held < self._settings.limit
                  else None)
        if outage is not None:
            return outage
        return errors.PoolTimeout(self._settings.max_size, len(self._in_use), waited,
                                  host=self._host, port=self._port or None,
                                  last_cause=self._admission.last_refusal)

    def _mark_checked_out(self, entry: Entry, now: float) -> None:
        entry.uses += 1
        entry.checked_out_at = now
        if self._settings.leak_threshold is not None:
            entry.checkout_stack = "".join(traceback.format_stack(limit=12)[:-3])
            entry.leak_reported = False

    def _open_reserved(self, deadline: float = float("inf"), may_wait: bool = False,
                       started: Optional[float] = None) -> Optional[Entry]:
        """Open a connection in the slot reserved under the lock; the slot is freed on error.

        With a global budget the lease comes first (outside the lock, like the connect).
        ``may_wait``: return None instead of raising when the refusal means "wait" (the
        server is full, no lease: see Admission.refused). ``started``: when the caller's
        checkout began (its wait is timed); None for the pool's own top-ups."""
        budget = self._budget
        leased = counted = False
        conn = None
        began = self._clock()
        try:
            if budget is not None:
                budget.acquire()
                leased = True
            conn = self._open_connection(deadline, started)
            now = self._clock()
            entry = Entry(conn=conn, opened_at=now, expires_at=self._lifetime.expiry(now),
                          autocommit=self._driver.autocommit(conn), last_used=now)
            conn._cg_on_error = functools.partial(self.statement_failed, entry)
            with self._lock:
                counted = True
                self._opening -= 1
                self._stats["opened"] += 1
                self._metrics.connect_time.observe(now - began)
                if started is not None:  # a caller waited for this connect
                    self._metrics.waited.observe(now - started)
                closed = self._closed
                ceiling = self._admission.ceiling.value
                if not closed:
                    self._in_use.add(entry)
                    self._admission.opened(len(self._in_use) + len(self._idle)
                                           + self._opening)
                raised = ceiling is not None and self._admission.ceiling.value != ceiling
                # A handshake slot is free (and the entry counted): the next waiter may open.
                self._serve_waiters()
        except BaseException as exc:
            if conn is not None:
                self._driver.drop(conn)  # interrupted after the handshake: nobody will use it
            if leased and budget is not None:
                budget.release()
            if counted or not self._connect_failed(exc) or not may_wait:
                raise
            return None
        if closed:
            self._driver.close_gracefully(conn)
            if budget is not None:
                budget.release()
                budget.close()
            raise errors.PoolClosed(repr(self))
        try:
            if started is None:  # the pool's own top-up: not a caller's checkout
                entry.checked_out_at = now
            else:
                self._mark_checked_out(entry, now)
        except BaseException:
            entry.broken = True
            self._release(entry, borrowed=started is not None)
            raise
        if events.active:
            self._announce(entry, "connect", seconds=now - began)
            if raised:
                self._announce(entry, "ceiling_raised", ceiling=self._admission.ceiling.value)
        return entry

    def _announce(self, entry: Entry, name: str, **details: Any) -> None:
        """An event about ``entry``, checked out to the caller: a listener's BaseException
        (a timeout of gevent's, SystemExit) gives the entry back before it propagates."""
        try:
            events.dispatch(self._listeners, self.name, name, **details)
        except BaseException:
            self._release(entry, borrowed=False)
            raise

    def _connect_failed(self, exc: BaseException) -> bool:
        """Free the slot of a failed connect and learn from the answer (Admission.refused);
        True when the caller should wait in line instead of getting ``exc``."""
        lease = isinstance(exc, (coordination.LeaseUnavailable,
                                 coordination.CoordinatorUnavailable))
        with self._lock:
            self._opening -= 1
            wait, news = self._admission.refused(
                exc, len(self._in_use) + len(self._idle) + self._opening, self._clock())
            if wait:
                self._stats["lease_waits" if lease else "capacity_waits"] += 1
            if isinstance(exc, Exception) and not lease:
                self._metrics.failures[type(exc).__name__] += 1
            ceiling = self._admission.ceiling.value
            self._serve_waiters()
        if news is not None:
            log.warning("connguard: %s (%s)", news, self._destination_label())
        if events.active:
            if lease:
                events.dispatch(self._listeners, self.name, "lease_denied",
                                retry_after=getattr(exc, "retry_after", None))
            elif news is not None:
                events.dispatch(self._listeners, self.name, "ceiling_lowered", ceiling=ceiling)
            elif isinstance(exc, Exception):
                events.dispatch(self._listeners, self.name, "connect_failed", error=exc)
        return wait

    def _destination_label(self) -> str:
        return f"{self._host}:{self._port}" if self._port else self._host

    def _open_connection(self, deadline: float,
                         started: Optional[float]) -> pymysql.connections.Connection:
        conn = self._connector.open(deadline, started=started)
        if self._wait_timeout is None:
            self._learn_server_timeouts(conn)
        return conn

    def _learn_server_timeouts(self, conn: pymysql.connections.Connection) -> None:
        """Read the server's limits once per pool, on its first connection.

        ``wait_timeout`` (the session value, which the server sets from interactive_timeout
        for interactive clients): idle connections retire before the server would kill
        them. ``max_connections`` and friends: kept for error messages when the server
        later refuses and no idle connection is left to ask.
        """
        limits = self._driver.server_limits(conn)
        self._wait_timeout = int(limits.pop("wait_timeout", 0) or 0)
        self._server_limits = limits
        self._lifetime = self._lifetime.for_server(self._wait_timeout)

    # -- return ----------------------------------------------------------------------------
    def _release(self, entry: Entry, borrowed: bool = True) -> None:
        """Take a connection back: reset it outside the lock, then park or discard it.
        ``borrowed=False``: the pool's own use (a top-up, a server query), not a caller's:
        no hold time, no checkin event.

        Accounting stays exact whatever happens in the reset: an interrupt there (Ctrl-C,
        SystemExit, an async exception) discards the connection and is then re-raised."""
        interrupted: Optional[BaseException] = None
        if entry.lease is not None:  # a close() interrupted before it ended the lease
            lease, entry.lease = entry.lease, None
            lease.returned = True  # the old checkout's cursors must not reach the next one
        try:
            keep = not entry.broken and (
                (self._tracked_reset and self._driver.clean_return(entry.conn, entry.autocommit))
                or self._reset_session(entry))
        except BaseException as exc:
            entry.broken, keep, interrupted = True, False, exc
        now = self._clock()
        rebalance = False
        held = now - entry.checked_out_at
        with self._lock:
            if borrowed:  # Histogram.observe, inlined: the return path runs on every checkout
                self._metrics.held_counts[_bucket(BOUNDS, held)] += 1
                self._metrics.held_sum += held
            keep = keep and not self._closed and now < entry.expires_at
            # Above max_size with nobody waiting: an overflow connection, closed. Only
            # possible with max_overflow (0, the default, skips the count).
            overflow = (keep and self._settings.max_overflow != 0 and not self._waiters
                        and len(self._in_use) + len(self._idle) + self._opening
                        > self._settings.max_size)
            keep = keep and not overflow  # above max_size with nobody waiting: closed
            if keep and self._budget is not None and self._budget.surplus:
                # Another pool below its fair share waits for a lease: give this one back
                # (closed below; the coordinator hears of it from the reaper, not from here).
                rebalance = self._budget.take_surplus()
                if rebalance:
                    keep = False
                    held = len(self._in_use) + len(self._idle) + self._opening - 1
                    self._lease_held_at(held, now)
            if keep:
                entry.last_used = now
                entry.checkout_stack = None
                if self._waiters:
                    head = self._waiters.popleft()  # hand-off: stays in use, for the oldest
                    head.entry = entry
                    head.cond.notify()
                else:
                    self._in_use.discard(entry)
                    self._idle.append(entry)
            else:
                self._in_use.discard(entry)
                self._metrics.retired_uses += entry.uses  # with the removal: no dip
                self._serve_waiters()
            closed = self._closed
        if not keep:
            self._close_entry(entry, "rebalanced" if rebalance else "overflow" if overflow else
                              "broken" if entry.broken else "discarded")
            if closed and self._budget is not None:
                self._budget.close()  # send the release now: the reaper no longer runs
        if events.wanted and borrowed:  # last: the accounting is done, whatever it raises
            events.dispatch(self._listeners, self.name, "checkin", held=held)
        if interrupted is not None:
            try:
                raise interrupted
            finally:
                interrupted = None  # no frame <-> traceback cycle

    def _reset_session(self, entry: Entry) -> bool:
        """Leave nothing of the borrower behind (see connguard.session and docs/pool.md);
        False if the connection cannot be made clean and must be discarded. The common case,
        nothing to undo, never gets here (driver.clean_return in _release)."""
        conn = entry.conn
        mode = self._reset.mode
        if mode == "none":
            return self._driver.is_open(conn)
        if not self._driver.is_open(conn):
            return False
        try:
            action = self._driver.restore_session(conn, entry.autocommit, full=mode == "full")
        except self._driver.ERRORS as exc:
            log.debug("reset on return failed, discarding the connection: %s", exc)
            return False
        except Exception:  # noqa: BLE001 - an unknown session must not reach the next borrower
            log.exception("reset on return failed unexpectedly, discarding the connection")
            return False
        if action == "discard":
            return False  # counted once, as the reason it is closed ("discarded")
        with self._metrics.lock:
            self._stats[_RESET_COUNTERS[action]] += 1
        if action in ("rollback", "reset") and events.active:
            events.dispatch(self._listeners, self.name, "reset", kind=action)
        return True

    def _discard(self, entry: Entry, reason: str) -> None:
        """An entry taken for checkout turned out unusable: forget it, serve a waiter, close."""
        with self._lock:
            self._in_use.discard(entry)
            self._metrics.retired_uses += entry.uses
            self._serve_waiters()
        self._close_entry(entry, reason)

    def _close_entry(self, entry: Entry, reason: str) -> None:
        with self._metrics.lock:
            self._stats[reason] += 1
            self._stats["closed"] += 1
        if reason == "peer_closed" and events.active:
            events.dispatch(self._listeners, self.name, "peer_closed")
        gate = self._connector.gate
        if gate is not None and reason in ("peer_closed", "broken"):
            gate.connection_lost()  # its replacement is a reconnect: paced
        log.debug("closing connection %s (%s)", self._driver.thread_id(entry.conn), reason)
        if reason == "peer_closed" or entry.broken:
            self._driver.drop(entry.conn)  # nobody is listening: no COM_QUIT
        else:
            self._driver.close_gracefully(entry.conn)
        if self._budget is not None:
            self._budget.release()  # counted now; the coordinator hears at the next refresh

    def _reconnect(self, entry: Entry) -> pymysql.connections.Connection:
        """``ping(reconnect=True)`` on a dead connection: a new server connection in the same
        slot (and lease), opened through the guarded path (resource guard, storm gate)."""
        entry.conn._cg_on_error = None  # old cursors' errors must not condemn the new one
        if entry.lease is not None:  # its cursors move to the new connection on next use
            entry.lease.returned = True
            entry.lease = None
        self._driver.drop(entry.conn)
        entry.broken = True  # until the new connection is in place
        with self._metrics.lock:
            self._stats["closed"] += 1
            self._stats["reconnected"] += 1
        began = self._clock()
        conn = self._connector.open(began + self._settings.checkout_timeout)
        now = self._clock()
        conn._cg_on_error = functools.partial(self.statement_failed, entry)
        entry.conn, entry.broken, entry.probe = conn, False, Probe()
        entry.opened_at, entry.expires_at = now, self._lifetime.expiry(now)
        entry.autocommit = self._driver.autocommit(conn)
        with self._lock:
            self._stats["opened"] += 1
            self._metrics.connect_time.observe(now - began)
        return conn

    def _lost_handle(self, entry: Entry) -> None:
        """Called from a handle's ``__del__``: no locks here, the reaper finishes the job."""
        self._lost.append(entry)

    def _reclaim_lost(self) -> None:
        while self._lost:
            try:
                entry = self._lost.popleft()
            except IndexError:
                return
            log.warning("a pooled connection was garbage collected without close(); "
                        "closing it (call close() or use `with`)")
            entry.broken = True  # its session state is unknown: do not reuse it
            self._release(entry)
            self._stats["lost"] += 1

    # -- errors ----------------------------------------------------------------------------
    def statement_failed(self, entry: Entry, exc: BaseException) -> BaseException:
        """What a borrower sees when a statement on ``entry`` failed: ``exc`` translated;
        a connection-level error also marks the connection broken (discarded on return)."""
        if errors.is_disconnect(exc):
            entry.broken = True
        tid = self._driver.thread_id(entry.conn)
        return self.translate(exc, extra={"thread_id": tid} if tid else None)

    def translate(self, exc: BaseException, extra: Optional[Dict[str, Any]] = None
                  ) -> BaseException:
        """The actionable form of ``exc`` for this pool's destination."""
        return self._connector.translate(exc, extra=extra)

    def _server_facts(self) -> Dict[str, Any]:
        """max_connections and Threads_connected, asked through an idle pooled connection
        (never a new one: the server is refusing those). Empty when none is idle."""
        with self._lock:
            entry = self._idle.pop() if self._idle else None
            if entry is not None:
                # Out of the idle queue while in use here: the reaper cannot take it. Not a
                # caller's checkout: entry.uses (the checkout count) stays.
                self._in_use.add(entry)
        if entry is None:
            return dict(self._server_limits)  # read at the first connect: better than nothing
        facts = {**self._server_limits, **self._driver.server_capacity(entry.conn, timeout=1.0)}
        if not facts:
            entry.broken = True
        self._release(entry, borrowed=False)
        return facts

    # -- housekeeping (called by the reaper thread) ----------------------------------------
    def reap(self) -> None:
        """Close idle connections that are dead, expired or idle too long; flag leaks."""
        if self._lost:
            self._reclaim_lost()
        with self._lock:
            snapshot = [(entry, entry.uses) for entry in self._idle]
        now = self._clock()
        doomed = [(entry, uses, reason) for entry, uses in snapshot
                  if (reason := retire_reason(entry, now, self._lifetime, owner=False))
                  is not None]
        removed: List[Tuple[Entry, str]] = []
        if doomed:
            with self._lock:
                for entry, uses, reason in doomed:
                    # Skip entries checked out (and maybe returned) since the snapshot.
                    if entry.uses == uses and entry in self._idle:
                        self._idle.remove(entry)
                        self._metrics.retired_uses += entry.uses
                        removed.append((entry, reason))
                self._serve_waiters()  # freed room may let a waiter open
        reaped = len(removed)
        if self._budget is not None and self._budget.surplus:
            removed += self._surplus_idle(now)
        if reaped:
            with self._metrics.lock:
                self._stats["reaped"] += reaped
        for index, (entry, reason) in enumerate(removed):
            self._close_entry(entry, reason)
            if index < reaped and events.active:
                events.dispatch(self._listeners, self.name, "reaped", reason=reason)
        self._report_leaks(now)
        self._top_up()
        if self._budget is not None:
            self._budget.refresh()  # on this thread, never under the pool's lock

    def _surplus_idle(self, now: float) -> List[Tuple[Entry, str]]:
        """Idle connections to close so their leases go to pools below their share."""
        assert self._budget is not None
        removed: List[Tuple[Entry, str]] = []
        with self._lock:
            while self._idle and self._budget.take_surplus():
                removed.append((self._idle.popleft(), "rebalanced"))  # the coldest first
                self._metrics.retired_uses += removed[-1][0].uses
            if removed:
                self._lease_held_at(len(self._in_use) + len(self._idle) + self._opening, now)
        return removed

    def _lease_held_at(self, held: int, now: float) -> None:
        """Under the lock: leases given back to pools below their share; hold at ``held``."""
        if self._admission.lease_ceiling is not None:
            self._admission.lease_ceiling.hit(held, now, coordination.LEASE_PROBE_MAX)

    def _report_leaks(self, now: float) -> None:
        threshold = self._settings.leak_threshold
        if threshold is None:
            return
        with self._lock:
            leaked = [e for e in self._in_use
                      if not e.leak_reported and now - e.checked_out_at > threshold]
            for entry in leaked:
                entry.leak_reported = True
                self._stats["leaks"] += 1
        for entry in leaked:
            log.warning("connection %s held for %.1fs (leak_threshold %.1fs); checked out at:\n%s",
                        self._driver.thread_id(entry.conn), now - entry.checked_out_at, threshold,
                        entry.checkout_stack or "(stack not recorded)")

    def _top_up(self) -> None:
        """Open connections until ``min_idle`` are idle (one per reaper pass: no burst).

        The connect runs on a thread of its own, bounded by ``checkout_timeout``: a slow or
        frozen server must not stall the reaper, which keeps every pool's sockets honest."""
        with self._lock:
            want = (not self._closed and not self._top_up_running
                    and len(self._idle) + self._opening < self._settings.min_idle
                    and not self._waiters and self._may_open(self._clock()))
            if want:
                self._opening += 1
                self._top_up_running = True
        if want:
            threading.Thread(target=self._top_up_one, name="connguard-min-idle",
                             daemon=True).start()

    def _top_up_one(self) -> None:
        try:
            entry = self._open_reserved(self._clock() + self._settings.checkout_timeout)
        except (coordination.LeaseUnavailable, coordination.CoordinatorUnavailable):
            return  # no lease: the next pass asks again (the lease ceiling paces it)
        except Exception as exc:  # noqa: BLE001 - background work: log, do not die
            log.warning("could not open a min_idle connection: %s", exc)
            return
        finally:
            self._top_up_running = False
        assert entry is not None  # may_wait=False: a refusal raises
        self._release(entry, borrowed=False)

    # -- fork safety -----------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """The child must never talk on the parent's sockets: drop them without a word."""
        self._lock = threading.Lock()
        self._metrics.after_fork()
        inherited = list(self._idle) + list(self._in_use) + list(self._lost)
        self._metrics.retired_uses += sum(e.uses for e in list(self._idle) + list(self._in_use))
        self._idle.clear()
        self._in_use.clear()
        self._lost.clear()
        self._waiters = deque()  # threads that waited live on in the parent only
        self._opening = 0
        self._top_up_running = False
        for entry in inherited:
            entry.broken = True
            self._driver.drop_inherited(entry.conn)
        if self._budget is not None:
            self._budget.after_fork()  # the parent's leases stay the parent's
        if self._admission.lease_ceiling is not None:
            self._admission.lease_ceiling = Ceiling(coordination.LEASE_PROBE)

    # -- lifecycle and introspection -------------------------------------------------------
    def close(self) -> None:
        """Close idle connections now and in-use ones as they come back; refuse new checkouts."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._metrics.retired_uses += sum(e.uses for e in idle)
            for waiter in self._waiters:
                waiter.cond.notify()  # each raises PoolClosed
        for entry in idle:
            self._close_entry(entry, "pool_closed")
        if self._budget is not None:
            self._budget.close()
        metrics.release_name(self.name, self)
        reaper.unregister(self)

    @property
    def closed(self) -> bool:
        return self._closed

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

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<connguard.Pool {self._describe_destination()} {state} [Connections: "
                f"{len(self._in_use)} in use, {len(self._idle)} idle, {self._opening} opening, "
                f"max {self._settings.max_size} | Waiting: {len(self._waiters)}]>")

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Pool.__doc__ = (Pool.__doc__ or "") + (
    "\n    Options (keyword arguments beside PyMySQL's): "
    + ", ".join(sorted(POOL_OPTIONS)) + ".\n")
