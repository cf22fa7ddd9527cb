"""Process-wide locks that follow the ``threading`` module as it is now, patched or not.

A ``threading.Lock()`` made at import is a real OS lock for ever, even after
``gevent.monkey.patch_all()`` (gunicorn ``--preload -k gevent`` imports the application, and
so connguard, before each worker patches). Two greenlets meeting on such a lock while its
holder waits for the hub block the only OS thread for good. So every module-level lock of
connguard is a :class:`ProcessLock`: it is made again from the current ``threading.Lock``
when that attribute has changed since (the patch replaces it), and again in the child of a
fork. Locks of objects (a pool, an engine's guard) are made at the object's construction from
the current module, which costs their hot paths nothing.

Nothing here imports gevent or eventlet: a patch is seen by its effect on ``threading``.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Type


def threading_patched() -> bool:
    """Whether gevent or eventlet has patched ``threading`` (asked only if already imported)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return True
    patcher = sys.modules.get("eventlet.patcher")
    return bool(patcher is not None and patcher.is_monkey_patched("thread"))


_every: weakref.WeakSet[ProcessLock] = weakref.WeakSet()


class _OfCurrentLock:
    """``ProcessLock.__enter__``/``__exit__``: the current lock's own (C) methods, found by the
    ``with`` statement's lookup. A Python ``__enter__`` that acquires and returns can be
    interrupted after the acquire, before the ``with`` body begins (a signal handler runs
    on the way out of it): the lock would stay held for good. The lock's own ``__enter__``
    runs no Python code after acquiring."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, lock: Optional[ProcessLock], owner: type) -> Any:
        if lock is None:
            return self
        if self.name == "__exit__":
            # Looked up right after __enter__ (both before the body): the lock __enter__
            # took, never one re-made in between by a patch in another thread.
            return lock._lock.__exit__
        return getattr(lock.current(), self.name)


class ProcessLock:
    """A module-level lock (``with lock:``), re-made when ``threading`` has been patched since.

    Taken as a plain lock; :meth:`condition` gives a ``threading.Condition`` over the current
    lock (re-made with it). The check is one attribute comparison per use."""

    __slots__ = ("_lock", "_made_with", "_condition", "__weakref__")

    def __init__(self) -> None:
        self._remake()
        _every.add(self)

    def _remake(self) -> None:
        self._made_with = threading.Lock
        self._lock: Any = threading.Lock()
        self._condition: Optional[threading.Condition] = None

    def current(self) -> Any:
        """The lock to take now (a new one if ``threading`` was patched since the last)."""
        if threading.Lock is not self._made_with:
            self._remake()
        return self._lock

    def condition(self) -> threading.Condition:
        """A condition over the lock the caller holds (taken by ``with lock:``, which re-made
        it if ``threading`` was patched since). Never re-made here: a gunicorn gevent worker
        patches again after the fork, and a lock re-made while held left the reaper waiting
        on (and ``with`` releasing) a lock nobody held: "Semaphore released too many times"
        in every patch-first worker."""
        cond = self._condition
        if cond is None:
            cond = self._condition = threading.Condition(self._lock)
        return cond

    if TYPE_CHECKING:  # what the type checker sees; the objects are below
        def __enter__(self) -> bool: ...

        def __exit__(self, kind: Optional[Type[BaseException]], exc: Optional[BaseException],
                     tb: Optional[TracebackType]) -> None: ...
    else:
        __enter__ = _OfCurrentLock("__enter__")
        __exit__ = _OfCurrentLock("__exit__")

    def acquire(self) -> bool:
        return bool(self.current().acquire())

    def release(self) -> None:
        self._lock.release()

    def __repr__(self) -> str:
        return f"<ProcessLock {self._lock!r}>"


class _OfOwnLock:
    """A condition's ``__enter__``/``__exit__``: its lock's own (C) methods (see
    _OfCurrentLock: ``threading.Condition.__enter__`` is Python, interruptible after the
    acquire)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, cond: Any, owner: type) -> Any:
        if cond is None:
            return self
        return getattr(cond._lock, self.name)


class Condition(threading.Condition):
    """``threading.Condition`` over a re-entrant lock, safe from signal handlers that raise.

    ``with cond:`` takes the lock through the lock's own methods, and :meth:`wait` takes the
    lock again when an exception (a signal handler's) left ``threading.Condition.wait``
    between its release and its re-acquire: the caller's ``with`` would otherwise release a
    lock it does not hold, or another thread's. Make it after any monkey patch, like the
    objects that own it."""

    if not TYPE_CHECKING:
        __enter__ = _OfOwnLock("__enter__")
        __exit__ = _OfOwnLock("__exit__")

    def __init__(self) -> None:
        super().__init__(threading.RLock())

    def wait(self, timeout: Optional[float] = None) -> bool:
        try:
            return super().wait(timeout)
        except BaseException:
            if not self._is_owned():  # type: ignore[attr-defined]
                self._lock.acquire()  # type: ignore[attr-defined]
            raise


def _after_fork_in_child() -> None:
    # Imported before every module that makes a ProcessLock, so this handler runs before
    # theirs: their own handlers (the reaper re-registering pools) find fresh locks.
    for lock in list(_every):
        lock._remake()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
