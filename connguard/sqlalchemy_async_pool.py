"""``GuardedAsyncQueuePool``: :class:`connguard.sqlalchemy_pool.GuardedQueuePool` for async
engines (``mysql+aiomysql``, ``mysql+asyncmy``), in place of SQLAlchemy's
``AsyncAdaptedQueuePool``. The same rules; what differs is how a caller waits: on a future
of its own, in line, so that the event loop runs on (see :class:`GuardedAsyncQueuePool`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from typing import Any, Dict, List, Optional

from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from connguard.sqlalchemy_pool import GuardedQueuePool, quiet_as_sqlalchemy

__all__ = ["GuardedAsyncQueuePool"]


class _GreenletLocal:
    """``threading.local`` for SQLAlchemy's greenlets: the checkouts of an async engine
    interleave on the event loop's one thread, each in a greenlet of its own (one per
    awaited call), so a checkout's deadline and reserved slot are kept per greenlet."""

    def __init__(self) -> None:
        object.__setattr__(self, "_by_greenlet", weakref.WeakKeyDictionary())

    def _mine(self) -> Dict[str, Any]:
        import greenlet  # there whenever an async engine is: SQLAlchemy's asyncio needs it

        mine: Dict[str, Any] = self._by_greenlet.setdefault(greenlet.getcurrent(), {})
        return mine

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mine()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._mine()[name] = value


class _Waiter:
    """One caller waiting in an async pool's line: its place (``ticket``, kept when it waits
    again within the same checkout), whether a returned record may be handed to it, and the
    future it sleeps on (set to the record, or to None: look again)."""

    __slots__ = ("ticket", "for_record", "future")

    def __init__(self, ticket: int, for_record: bool, future: asyncio.Future) -> None:
        self.ticket, self.for_record, self.future = ticket, for_record, future

    def gone(self) -> bool:
        """Its loop closed under it (never to run again): it waits for nothing."""
        return self.future.get_loop().is_closed()


class GuardedAsyncQueuePool(GuardedQueuePool):
    """:class:`GuardedQueuePool` for async engines (in place of SQLAlchemy's
    ``AsyncAdaptedQueuePool``): the same ceiling, handshake cap and outage waits, but a
    caller never blocks its thread (the event loop's): it waits on a future of its own, in
    line. A returned connection goes straight to the oldest waiting checkout (hand-off, as
    ``connguard.Pool`` does), and a newcomer does not take past those already waiting; a
    freed slot wakes the oldest to look again, and a caller that found nothing keeps its
    place. A checkout's state is kept per greenlet (an async engine's checkouts interleave
    on one thread). The pool's lock is only ever held between two awaits, so taking it
    never waits.

    Fairness has a price when the pool is saturated and connections are held for no time
    at all: each checkout is then a task switch (30 tasks on 3 connections doing nothing
    else: ~35% fewer checkouts per second than SQLAlchemy's pool, which lets the returning
    task take its connection back at once and times others out)."""

    _is_asyncio = True
    _queue_class = AsyncAdaptedQueuePool._queue_class
    _dialect = AsyncAdaptedQueuePool._dialect
    # Places in line, shared by every async pool: a ticket only needs to be later than
    # those drawn before it (one counter per pool would be an attribute more: the pool
    # stays within CPython's compact layout, see tests/test_architecture.py).
    _tickets = itertools.count()

    def __init__(self, creator: Any, **kw: Any) -> None:
        # Waiting callers by ticket, oldest first. Made before the base class wires
        # anything that could wake them.
        self._line: List[_Waiter] = []
        super().__init__(creator, **kw)

    @staticmethod
    def _new_local() -> Any:
        return _GreenletLocal()

    def _do_get(self) -> Any:
        local = self._local
        local.woken, local.handed, local.ticket = False, None, None  # this checkout's own
        if not self._waiting_for_records():
            return super()._do_get()
        # Callers wait in line: a newcomer goes behind them (no look at the idle queue first).
        return self._wait_or_open(self._checkout_deadline_from_now())

    def _waiting_for_records(self) -> bool:
        """Whether a checkout still waits in line to be served (one served or woken, about to
        resume, does not; waiters whose loop closed are dropped)."""
        if any(waiter.gone() for waiter in self._line):
            with self._cond:
                self._line = [waiter for waiter in self._line if not waiter.gone()]
        return any(waiter.for_record and not waiter.future.done() for waiter in self._line)

    def _idle_record(self) -> Any:
        handed = getattr(self._local, "handed", None)
        if handed is not None:  # a return served this checkout while it waited
            self._local.handed = None
            return handed
        if not getattr(self._local, "woken", False) and self._waiting_for_records():
            return None  # the oldest looks first
        return super()._idle_record()

    def _wait_locked(self, timeout: Optional[float], for_record: bool = False) -> None:
        from sqlalchemy.util import await_only

        if for_record and not self._pool.empty():
            # Returned meanwhile with nobody in line to hand it to (a garbage-collected one,
            # on this thread): this caller takes it. Without ``woken`` it would not look at
            # the queue while others wait, and come straight back here: a loop that never
            # yields to the event loop.
            self._local.woken = True
            return
        ticket = getattr(self._local, "ticket", None)
        if ticket is None:  # the first wait of this checkout: the end of the line
            ticket = self._local.ticket = next(self._tickets)
        waiter = _Waiter(ticket, for_record, asyncio.get_running_loop().create_future())
        place = next((i for i, w in enumerate(self._line) if w.ticket > ticket), len(self._line))
        self._line.insert(place, waiter)  # by ticket (bisect takes no key before 3.10)
        self._local.woken = False
        leaving = True
        self._cond.release()
        try:
            await_only(asyncio.wait([waiter.future], timeout=timeout))
            leaving = False
        finally:
            self._cond.acquire()
            self._left_line(waiter, leaving)

    def _left_line(self, waiter: _Waiter, leaving: bool) -> None:
        """Under the lock: ``waiter`` stops waiting (served, woken, timed out, or
        ``leaving`` with an exception: cancelled). What was given to it is never lost: a
        record is taken, or passed on when it is leaving; a wake-up is passed on too."""
        with contextlib.suppress(ValueError):
            self._line.remove(waiter)
        self._local.woken = True
        future = waiter.future
        if not future.done():
            future.cancel()
            return
        if future.cancelled():
            return
        record = future.result()
        if record is None:
            if leaving:
                self._slot_freed()  # its wake-up goes to the next in line
        elif not leaving:
            self._local.handed = record
        elif not self._serve_line(record):
            QueuePool._do_return_conn(self, record)  # idle again

    def _serve_line(self, record: Any) -> bool:
        """Under the lock: hand ``record`` to the oldest checkout waiting on this thread's
        loop; False when there is none."""
        for waiter in self._line:
            if waiter.for_record and not waiter.future.done() and _on_its_loop(waiter.future):
                self._line.remove(waiter)
                waiter.future.set_result(record)
                return True
        return False

    def _slot_freed(self) -> None:
        """Under the lock: wake the oldest waiter to look again (all of them while
        reconnects in place wait for a slot, as the base class does); one whose loop closed
        is skipped."""
        for waiter in list(self._line):
            if not waiter.future.done() and _wake(waiter.future) and not self._in_place_waiting:
                return

    def _do_return_conn(self, record: Any) -> None:
        record._connguard_idle_since = time.monotonic()
        # That checkout's deadline ends with it (as in GuardedQueuePool._do_return_conn): a
        # later one taking this record at once would read it for a reconnect in place.
        record._connguard_deadline = None
        if self._line:
            with self._cond:
                if self._serve_line(record):
                    return  # still checked out: now the waiter's
        QueuePool._do_return_conn(self, record)
        if self._line:
            with self._cond:
                self._slot_freed()

    def connguard_after_fork(self) -> None:
        super().connguard_after_fork()
        self._line = []  # the parent's waiters live on in the parent only


def _on_its_loop(future: asyncio.Future) -> bool:
    """Whether this thread runs ``future``'s loop (a garbage-collected connection may be
    returned from any thread: such a return only wakes, it never hands over)."""
    try:
        return asyncio.get_running_loop() is future.get_loop()
    except RuntimeError:
        return False


def _wake(future: asyncio.Future) -> bool:
    """Let ``future``'s waiter look again, from any thread; False when its loop is closed
    (nobody will ever run it)."""
    if _on_its_loop(future):
        future.set_result(None)
        return True
    try:
        future.get_loop().call_soon_threadsafe(_wake_later, future)
    except RuntimeError:  # its loop closed
        return False
    return True


def _wake_later(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


quiet_as_sqlalchemy(GuardedAsyncQueuePool)
