"""The connection pool: hands out live connections, takes them back clean.

This module is the checkout path and the waiting line; the pool's other parts are
``pool_return`` (taking connections back), ``pool_upkeep`` (the reaper's work, fork) and
``pool_stats`` (what it tells), with the state they share in ``pool_state``.

Rules the code keeps (after httpcore and SQLAlchemy's pool):

* decide under the lock, do I/O outside it: no connect, close, query or liveness check runs
  while ``_lock`` is held, so a slow server never stalls callers that could be served;
* every idle connection is checked for a peer close before it is handed out (one
  non-blocking syscall, no round trip); dead ones are dropped and replaced silently;
* a connection that saw a connection-level error is never returned to the idle set.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
import traceback
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, Optional, Set, Tuple

import pymysql

from connguard import coordination, drivers, errors, events, metrics, reaper, storm
from connguard.admission import Admission
from connguard.arguments import POOL_OPTIONS, split_arguments
from connguard.clock import Clock
from connguard.connector import Connector
from connguard.guard import ResourceGuard
from connguard.hostgate import HostGate, check_option
from connguard.metrics import PoolMetrics
from connguard.policies import (
    KeepalivePolicy,
    LifetimePolicy,
    PoolSettings,
    ResetPolicy,
    keepalive_from_option,
)
from connguard.pool_return import ReturnPath
from connguard.pool_state import CLOSE_REASONS, Entry, Waiter, retire_reason  # noqa: F401 - re-exported
from connguard.pool_stats import PoolReport
from connguard.pool_upkeep import Upkeep
from connguard.proxy import PooledConnection
from connguard.storm import StormPolicy

log = logging.getLogger("connguard.pool")
_bucket = bisect.bisect_left


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


class Pool(ReturnPath, Upkeep, PoolReport):
    """A thread-safe pool of PyMySQL connections to one server with one set of credentials.

    ``Pool(**pymysql_connect_arguments, max_size=10, ...)``; see ``docs/pool.md`` for every
    option. ``pool.connect()`` returns a connection that behaves like PyMySQL's and whose
    ``close()`` (or ``with`` block end) returns it to the pool.
    """

    def __init__(self, *, clock: Clock = time.monotonic, **kwargs: Any) -> None:
        self._driver: Any = drivers.seam(kwargs.get("driver", "pymysql"))
        options, self._connect_kwargs = split_arguments(kwargs, where="connguard.Pool")
        self._settings, self._lifetime, self._reset = build_policies(options)
        # Read on every return: the driver's no-round-trip check that nothing needs undoing,
        # for the "rollback" reset mode (None for the others: every return resets).
        self._clean_return: Optional[Callable[[Any, bool], bool]] = (
            self._driver.clean_return if self._reset.mode == "rollback" else None)
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
            counted = True
            closed, raised = self._count_opened(entry, began, now, started)
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
        return self._hand_over(entry, began, now, started, raised)

    def _count_opened(self, entry: Entry, began: float, now: float,
                      started: Optional[float]) -> Tuple[bool, bool]:
        """Under the lock: the slot's connect succeeded; count ``entry`` in (unless the pool
        closed meanwhile) and let the next waiter use the freed handshake slot. Returns
        (the pool is closed, the ceiling rose)."""
        with self._lock:
            self._opening -= 1
            self._stats["opened"] += 1
            self._metrics.connect_time.observe(now - began)
            if started is not None:  # a caller waited for this connect
                self._metrics.waited.observe(now - started)
            closed = self._closed
            ceiling = self._admission.ceiling.value
            if not closed:
                self._in_use.add(entry)
                self._admission.opened(len(self._in_use) + len(self._idle) + self._opening)
            raised = ceiling is not None and self._admission.ceiling.value != ceiling
            self._serve_waiters()
        return closed, raised

    def _hand_over(self, entry: Entry, began: float, now: float, started: Optional[float],
                   raised: bool) -> Entry:
        """A new entry, counted in, goes to its caller (``started``) or to the idle set (a
        top-up); an interrupt on the way gives it back, discarded."""
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
