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
    The connect gate toward ``destination`` changed state (target None only): ``failures``,
    and for ``breaker_open`` the ``cause`` (a one-line summary).
``ceiling_lowered`` / ``ceiling_raised``
    The pool holds at ``ceiling`` connections after the server refused one more (lowered),
    or grew past it (raised; ``ceiling`` None: no limit any more).
``lease_denied``
    A global budget had no lease for a new connection: ``retry_after`` (seconds).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

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
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def add(self, name: str, fn: Listener) -> None:
        _check(name, fn)
        with self._lock:
            self._by_name[name] = (*self._by_name.get(name, ()), fn)
        _counted(1)

    def remove(self, name: str, fn: Listener) -> None:
        with self._lock:
            before = self._by_name.get(name, ())
            kept = tuple(f for f in before if f is not fn)
            if kept:
                self._by_name[name] = kept
            else:
                self._by_name.pop(name, None)
        _counted(len(kept) - len(before))

    def get(self, name: str) -> Tuple[Listener, ...]:
        return self._by_name.get(name, ())


#: Listeners for every pool of the process.
everywhere = Listeners()
#: How many listeners are registered anywhere: the one thing a pool's hot path reads.
active = 0
_active_lock = threading.Lock()


def _counted(delta: int) -> None:
    global active
    with _active_lock:
        active += delta
_reported: Set[Tuple[int, str]] = set()


def _check(name: str, fn: Any) -> None:
    if name not in EVENTS:
        raise ValueError(f"unknown connguard event {name!r}; the events are "
                         f"{', '.join(sorted(EVENTS))}")
    if not callable(fn):
        raise TypeError(f"a listener must be callable, got {fn!r}")


def listen(target: Optional[Any], name: str, fn: Listener) -> None:
    """Call ``fn(pool_name, **details)`` on event ``name`` of ``target`` (None: all)."""
    (everywhere if target is None else target._listeners).add(name, fn)


def remove(target: Optional[Any], name: str, fn: Listener) -> None:
    (everywhere if target is None else target._listeners).remove(name, fn)


def dispatch(own: Optional[Listeners], pool_name: str, name: str, **details: Any) -> None:
    """Call the listeners of ``name`` (the pool's own, then everyone's); never raises."""
    listeners: List[Listener] = []
    if own:
        listeners.extend(own.get(name))
    if everywhere:
        listeners.extend(everywhere.get(name))
    for fn in listeners:
        try:
            fn(pool_name, **details)
        except Exception:  # noqa: BLE001 - a listener must not break the pool
            key = (id(fn), name)
            if key not in _reported:
                _reported.add(key)
                log.warning("connguard: listener %r for %s raised (logged once)", fn, name,
                            exc_info=True)
