"""The SQLAlchemy plugin's idle connections of one engine: how long they may stay idle, and
the reaper's pass that closes those whose server end closed or that stayed idle too long.

The idle limit comes from the server's ``wait_timeout`` (read once, on the first connect)
unless the user set ``pool_recycle`` or ``connguard_idle_timeout``. connguard's reaper thread
(:mod:`connguard.reaper`) runs :meth:`IdleReaper.reap` about every half second. Async
engines' connections belong to their event loop: the pass only asks that loop to close a
dead one, and SQLAlchemy's own recycle keeps them below ``wait_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import QueuePool

from connguard import dbapis, driver, errors
from connguard.liveness import peer_closed
from connguard.policies import LifetimePolicy
from connguard.sqlalchemy_options import EnginePart, PluginOptions
from connguard.sqlalchemy_pool import GuardedQueuePool

log = logging.getLogger("connguard.sqlalchemy")


class _Reaped(sa_exc.DisconnectionError):
    """The reason given to ``invalidate`` listeners for a connection the reaper closed
    (SQLAlchemy logs its name; listeners may match its class as the plugin's)."""


_Reaped.__module__ = "connguard.sqlalchemy_plugin"


class IdleReaper(EnginePart):
    """One engine's idle limit and the reaper's pass over its idle connections.

    ``closes_idle``: whether the pass closes connections (a driver connguard watches, and
    the reaper not turned off); the idle limit is learnt either way.
    """

    def __init__(self, engine: Callable[[], Any], options: PluginOptions,
                 facts: dbapis.DriverFacts, closes_idle: bool, user_recycle: bool,
                 password: Any) -> None:
        super().__init__(engine, options, facts, password)  # counts: reaped, idle_evicted
        self.closes_idle = closes_idle
        self._user_recycle = user_recycle
        self.wait_timeout: Optional[int] = None
        self.idle_timeout: Optional[float] = options.idle_timeout or None
        # Async engines: idle connections and the loop each lives on, for the pass, which
        # may only ask that loop to close a dead one (checkin adds, checkout removes).
        self._idle_on_loop: Dict[Any, Tuple[Any, asyncio.AbstractEventLoop]] = {}

    # -- the idle limit --------------------------------------------------------------------
    def learn_wait_timeout(self, dbapi_conn: Any, partial: bool) -> None:
        """Read the server's wait_timeout once and derive the idle limit from it.

        The session value: the server sets it from interactive_timeout for interactive
        clients. Left alone when the user set ``pool_recycle`` (they manage lifetimes) or
        ``connguard_idle_timeout``. ``partial``: the engine's driver is not one connguard
        watches, so SQLAlchemy's recycle enforces the limit.
        """
        try:
            facts = dbapis.facts_of(dbapi_conn, self.facts)  # not the user's cursor class
            wait_timeout = driver.number(facts.first_value(dbapi_conn,
                                                           "SELECT @@SESSION.wait_timeout"))
        except Exception as exc:  # noqa: BLE001 - any driver's error: just do without
            log.debug("could not read wait_timeout: %s", errors.redact(str(exc), self._password))
            wait_timeout = 0
        derived = LifetimePolicy(max_lifetime=None, idle_timeout=None).for_server(wait_timeout)
        with self._lock:
            if self.wait_timeout is not None:
                return  # another thread's first connect won
            self.wait_timeout = wait_timeout
            if self.options.idle_timeout is None and not self._user_recycle:
                self.idle_timeout = derived.idle_timeout
        self._apply_recycle(partial)

    def _apply_recycle(self, partial: bool) -> None:
        """Without the reaper (or another driver), SQLAlchemy's own age-based recycle keeps
        connections from outliving wait_timeout; ``pool.recreate()`` on dispose copies it."""
        engine = self._engine()
        limit = self.idle_timeout
        if engine is None or limit is None or self._user_recycle:
            return
        # The reaper closes idle connections of async engines only when dead (their
        # transports are the loop's): SQLAlchemy's recycle keeps them below wait_timeout.
        if partial or not self.options.reaper or self.facts.is_async:
            engine.pool._recycle = int(limit)

    # -- async engines: which loop each idle connection lives on ---------------------------
    def idle_on(self, record: Any, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._idle_on_loop[record] = (conn, loop)

    def checked_out(self, record: Any) -> None:
        with self._lock:
            self._idle_on_loop.pop(record, None)

    # -- the pass --------------------------------------------------------------------------
    def reap(self, pool: Any) -> None:
        """Close idle pooled connections of ``pool`` that are dead or idle too long.

        Decide under the queue's lock, close outside it: records are taken out of the idle
        queue under the lock (so no checkout can have them), closed, and given back empty;
        an empty record connects again on its next checkout.
        """
        if self.facts.is_async:
            if self.options.reaper:
                self.reap_on_loops()
            return
        queue = idle_queue(pool)
        if queue is None or not self.closes_idle:
            return
        now = time.monotonic()
        with queue.mutex:
            snapshot = [(rec, rec.dbapi_connection) for rec in queue.queue]
        doomed = [(rec, conn, reason) for rec, conn in snapshot
                  if (reason := self._retire_reason(rec, conn, now)) is not None]
        if doomed:
            self._close_idle(pool, queue, doomed, now)

    def reap_on_loops(self) -> None:
        """Async engines: find idle connections whose server end closed and ask their event
        loop to close them (only the loop may touch a transport). The loop decides again:
        a connection checked out since this pass looked is not idle any more, and a reply
        it is waiting for would make its socket look dead here."""
        with self._lock:
            idle = list(self._idle_on_loop.items())
        for record, (conn, loop) in idle:
            if record.dbapi_connection is not conn or loop.is_closed():
                self._forget_idle(record, conn)  # replaced since, or its loop is gone
                continue
            sock = self.facts.pollable(conn)
            if sock is None or not peer_closed(sock):
                continue
            try:
                loop.call_soon_threadsafe(self._close_if_still_idle, record, conn)
            except RuntimeError:  # the loop closed meanwhile: its transports went with it
                self._forget_idle(record, conn)

    def _close_if_still_idle(self, record: Any, conn: Any) -> None:
        """On the connection's loop: close it if it still is idle and dead. Checkouts run on
        this same thread and take the record out of the idle map first, so this decision
        cannot race with one."""
        with self._lock:
            entry = self._idle_on_loop.get(record)
            if entry is None or entry[0] is not conn:
                return  # checked out (or replaced) since the reaper looked
        sock = self.facts.pollable(conn)
        if sock is None or not peer_closed(sock):
            return
        self._forget_idle(record, conn)
        _close_transport(conn)
        self._count("reaped")

    def _forget_idle(self, record: Any, conn: Any) -> None:
        with self._lock:
            if self._idle_on_loop.get(record, (None,))[0] is conn:
                del self._idle_on_loop[record]

    def _retire_reason(self, record: Any, conn: Any, now: float) -> Optional[str]:
        if conn is None:
            return None  # already invalidated: connects again on checkout
        if dbapis.watchable(conn, self.facts):  # a do_connect listener's may have no socket
            facts = dbapis.facts_of(conn, self.facts)
            try:
                sock = facts.pollable(conn)
                dead = sock is None or peer_closed(sock)
            except facts.error_class:  # closed under us: fileno() refuses
                dead = True
            if dead:
                return "reaped"
        if self._idle_too_long(record, now):
            return "idle_evicted"
        return None

    def _idle_too_long(self, record: Any, now: float) -> bool:
        limit = self.idle_timeout
        since = getattr(record, "_connguard_idle_since", None)  # set by each return
        return limit is not None and since is not None and now - since >= limit

    def _close_idle(self, pool: Any, queue: Any, doomed: List[Tuple[Any, Any, str]],
                    now: float) -> None:
        taken = []
        with queue.mutex:
            for rec, conn, reason in doomed:
                # Checked out (and maybe back) since the snapshot? A dead socket stays dead,
                # but an idle one may have been used: check its idle time again.
                still = rec.dbapi_connection is conn and rec in queue.queue and (
                    reason == "reaped" or self._idle_too_long(rec, now))
                if still:
                    queue.queue.remove(rec)
                    taken.append((rec, reason))
        for rec, reason in taken:
            try:
                if reason == "reaped":
                    rec.invalidate(_Reaped("connguard: the server closed this idle "
                                           "connection (peer closed)"))
                else:
                    rec.close()  # healthy: a graceful COM_QUIT before wait_timeout
            finally:
                pool._do_return_conn(rec)  # back in the queue, or closed if it is full now
            self._count(reason)

    # -- fork safety -----------------------------------------------------------------------
    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self._idle_on_loop = {}  # the parent's loops: not this process's to wake

    def drop_inherited(self, engine: Any) -> None:
        """In a forked child, which must not talk on the parent's sockets: drop the idle
        ones without a word (the parent's sessions survive) and give the engine a new pool."""
        queue = idle_queue(engine.pool)
        try:
            for rec in list(queue.queue) if queue is not None else []:
                conn = rec.dbapi_connection
                try:
                    if conn is not None and dbapis.watchable(conn, self.facts):
                        dbapis.facts_of(conn, self.facts).drop_inherited(conn)
                except Exception:  # noqa: BLE001 - one connection must not spare the rest
                    log.exception("connguard: could not let go of an inherited connection")
            if isinstance(engine.pool, GuardedQueuePool):
                engine.pool.connguard_after_fork()  # the parent's leases stay the parent's
        finally:
            engine.dispose(close=False)  # whatever happened: the child gets its own pool


def idle_queue(pool: Any) -> Any:
    """The locked queue of idle records of a QueuePool, or None for other pools.

    ``pool._pool`` is SQLAlchemy's ``util.queue.Queue`` (same shape in 1.4 and 2.x): a
    ``deque`` in ``.queue`` guarded by the ``RLock`` ``.mutex``. Async pools use another
    queue class and are skipped.
    """
    queue = getattr(pool, "_pool", None)
    if not isinstance(pool, QueuePool) or not hasattr(queue, "mutex") \
            or not hasattr(queue, "queue"):
        return None
    return queue


def _close_transport(conn: Any) -> None:
    """On the connection's event loop: close a dead idle connection the driver's own way
    without a word to the server (its ``close()``, which SQLAlchemy's terminate uses too):
    the socket leaves CLOSE_WAIT, and the driver knows it is closed, so SQLAlchemy's later
    invalidation finds nothing left to close."""
    try:
        conn._connection.close()
    except Exception:  # noqa: BLE001 - a dead connection may fail to close: it is gone
        transport = dbapis.transport_of(conn)
        if transport is not None:
            transport.close()
