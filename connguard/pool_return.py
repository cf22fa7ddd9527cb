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
#: _release's progress, for _finish_release: the lock's part not yet done (or not made
#: whole), or done with the socket still to drop; None: nothing left to do.
_UNSETTLED = "unsettled"
_DROP = "drop"
_CLOSE = "close"

_RESET_COUNTERS = {"rollback": "rollbacks", "reset": "resets", "restored": "restored"}


class ReturnPath(PoolState):
    """ReturnPath: see the module doc."""

    def _release(self, entry: Entry, borrowed: bool = True) -> None:
        """Take a connection back: reset it outside the lock, then park or discard it.
        ``borrowed=False``: the pool's own use (a top-up, a server query), not a caller's:
        no hold time, no checkin event.

        Accounting stays exact whatever happens: an interrupt in the reset (Ctrl-C,
        SystemExit, an async exception, a signal handler's exception) discards the
        connection and is then re-raised; one anywhere else finishes the return first
        (_finish_release). ``entry.returns`` counts the returns taken: a caller interrupted
        before this began sees it unchanged and calls again (PooledConnection.close).

        One function on purpose: every return runs it, and a call more costs ~1% of a
        checkout+return (benchmarks.instructions)."""
        interrupted: Optional[BaseException] = None
        head = None  # the waiter the entry is handed to, if any
        keep = False
        after: Optional[str] = _UNSETTLED  # what the lock's part left to do (_finish_release)
        try:
            entry.returns += 1  # the first step, inside the try: taken back from here on
            clean = self._clean_return
            if entry.lease is not None:  # a close() interrupted before it ended the lease
                lease, entry.lease = entry.lease, None
                lease.returned = True  # the old checkout's cursors must not reach the next one
            # The no-round-trip check first, outside the reset's try: interrupted there, the
            # session is intact (_finish_release asks again). The reset's I/O is not.
            keep = not entry.broken and clean is not None and clean(entry.conn, entry.autocommit)
            if not keep and not entry.broken:
                try:
                    keep = self._reset_session(entry)
                except BaseException as exc:
                    entry.broken, keep, interrupted = True, False, exc
            now = self._clock()
            rebalance = False
            held = now - entry.checked_out_at
            with self._lock:
                try:  # made whole under this same hold: see _settle_release
                    if borrowed:  # Histogram.observe, inlined: runs on every checkout
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
                        # (closed below; the coordinator hears of it from the reaper, not here).
                        rebalance = self._budget.take_surplus()
                        if rebalance:
                            keep = False
                            held = len(self._in_use) + len(self._idle) + self._opening - 1
                            self._lease_held_at(held, now)
                    if keep:
                        entry.last_used = now
                        entry.checkout_stack = None
                        if self._waiters:
                            head = self._waiters[0]  # hand-off: stays in use, for the oldest
                            head.entry = entry  # the waiter's from here (see _serve_waiters)
                            self._waiters.popleft()
                            head.wake()
                        else:
                            self._idle.append(entry)  # in both sets until the next line
                            self._in_use.discard(entry)
                    else:
                        self._metrics.retired_uses += entry.uses  # with the removal: no dip
                        self._in_use.discard(entry)
                        self._serve_waiters()
                    closed = self._closed
                    after = None if keep else _DROP  # the lock's part is done
                except BaseException:
                    after = self._settle_release(entry, head, keep)
                    raise
            if not keep:
                self._close_entry(entry, "rebalanced" if rebalance else "overflow" if overflow
                                  else "broken" if entry.broken else "discarded")
                if closed and self._budget is not None:
                    self._budget.close()  # send the release now: the reaper no longer runs
        except BaseException:
            self._finish_release(entry, head, keep, after)
            raise
        if events.wanted and borrowed:  # last: the accounting is done, whatever it raises
            events.dispatch(self._listeners, self.name, "checkin", held=held)
        if interrupted is not None:
            try:
                raise interrupted
            finally:
                interrupted = None  # no frame <-> traceback cycle

    def _finish_release(self, entry: Entry, head: Any, keep: bool,
                        after: Optional[str] = _UNSETTLED) -> None:
        """An interrupt landed in _release past its first step: finish the return from
        where it got. ``after`` says what the lock's part left: _UNSETTLED (interrupted
        before it: made whole now, see _settle_release), _DROP or _CLOSE (the socket),
        None (nothing: parked or handed to a waiter).

        Once _release's lock is released, the pool's state no longer tells this return's
        progress: another caller may have checked the parked entry out (in use again, as
        if never returned). So the state is read only under the hold that changed it."""
        if after == _UNSETTLED:
            with self._lock:
                after = self._settle_release(entry, head, keep)
        if after is None:
            return
        entry.broken = True
        if after == _CLOSE:
            self._close_entry(entry, "broken")
        else:  # whether or not the close had begun: dropping twice is harmless
            self._driver.drop(entry.conn)

    def _settle_release(self, entry: Entry, head: Any, keep: bool) -> Optional[str]:
        """Under the lock, the same hold as the interrupted step (or before the entry was
        ever parked): what the state says of this return is this return's own. Handed to a
        waiter, or parked: made whole. Still in use: parked when its reset was done
        (``keep``), else retired (_CLOSE); already retired: _DROP, its socket only."""
        if head is not None and head.entry is entry:
            if head in self._waiters:
                self._waiters.remove(head)
            head.wake()
            return None
        if entry in self._idle:
            self._in_use.discard(entry)
            return None
        if entry not in self._in_use:  # taken out: its close has begun (or is next)
            return _DROP
        # Its reset done, or nothing to reset (the check is pure: asked again).
        clean = self._clean_return
        if not self._closed and not entry.broken and (keep or (
                clean is not None and clean(entry.conn, entry.autocommit))):
            self._idle.append(entry)
            self._in_use.discard(entry)
            self._serve_waiters()
            return None
        self._metrics.retired_uses += entry.uses
        self._in_use.discard(entry)
        self._serve_waiters()
        return _CLOSE

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
        """An entry taken for checkout turned out unusable: forget it, serve a waiter, close.
        Interrupted anywhere, it is still forgotten and its socket closed."""
        try:
            with self._lock:
                if entry in self._in_use:
                    self._metrics.retired_uses += entry.uses
                    self._in_use.discard(entry)
                self._serve_waiters()
            self._close_entry(entry, reason)
        except BaseException:
            with self._lock:
                if entry in self._in_use:
                    self._metrics.retired_uses += entry.uses
                    self._in_use.discard(entry)
                    self._serve_waiters()
            self._driver.drop(entry.conn)
            raise

    def _close_entry(self, entry: Entry, reason: str) -> None:
        """Count the close and close the socket (without a word when the peer is gone or
        the session broken); interrupted on the way, the socket is dropped all the same."""
        conn = entry.conn
        try:
            with self._metrics.lock:
                self._stats[reason] += 1
                self._stats["closed"] += 1
            if reason == "peer_closed" and events.active:
                events.dispatch(self._listeners, self.name, "peer_closed")
            gate = self._connector.gate
            if gate is not None and reason in ("peer_closed", "broken"):
                gate.connection_lost()  # its replacement is a reconnect: paced
            log.debug("closing connection %s (%s)", self._driver.thread_id(conn), reason)
            if reason == "peer_closed" or entry.broken:
                self._driver.drop(conn)  # nobody is listening: no COM_QUIT
            else:
                self._driver.close_gracefully(conn)
        except BaseException:
            self._driver.drop(conn)
            if self._budget is not None:
                self._budget.release()
            raise
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
            entry = None
            try:
                with self._lock:  # one reclaimer at a time: the entry named is the one taken
                    if not self._lost:
                        return
                    entry = self._lost[0]
                    returns = entry.returns
                    self._lost.popleft()
                # Logged by the reaper (Upkeep.reap), never here on the caller's thread: a
                # signal handler's exception inside logging's Handler.acquire would leave
                # the handler's lock held, and every other thread's logging stuck behind it.
                entry.broken = True  # its session state is unknown: do not reuse it
                self._stats["lost"] += 1
                self._release(entry)
            except BaseException:
                if entry is not None and entry not in self._lost and entry.returns == returns:
                    entry.broken = True
                    self._release(entry)
                raise

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
        entry = None
        returns = 0
        try:
            with self._lock:
                if self._idle:
                    # Out of the idle queue while in use here: the reaper cannot take it. Not
                    # a caller's checkout: entry.uses (the checkout count) stays.
                    entry = self._idle[-1]
                    returns = entry.returns
                    self._in_use.add(entry)
                    self._idle.pop()
            if entry is None:
                return dict(self._server_limits)  # read at the first connect: better than nothing
            facts = {**self._server_limits,
                     **self._driver.server_capacity(entry.conn, timeout=1.0)}
            if not facts:
                entry.broken = True
            self._release(entry, borrowed=False)
            return facts
        except BaseException:
            if entry is not None and entry.returns == returns:  # not given back yet
                with self._lock:
                    self._in_use.add(entry)
                    if entry in self._idle:
                        self._idle.remove(entry)
                entry.broken = True  # a query of ours may be half read
                self._release(entry, borrowed=False)
            raise
