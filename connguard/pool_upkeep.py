"""The pool's upkeep, run by the reaper thread (``connguard.reaper``) and after a fork.

Dead, expired and idle-too-long connections are closed without waiting for a checkout to
find them (CLOSE_WAIT ends within the reaper's period), leaks are reported, ``min_idle`` is
topped up one connection per pass on a thread of its own, and a global budget's surplus
leases go back. A forked child lets go of the parent's sockets without a word."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import List, Tuple

from connguard import coordination, events
from connguard.pool_state import Entry, PoolState, Slot, retire_reason
from connguard.storm import Ceiling

log = logging.getLogger("connguard.pool")


class Upkeep(PoolState):
    """Upkeep: see the module doc."""

    def reap(self) -> None:
        """Close idle connections that are dead, expired or idle too long; flag leaks."""
        if self._lost:
            self._reclaim_lost()
        self._report_lost()
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

    def _report_lost(self) -> None:
        """Warn of handles reclaimed since the last pass (by a checkout or by this thread)."""
        with self._metrics.lock:
            lost = self._stats["lost"] - self._stats["lost_reported"]
            self._stats["lost_reported"] += lost
        if lost:
            log.warning("%s garbage collected without close(); closed (call close() or use "
                        "`with`)", "a pooled connection was" if lost == 1
                        else f"{lost} pooled connections were")

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
        slot = Slot()
        with self._lock:
            want = (not self._closed and not self._top_up_running
                    and len(self._idle) + self._opening < self._settings.min_idle
                    and not self._waiters and self._may_open(self._clock()))
            if want:
                self._opening += 1
                slot.reserved = True
                self._top_up_running = True
        if want:
            try:
                threading.Thread(target=self._top_up_one, args=(slot,),
                                 name="connguard-min-idle", daemon=True).start()
            except BaseException:
                self._top_up_running = False
                self._free_slot(slot)
                raise

    def _top_up_one(self, slot: Slot) -> None:
        try:
            entry = self._open_reserved(slot, self._clock() + self._settings.checkout_timeout)
        except (coordination.LeaseUnavailable, coordination.CoordinatorUnavailable):
            return  # no lease: the next pass asks again (the lease ceiling paces it)
        except Exception as exc:  # noqa: BLE001 - background work: log, do not die
            log.warning("could not open a min_idle connection: %s", exc)
            return
        finally:
            self._top_up_running = False
        assert entry is not None  # may_wait=False: a refusal raises
        self._release(entry, borrowed=False)

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
