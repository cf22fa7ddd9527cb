"""How :class:`connguard.Pool` opens a connection: in a slot reserved under the lock (the
checkout path decides), through the Connector (resource guard, storm gate, translated
errors), with a lease first under a global budget; then counted in and handed to the caller
that waited for it, or to the idle set. A refusal that means "wait" (the server is full, no
lease) frees the slot and sends the caller back in line. The resource guard, the gate and
the budget the Connector uses are made here too, when the pool is."""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict, Optional, Tuple

import pymysql

from connguard import coordination, errors, events, storm
from connguard.guard import ResourceGuard
from connguard.hostgate import HostGate
from connguard.pool_state import Entry, PoolState, Slot

log = logging.getLogger("connguard.pool")


class ConnectPath(PoolState):
    """The pool's new connections (a part of :class:`connguard.Pool`)."""

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

    def _open_reserved(self, slot: Slot, deadline: float = float("inf"),
                       may_wait: bool = False, started: Optional[float] = None
                       ) -> Optional[Entry]:
        """Open a connection in ``slot``, reserved under the lock; the slot is freed on error.

        With a global budget the lease comes first (outside the lock, like the connect).
        ``may_wait``: return None instead of raising when the refusal means "wait" (the
        server is full, no lease: see Admission.refused). ``started``: when the caller's
        checkout began (its wait is timed); None for the pool's own top-ups.

        Whatever interrupts it, nothing is left behind: a connection not counted in yet is
        dropped (with its lease), one counted in goes back to the idle set, and the slot is
        freed unless the connect filled it (the caller's cleanup frees it otherwise)."""
        budget = self._budget
        leased = False
        conn = entry = None
        try:
            began = self._clock()
            if budget is not None:
                budget.acquire()
                leased = True
            conn = self._open_connection(deadline, started)
            now = self._clock()
            entry = Entry(conn=conn, opened_at=now, expires_at=self._lifetime.expiry(now),
                          autocommit=self._driver.autocommit(conn), last_used=now)
            conn._cg_on_error = functools.partial(self.statement_failed, entry)
            closed, raised = self._count_opened(entry, slot, began, now, started)
            if closed:
                closing, conn = conn, None  # its lease goes back here, not below
                self._driver.close_gracefully(closing)
                if budget is not None:
                    leased = False
                    budget.release()
                    budget.close()
                raise errors.PoolClosed(repr(self))
            return self._hand_over(entry, began, now, started, raised)
        except BaseException as exc:
            if entry is not None and entry in self._in_use:  # counted in: a good connection
                if not entry.returns:  # (not given back already)
                    self._release(entry, borrowed=False)
                raise
            if conn is not None:
                self._driver.drop(conn)  # interrupted after the handshake: nobody will use it
            if leased and budget is not None:
                budget.release()
            if not slot.reserved or not self._connect_failed(exc, slot) or not may_wait:
                raise
            return None

    def _count_opened(self, entry: Entry, slot: Slot, began: float, now: float,
                      started: Optional[float]) -> Tuple[bool, bool]:
        """Under the lock: the slot's connect succeeded; count ``entry`` in (unless the pool
        closed meanwhile) and let the next waiter use the freed handshake slot. Returns
        (the pool is closed, the ceiling rose)."""
        with self._lock:
            closed = self._closed
            # The slot becomes the entry: no call between these steps (see Pool.connect).
            self._opening -= 1
            slot.reserved = False
            self._stats["opened"] += 1
            if not closed:
                self._in_use.add(entry)
            self._metrics.connect_time.observe(now - began)
            if started is not None:  # a caller waited for this connect
                self._metrics.waited.observe(now - started)
            ceiling = self._admission.ceiling.value
            if not closed:
                self._admission.opened(len(self._in_use) + len(self._idle) + self._opening)
            raised = ceiling is not None and self._admission.ceiling.value != ceiling
            self._serve_waiters()
        return closed, raised

    def _hand_over(self, entry: Entry, began: float, now: float, started: Optional[float],
                   raised: bool) -> Entry:
        """A new entry, counted in, goes to its caller (``started``) or to the idle set (a
        top-up). An interrupt on the way is _open_reserved's to clean up."""
        if started is None:  # the pool's own top-up: not a caller's checkout
            entry.checked_out_at = now
        else:
            self._mark_checked_out(entry, now)
        if events.active:
            self._announce(entry, "connect", seconds=now - began)
            if raised:
                self._announce(entry, "ceiling_raised", ceiling=self._admission.ceiling.value)
        return entry

    def _announce(self, entry: Entry, name: str, **details: Any) -> None:
        """An event about ``entry``, checked out to the caller: a listener's BaseException
        (a timeout of gevent's, SystemExit) is the caller's to clean up (it gives the
        entry back, once)."""
        events.dispatch(self._listeners, self.name, name, **details)

    def _connect_failed(self, exc: BaseException, slot: Slot) -> bool:
        """Free the slot of a failed connect and learn from the answer (Admission.refused);
        True when the caller should wait in line instead of getting ``exc``."""
        lease = isinstance(exc, (coordination.LeaseUnavailable,
                                 coordination.CoordinatorUnavailable))
        with self._lock:
            if slot.reserved:
                slot.reserved = False
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
