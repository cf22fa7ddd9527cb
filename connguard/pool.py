"""The connection pool: hands out live connections, takes them back clean.

This module is the checkout path and the waiting line; the pool's other parts are
``pool_connect`` (opening connections), ``pool_return`` (taking connections back),
``pool_upkeep`` (the reaper's work, fork) and ``pool_stats`` (what it tells), with the state
they share in ``pool_state``.

Rules the code keeps (after httpcore and SQLAlchemy's pool):

* decide under the lock, do I/O outside it: no connect, close, query or liveness check runs
  while ``_lock`` is held, so a slow server never stalls callers that could be served;
* every idle connection is checked for a peer close before it is handed out (one
  non-blocking syscall, no round trip); dead ones are dropped and replaced silently;
* a connection that saw a connection-level error is never returned to the idle set.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import traceback
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Set, Tuple, Union

from connguard import coordination, drivers, errors, events, metrics, reaper, storm
from connguard.admission import Admission
from connguard.arguments import DEFAULT, POOL_OPTIONS, given_options, split_arguments
from connguard.clock import Clock
from connguard.connector import Connector
from connguard.metrics import PoolMetrics
from connguard.options import check_options
from connguard.policies import (
    KeepalivePolicy,
    LifetimePolicy,
    PoolSettings,
    ResetPolicy,
    keepalive_from_option,
)
from connguard.pool_connect import ConnectPath
from connguard.pool_return import ReturnPath
from connguard.pool_state import (  # noqa: F401 - CLOSE_REASONS re-exported
    CLOSE_REASONS,
    Entry,
    Slot,
    Waiter,
    retire_reason,
)
from connguard.pool_stats import PoolReport
from connguard.pool_upkeep import Upkeep
from connguard.proxy import PooledConnection
from connguard.storm import StormPolicy

if TYPE_CHECKING:
    from connguard.backend import Coordinator

log = logging.getLogger("connguard.pool")
_bucket = bisect.bisect_left


def build_policies(options: Dict[str, Any]) -> Tuple[PoolSettings, LifetimePolicy, ResetPolicy]:
    """The policy objects for a pool's options; raises ValueError naming a bad option."""
    check_options(options)  # each by its rule, before anything is started
    storm.policy_from_options(options)  # and what they make together
    coordination.settings_from_options(options)
    settings = PoolSettings(**{k: v for k, v in options.items()
                               if k in PoolSettings.__dataclass_fields__})
    lifetime = LifetimePolicy(
        max_lifetime=options.get("max_lifetime", LifetimePolicy.max_lifetime),
        jitter=options.get("lifetime_jitter", LifetimePolicy.jitter),
        idle_timeout=options.get("idle_timeout", LifetimePolicy.idle_timeout))
    return settings, lifetime, ResetPolicy(options.get("reset", ResetPolicy.mode))


class Pool(ConnectPath, ReturnPath, Upkeep, PoolReport):
    """A thread-safe pool of PyMySQL connections to one server with one set of credentials.

    ``Pool(**pymysql_connect_arguments, max_size=10, ...)``; see ``docs/pool.md`` for every
    option. ``pool.connect()`` returns a connection that behaves like PyMySQL's and whose
    ``close()`` (or ``with`` block end) returns it to the pool.
    """

    def __init__(
        self, *, clock: Clock = time.monotonic,
        name: Optional[str] = DEFAULT, driver: str = DEFAULT,
        # sizing and waiting (PoolSettings)
        max_size: int = DEFAULT, max_overflow: int = DEFAULT, min_idle: int = DEFAULT,
        checkout_timeout: float = DEFAULT, leak_threshold: Optional[float] = DEFAULT,
        # lifetime and reset (LifetimePolicy, ResetPolicy), TCP keepalive (KeepalivePolicy)
        max_lifetime: Optional[float] = DEFAULT, lifetime_jitter: float = DEFAULT,
        idle_timeout: Optional[float] = DEFAULT, reset: str = DEFAULT,
        keepalive: Union[bool, None, Tuple[float, float, int]] = DEFAULT,
        # the OS resource guard and the host-wide handshake gate
        resource_guard: bool = DEFAULT, fd_reserve: int = DEFAULT,
        port_reserve: Optional[int] = DEFAULT, host_gate: Union[bool, str] = DEFAULT,
        # storm control (StormPolicy)
        storm_control: bool = DEFAULT, max_connect_rate: float = DEFAULT,
        connect_burst: int = DEFAULT, max_handshakes: int = DEFAULT,
        backoff_initial: float = DEFAULT, backoff_max: float = DEFAULT,
        breaker_threshold: int = DEFAULT, ceiling_probe: float = DEFAULT,
        fail_fast: bool = DEFAULT, reconnect_rate: float = DEFAULT,
        reconnect_burst: int = DEFAULT,
        # coordination across processes (docs/deployment.md)
        coordinator: Union[None, str, Coordinator] = DEFAULT,
        global_max: Optional[int] = DEFAULT, coordinator_fail: str = DEFAULT,
        lease_ttl: float = DEFAULT, coordinator_key: Optional[str] = DEFAULT,
        **connect_args: Any,
    ) -> None:
        # The options by name, for an IDE and help(); those not passed are left out, as
        # they were when this was **kwargs (locals() here: the parameters, nothing else).
        kwargs = {**connect_args, **given_options(locals())}
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
        probes: Optional[KeepalivePolicy] = keepalive_from_option(
            options.get("keepalive", True))
        self._connector = Connector(self._connect_kwargs, driver=self._driver,
                                    guard=self._make_guard(options),
                                    gate=self._make_gate(options),
                                    server_facts=self._server_facts,
                                    keepalive=probes.as_tuple() if probes else None,
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
        given_name = options.get("name")  # checked by build_policies
        self._metrics = PoolMetrics(metrics.claim_name(given_name or self._describe_destination(),
                                                       self), events.Listeners())
        metrics.register(self)
        reaper.register(self)

    # -- checkout --------------------------------------------------------------------------
    # Interrupts. A signal handler that raises (Ctrl-C, Celery's soft time limit, an alarm)
    # can strike wherever CPython runs handlers: at a function's entry, at a loop's back
    # edge and after any call, including between a lock's ``__exit__`` and the next line.
    # So every step that changes what the pool counts is taken inside the ``try`` whose
    # ``except`` undoes it, and the undo looks at the state itself (is the entry idle? is
    # the slot still reserved?) rather than trusting a flag set one call later. What a
    # function returns is its caller's from that moment: the caller's ``try`` holds it.
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
            got: Any = None  # an entry or a connect slot: this caller's, until returned
            try:
                got = self._take_or_reserve(started)
                if got.conn is None:  # a connect Slot (no connection yet), for this caller
                    # With no time to wait (drop-in pools), the server's refusal itself.
                    got = self._open_reserved(got, started + self._settings.checkout_timeout,
                                              may_wait=self._settings.checkout_timeout > 0,
                                              started=started)
                    if got is not None:
                        if "checkout" in events.wanted:
                            self._announce(got, "checkout", waited=self._clock() - started)
                        return got
                    # Refused (server full, no lease): wait in line; the ceiling now holds
                    # growth back, and past the deadline the line answers with the timeout.
                    now = self._clock()
                    continue
                reason = retire_reason(got, now, self._lifetime)
                if reason is None:
                    if self._settings.leak_threshold is None:  # _mark_checked_out, inlined
                        got.uses += 1
                        got.checked_out_at = now
                    else:
                        self._mark_checked_out(got, now)
                    if events.wanted:  # a listener's BaseException: given back below, once
                        events.dispatch(self._listeners, self.name, "checkout",
                                        waited=now - started)
                    return got
            except BaseException:
                if got is not None:
                    self._checkout_interrupted(got)
                raise
            self._discard(got, reason)
            now = self._clock()

    def _checkout_interrupted(self, got: Any) -> None:
        """What a checkout held when it was interrupted goes back: an entry to the idle set
        (nobody used it: no reset to do), a slot to the free ones (if still reserved)."""
        if got.conn is not None:  # an entry
            self._release(got, borrowed=False)
        else:
            self._free_slot(got)

    def _take_or_reserve(self, started: float) -> Any:
        """An idle entry (now in use), a reserved connect Slot, or either one after waiting
        in line. Served at once only when nobody waits; otherwise in line behind the
        waiters, until ``checkout_timeout`` after ``started``."""
        held: Any = None  # what this call took: an entry, a slot or a place in line
        try:
            # ``with self._lock`` rather than the Condition: same lock, without the
            # Python-level __enter__/__exit__ of threading.Condition on the hot path.
            with self._lock:
                if self._closed:
                    raise errors.PoolClosed(repr(self))
                if not self._waiters:
                    idle = self._idle
                    if idle:
                        held = idle[-1]  # most recently used: warmest, least likely dead
                        self._in_use.add(held)  # named before it moves: see _untake
                        idle.pop()
                        return held
                    if self._may_open(self._clock()):
                        held = Slot()
                        self._opening += 1
                        held.reserved = True
                        return held
                held = Waiter()
                self._waiters.append(held)
                self._stats["waits"] += 1
            return self._wait_in_line(held, started + self._settings.checkout_timeout,
                                      started)
        except BaseException:
            if held is not None:
                if held.conn is not None:
                    self._untake(held)
                elif held.__class__ is Waiter:
                    self._give_back(held)
                else:
                    self._free_slot(held)
            raise

    def _untake(self, entry: Entry) -> None:
        """An interrupt landed while ``entry`` was taken from the idle set: back it goes,
        untouched, from wherever the take got to (in both sets, or in use only)."""
        with self._lock:
            if entry not in self._idle:
                self._idle.append(entry)
            self._in_use.discard(entry)
            self._serve_waiters()

    def _free_slot(self, slot: Slot) -> None:
        """A reserved connect slot goes unused (idempotent: see Slot)."""
        with self._lock:
            if slot.reserved:
                slot.reserved = False
                self._opening -= 1
                self._serve_waiters()

    def _wait_in_line(self, waiter: Waiter, deadline: float, started: float) -> Any:
        """Outside the lock: ``waiter`` is in line; wait to be served an entry or a slot, or
        time out. The wait itself holds no lock (Waiter.wait).

        Whatever happens (timeout, close, an interrupt while waiting), an entry or slot
        handed to this waiter is passed on, never lost."""
        try:
            while True:
                with self._lock:
                    self._serve_waiters()
                    if waiter.entry is not None:  # served a returned connection
                        self._metrics.waited.observe(self._clock() - started)
                        return waiter.entry
                    if waiter.reserved:  # served a connect slot
                        return waiter
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
                    pause = self._admission.pause(remaining, now)
                waiter.wait(pause)
        except BaseException:
            self._give_back(waiter)
            raise

    def _give_back(self, waiter: Waiter) -> None:
        """A waiter leaves without using what it was served (idempotent: a second call, from
        an outer cleanup, finds nothing left to give)."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            entry = waiter.entry
            if entry is not None:
                if self._closed:
                    entry.broken = True  # dropped without a word: no network I/O under the lock
                    self._metrics.retired_uses += entry.uses
                    self._in_use.discard(entry)
                    waiter.entry = None
                    self._close_entry(entry, "pool_closed")
                else:
                    if entry not in self._idle:
                        self._idle.append(entry)
                    self._in_use.discard(entry)
                    waiter.entry = None
            if waiter.reserved:
                waiter.reserved = False
                self._opening -= 1
            self._serve_waiters()

    def _serve_waiters(self) -> None:
        """Under the lock: hand idle entries, then connect slots, to the oldest waiters.

        A waiter owns what it was handed from the moment ``entry`` or ``reserved`` is set
        (its _give_back returns it); an interrupt before it was woken wakes it on the way."""
        head = None
        try:
            while self._waiters and not self._closed:
                head = self._waiters[0]
                if self._idle:
                    entry = self._idle[-1]
                    head.entry = entry
                    self._in_use.add(entry)
                    self._idle.pop()
                elif self._may_open(self._clock()):
                    self._opening += 1
                    head.reserved = True
                else:
                    return
                self._waiters.popleft()
                head.wake()
        except BaseException:
            if head is not None and (head.entry is not None or head.reserved):
                self._settle(head)
            raise

    def _settle(self, waiter: Waiter) -> None:
        """Under the lock: an interrupt landed while ``waiter`` was being served; finish it
        (out of line, its entry out of the idle set, woken)."""
        entry = waiter.entry
        if entry is not None:
            self._in_use.add(entry)
            if entry in self._idle:
                self._idle.remove(entry)
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        waiter.wake()

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

    # -- lifecycle and introspection -------------------------------------------------------
    def close(self) -> None:
        """Close idle connections now and in-use ones as they come back; refuse new checkouts."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._metrics.retired_uses += sum(e.uses for e in idle)
            for waiter in self._waiters:
                waiter.wake()  # each raises PoolClosed
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
        # The name as stats() keys it (a "#2" included); the destination beside a chosen one.
        where = self._describe_destination()
        label = self.name if self.name.startswith(where) else f"{self.name} ({where})"
        return (f"<connguard.Pool {label} {state} [Connections: "
                f"{len(self._in_use)} in use, {len(self._idle)} idle, {self._opening} opening, "
                f"max {self._settings.max_size} | Waiting: {len(self._waiters)}]>")

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Pool.__doc__ = (Pool.__doc__ or "") + (
    "\n    Options (keyword arguments beside PyMySQL's): "
    + ", ".join(sorted(POOL_OPTIONS)) + ".\n")
