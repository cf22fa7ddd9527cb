"""One background thread per process that keeps every pool's idle connections honest.

Every ``INTERVAL`` seconds it asks each live pool to ``reap()``: close idle connections whose
peer has closed (so no socket lingers in CLOSE_WAIT while the application is idle), that
outlived their lifetime or idle timeout, report leaked checkouts, and top up ``min_idle``.
The thread starts with the first pool and exits when the last one is closed or collected.
When gevent or eventlet has patched ``threading``, that thread is a greenlet (a patched
``threading.Thread`` is one): its waits and the pools' I/O yield to the hub. It is never
started under a lock: a patched ``Thread.start()`` switches to the new greenlet at once.

Fork safety lives here too: the child of ``os.fork()`` drops every inherited connection
without a word to the server (the parent's sessions stay intact) and gets its own thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from typing import Any, List, Optional, Protocol

from connguard.concurrency import ProcessLock, threading_patched


class Reapable(Protocol):
    """What the reaper needs: a pass of housekeeping, and a way to drop inherited sockets."""

    def reap(self) -> None: ...

    def _after_fork_in_child(self) -> None: ...

log = logging.getLogger("connguard.pool")

#: Seconds between passes: a peer-closed idle socket is closed within about this long.
INTERVAL = 0.5

_pools: weakref.WeakSet[Reapable] = weakref.WeakSet()
_lock = ProcessLock()  # re-made after a fork and once threading is patched
_thread: Optional[threading.Thread] = None
_running = False  # set under the lock by whoever starts the thread, cleared by it on exit


def register(pool: Reapable) -> None:
    """Start watching ``pool`` (starting the thread if needed)."""
    global _running
    with _lock:
        _pools.add(pool)
        if _running:
            return
        _running = True
    _start()


def _start() -> None:
    """Start the thread, outside the lock: under gevent ``start()`` runs it at once, and it
    takes the lock first thing."""
    global _thread, _running
    thread = threading.Thread(target=_run, name="connguard-reaper", daemon=True)
    try:
        thread.start()
    except BaseException:
        with _lock:
            _running = False
        raise
    _thread = thread


def unregister(pool: Reapable) -> None:
    with _lock:
        _pools.discard(pool)
        _lock.condition().notify_all()


def running() -> bool:
    """Whether the reaper thread is alive (tests use it to check nothing leaks)."""
    thread = _thread
    return _running and thread is not None and thread.is_alive()


def _run() -> None:
    global _running
    while True:
        with _lock:
            if not _pools:
                _running = False
                return
        _reap_all()  # a function of its own: no reference to a pool outlives the pass
        with _lock:
            if _pools:
                _lock.condition().wait(INTERVAL)


def _reap_all() -> None:
    with _lock:
        pools: List[Reapable] = list(_pools)
    for pool in pools:
        try:
            pool.reap()
        except Exception:  # noqa: BLE001 - the reaper must survive any one pool's failure
            log.exception("reaper: %r failed", pool)


def _after_fork_in_child() -> None:
    global _thread, _running
    # The lock itself is re-made by connguard.concurrency's handler, which runs first.
    _thread = None
    _running = False
    pools = list(_pools)
    for pool in pools:
        try:
            pool._after_fork_in_child()
        except Exception:  # noqa: BLE001 - one pool's failure must not spare the others
            log.exception("connguard: a pool could not drop its inherited connections")
    if not pools:
        return
    if _patch_coming():
        # A gevent worker forked from a --preload master patches after the fork: a thread
        # started now would be a real OS thread taking the locks the patch then makes
        # gevent's (not safe across OS threads). Start it as a greenlet once patched.
        _subscribe_to_patch(pools)
        return
    for pool in pools:
        register(pool)


def _patch_coming() -> bool:
    """gevent is imported but has not patched threading yet."""
    return "gevent" in sys.modules and not threading_patched()


def _subscribe_to_patch(pools: List[Reapable]) -> None:
    try:
        import gevent.events  # gevent is imported already: no new dependency
    except ImportError:
        for pool in pools:
            register(pool)
        return
    events: Any = gevent.events
    waiting = weakref.WeakSet(pools)

    def on_patch(event: object) -> None:
        if isinstance(event, events.GeventDidPatchAllEvent):
            events.subscribers.remove(on_patch)
            for pool in list(waiting):
                register(pool)

    events.subscribers.append(on_patch)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
