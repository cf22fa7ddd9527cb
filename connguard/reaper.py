"""One background thread per process that keeps every pool's idle connections honest.

Every ``INTERVAL`` seconds it asks each live pool to ``reap()``: close idle connections whose
peer has closed (so no socket lingers in CLOSE_WAIT while the application is idle), that
outlived their lifetime or idle timeout, report leaked checkouts, and top up ``min_idle``.
The thread starts with the first pool and exits when the last one is closed or collected.

Fork safety lives here too: the child of ``os.fork()`` drops every inherited connection
without a word to the server (the parent's sessions stay intact) and gets its own thread.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import List, Optional, Protocol


class Reapable(Protocol):
    """What the reaper needs: a pass of housekeeping, and a way to drop inherited sockets."""

    def reap(self) -> None: ...

    def _after_fork_in_child(self) -> None: ...

log = logging.getLogger("connguard.pool")

#: Seconds between passes: a peer-closed idle socket is closed within about this long.
INTERVAL = 0.5

_pools: weakref.WeakSet[Reapable] = weakref.WeakSet()
_lock = threading.Lock()
_wake = threading.Condition(_lock)
_thread: Optional[threading.Thread] = None


def register(pool: Reapable) -> None:
    """Start watching ``pool`` (starting the thread if needed)."""
    global _thread
    with _lock:
        _pools.add(pool)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="connguard-reaper", daemon=True)
            _thread.start()


def unregister(pool: Reapable) -> None:
    with _lock:
        _pools.discard(pool)
        _wake.notify_all()


def running() -> bool:
    """Whether the reaper thread is alive (tests use it to check nothing leaks)."""
    thread = _thread
    return thread is not None and thread.is_alive()


def _run() -> None:
    global _thread
    while True:
        with _lock:
            if not _pools:
                _thread = None
                return
        _reap_all()  # a function of its own: no reference to a pool outlives the pass
        with _lock:
            if _pools:
                _wake.wait(INTERVAL)


def _reap_all() -> None:
    with _lock:
        pools: List[Reapable] = list(_pools)
    for pool in pools:
        try:
            pool.reap()
        except Exception:  # noqa: BLE001 - the reaper must survive any one pool's failure
            log.exception("reaper: %r failed", pool)


def _after_fork_in_child() -> None:
    global _lock, _wake, _thread
    _lock = threading.Lock()
    _wake = threading.Condition(_lock)
    _thread = None
    pools = list(_pools)
    for pool in pools:
        try:
            pool._after_fork_in_child()
        except Exception:  # noqa: BLE001 - one pool's failure must not spare the others
            log.exception("connguard: a pool could not drop its inherited connections")
    if pools:
        for pool in pools:
            register(pool)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
