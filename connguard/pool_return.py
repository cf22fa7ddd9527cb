"""The pool's return path: a connection comes back, is made clean or closed.

Also the pool's answers about a connection in use: a statement's error (translated, and the
connection marked broken when the error is connection-level), ``ping(reconnect=True)``
replacing a dead connection in its slot, and a handle garbage collected without
``close()``. Decide under the lock, reset and close outside it."""

from __future__ import annotations

import bisect
import functools
import logging
from typing import Any, Dict, Optional

from connguard import errors, events
from connguard.liveness import Probe
from connguard.metrics import BOUNDS
from connguard.pool_state import Entry, PoolState

log = logging.getLogger("connguard.pool")
_bucket = bisect.bisect_left

#: What driver.restore_session did -> the stats() counter it counts in ("discard" counts
#: as the reason the connection is closed).
_RESET_COUNTERS = {"rollback": "rollbacks", "reset": "resets", "restored": "restored"}


class ReturnPath(PoolState):
    """ReturnPath: see the module doc."""

    def _release(self, entry: Entry, borrowed: bool = True) -> None:
        """Take a connection back: reset it outside the lock, then park or discard it.
        ``borrowed=False``: the pool's own use (a top-up, a server query), not a caller's:
        no hold time, no checkin event.

        Accounting stays exact whatever happens in the reset: an interrupt there (Ctrl-C,
        SystemExit, an async exception) discards the connection and is then re-raised.

        One function on purpose: every return runs it, and a call more costs ~1% of a
        checkout+return (connguard.bench.instructions)."""
        interrupted: Optional[BaseException] = None
        clean = self._clean_return
        if entry.lease is not None:  # a close() interrupted before it ended the lease
            lease, entry.lease = entry.lease, None
            lease.returned = True  # the old checkout's cursors must not reach the next one
        try:
            keep = not entry.broken and (
                (clean is not None and clean(entry.conn, entry.autocommit))
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

    def _reconnect(self, entry: Entry) -> Any:
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
