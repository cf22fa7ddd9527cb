"""Pool events: what a listener is called with, and when (a spec, as SQLAlchemy's events.py).

``connguard.events.listen(target, name, fn)``: ``target`` is a ``connguard.Pool`` (its events
only) or None (every pool of the process, and the connect gates' breaker events). Every
listener is called as ``fn(pool_name, **details)`` with the keyword arguments below, after
the pool has done its work and outside its lock. A listener that raises is logged (WARNING
on ``connguard.events``, once per listener and event) and never breaks the pool.
``remove(target, name, fn)`` takes one off.

Events (``details``):

``connect``
    A new server connection opened: ``seconds`` (the connect, gate wait included).
``connect_failed``
    A connect failed: ``error`` (the translated exception).
``checkout``
    A connection handed to a caller: ``waited`` (seconds).
``checkin``
    A connection given back: ``held`` (seconds since its checkout).
``reset``
    A returned connection's session was cleaned: ``kind`` ("rollback" or "reset").
``peer_closed``
    A pooled connection found closed by the server (at checkout or by the reaper).
``reaped``
    An idle connection closed by the reaper: ``reason`` ("peer_closed", "idle_timeout",
    "expired").
``breaker_open`` / ``breaker_half_open`` / ``breaker_closed``
    The connect gate toward a server changed state (target None only; the first argument
    is then ``host:port``, the gate's, shared by the pools toward it): ``failures``, and for
    ``breaker_open`` the ``cause`` (a one-line summary).
``ceiling_lowered`` / ``ceiling_raised``
    The pool holds at ``ceiling`` connections after the server refused one more (lowered),
    or grew past it (raised; ``ceiling`` None: no limit any more).
``lease_denied``
    A global budget had no lease for a new connection: ``retry_after`` (seconds).

Engines made with the SQLAlchemy plugin emit ``connect`` and ``connect_failed`` (SQLAlchemy
has its own pool events for the rest: ``checkout``, ``checkin``, ``reset``,
``invalidate``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from connguard import metrics
from connguard.concurrency import ProcessLock

log = logging.getLogger("connguard.events")

EVENTS = frozenset({
    "connect", "connect_failed", "checkout", "checkin", "reset", "peer_closed", "reaped",
    "breaker_open", "breaker_half_open", "breaker_closed", "ceiling_lowered",
    "ceiling_raised", "lease_denied",
})

Listener = Callable[..., Any]


class Listeners:
    """The listeners of one target, by event name. Empty (falsy) costs a pool nothing."""

    def __init__(self) -> None:
        self._by_name: Dict[str, Tuple[Listener, ...]] = {}
        self._lock: Any = threading.Lock()  # everywhere's: a ProcessLock

    def __del__(self) -> None:
        # A pool collected with listeners still registered: they no longer count. (At
        # interpreter exit the module may be torn down already: nothing left to count.)
        by_name = getattr(self, "_by_name", {})
        names = tuple(name for name, fns in by_name.items() for _ in fns)
        counted = globals().get("_counted")
        if names and callable(counted):
            with contextlib.suppress(Exception):  # a finalizer never raises
                counted(names, -1)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def add(self, name: str, fn: Listener) -> None:
        _check(name, fn)
        with self._lock:
            self._by_name[name] = (*self._by_name.get(name, ()), fn)
        _counted((name,), 1)

    def remove(self, name: str, fn: Listener) -> None:
        with self._lock:
            before = self._by_name.get(name, ())
            kept = tuple(f for f in before if f != fn)  # == : bound methods are made anew
            if kept:
                self._by_name[name] = kept
            else:
                self._by_name.pop(name, None)
        removed = len(before) - len(kept)
        if removed:
            _counted((name,) * removed, -1)

    def get(self, name: str) -> Tuple[Listener, ...]:
        return self._by_name.get(name, ())


#: Listeners for every pool of the process.
everywhere = Listeners()
everywhere._lock = ProcessLock()  # made at import: must follow a later patch
#: How many listeners are registered anywhere, and the event names that have one: all a
#: pool's hot path reads (``if "checkin" in events.wanted``).
active = 0
wanted: frozenset = frozenset()
_per_name: Dict[str, int] = {}
_active_lock = ProcessLock()  # re-made after a fork and once threading is patched
_reported: Set[Tuple[int, str]] = set()  # (listener, event) already logged


def _counted(names: Tuple[str, ...], step: int) -> None:
    """One listener more (``step`` 1) or less (-1) for each of ``names``."""
    global active, wanted
    with _active_lock:
        for name in names:
            _per_name[name] = _per_name.get(name, 0) + step
        active = sum(_per_name.values())
        wanted = frozenset(n for n, count in _per_name.items() if count > 0)


def _check(name: str, fn: Any) -> None:
    if name not in EVENTS:
        raise ValueError(f"unknown connguard event {name!r}; the events are "
                         f"{', '.join(sorted(EVENTS))}")
    if not callable(fn):
        raise TypeError(f"a listener must be callable, got {fn!r}")


def _of(target: Optional[Any]) -> Listeners:
    """The listeners of a Pool, of an engine made with the plugin, or of everything."""
    if target is None:
        return everywhere
    own = getattr(target, "_listeners", None)
    if isinstance(own, Listeners):
        return own
    guard = metrics.engine_guard(target)  # an engine made with the plugin
    if guard is not None:
        return guard._listeners
    raise TypeError(f"cannot listen to {target!r}: give a connguard.Pool, an engine made "
                    "with the connguard plugin, or None (every pool)")


def listen(target: Optional[Any], name: str, fn: Listener) -> None:
    """Call ``fn(pool_name, **details)`` on event ``name`` of ``target`` (None: all)."""
    _of(target).add(name, fn)


def remove(target: Optional[Any], name: str, fn: Listener) -> None:
    _of(target).remove(name, fn)




def dispatch(own: Optional[Listeners], pool_name: str, name: str, **details: Any) -> None:
    """Call the listeners of ``name`` (the pool's own, then everyone's); an Exception from
    one is logged, never raised (a BaseException, such as SystemExit, propagates)."""
    listeners: List[Listener] = []
    if own:
        listeners.extend(own.get(name))
    if everywhere:
        listeners.extend(everywhere.get(name))
    if not listeners:
        return
    for fn in listeners:
        try:
            fn(pool_name, **details)
        except Exception:  # noqa: BLE001 - a listener must not break the pool
            key = (id(fn), name)
            if key not in _reported:
                _reported.add(key)
                log.warning("connguard: listener %r for %s raised (logged once)", fn, name,
                            exc_info=True)
