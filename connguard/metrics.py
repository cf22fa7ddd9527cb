"""Numbers an operator reads: fixed-bucket histograms, and ``connguard.stats()``.

Every pool (``connguard.Pool``, drop-in pools, engines made with the SQLAlchemy plugin) has a
name and gives one schema (``docs/metrics.md``)::

    {"name": "app@10.0.0.5:3306/app", "kind": "pool" | "engine",
     "sizes": {"idle", "in_use", "opening", "max", "ceiling"},
     "counters": {"checkouts", "opened", "closed": {reason: n}, "peer_closed", "reaped",
                  "timeouts", "waits", "connect_failures": {class: n}, "rollbacks",
                  "resets", "breaker_opens"},
     "distributions": {"checkout_wait_s", "connect_s", "hold_s"}}

beside the flat keys each kind has always had. Histograms have fixed buckets: observing a
value is a bisect and an increment, nothing is allocated per event.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from connguard.concurrency import ProcessLock

#: Bucket upper bounds in seconds (Prometheus' ``le``), the last bucket is +Inf: from
#: 100 µs (a checkout served from the idle queue) to 30 s (a long wait, a slow login).
BOUNDS: Tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                             0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Measure:
    """One number of the schema as the exporters name it: what it is (Prometheus' HELP, the
    OpenTelemetry instrument's description) and OpenTelemetry's unit and, where a semantic
    convention names it, its name there (default ``connguard.pool.<key>``)."""

    __slots__ = ("help", "unit", "otel_name")

    def __init__(self, help: str, unit: str, otel_name: Optional[str] = None) -> None:
        self.help, self.unit, self.otel_name = help, unit, otel_name


#: The schema's numbers, once for both exporters (connguard.prometheus, connguard.otel).
SIZES = {
    "idle": Measure("Idle connections in the pool.", "{connection}"),
    "in_use": Measure("Connections checked out.", "{connection}"),
    "opening": Measure("Handshakes running.", "{connection}"),
    "max": Measure("The pool's size (connections).", "{connection}",
                   "db.client.connection.max"),
    "ceiling": Measure("Where the pool holds after 'too many connections'.", "{connection}"),
}
COUNTERS = {
    "checkouts": Measure("Connections handed to callers.", "{checkout}"),
    "opened": Measure("New server connections.", "{connection}"),
    "closed": Measure("Pooled connections closed, by reason.", "{connection}"),
    "peer_closed": Measure("Pooled connections found closed by the server.", "{connection}"),
    "reaped": Measure("Idle connections the reaper closed.", "{connection}"),
    "timeouts": Measure("Checkouts whose wait ran out.", "{timeout}",
                        "db.client.connection.timeouts"),
    "waits": Measure("Checkouts that had to wait.", "{checkout}"),
    "connect_failures": Measure("Failed connects, by connguard exception class.", "{connect}"),
    "rollbacks": Measure("Returned sessions rolled back.", "{return}"),
    "resets": Measure("Returned sessions reset (COM_RESET_CONNECTION).", "{return}"),
    "breaker_opens": Measure(
        "Times the connect gate toward the server opened (shared per server).", "{open}"),
}
DISTRIBUTIONS = {
    "checkout_wait_s": Measure("How long checkouts waited.", "s", "connguard.pool.wait_time"),
    "connect_s": Measure("New connections, gate wait included.", "s",
                         "connguard.pool.create_time"),
    "hold_s": Measure("How long callers held a connection.", "s", "connguard.pool.use_time"),
}


class Histogram:
    """Counts of observations per bucket, and their sum. Not thread-safe on its own: the
    owner observes under its lock (or accepts a rare lost increment, as noted where)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Tuple[float, ...] = BOUNDS) -> None:
        self.bounds = bounds
        self.counts: List[int] = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> Dict[str, Any]:
        """``{"count", "sum", "buckets": [[le, cumulative count], ...]}`` (le: None = +Inf)."""
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, None), self.counts):
            cumulative += count
            buckets.append([bound, cumulative])
        return {"count": cumulative, "sum": round(self.total, 6), "buckets": buckets}


class PoolMetrics:
    """What a connguard.Pool counts and times, in one object: the pool's own attributes stay
    few enough for CPython to keep its fast attribute access on the checkout path."""

    __slots__ = ("name", "listeners", "lock", "failures", "retired_uses", "waited",
                 "connect_time", "held", "held_counts", "held_sum")

    def __init__(self, name: str, listeners: Any) -> None:
        self.name = name
        self.listeners = listeners
        self.lock = threading.Lock()  # counters bumped with or without the pool's lock
        self.failures: Counter = Counter()  # connect failures by exception class
        # Checkouts of connections no longer in the pool, added under the pool's lock in the
        # same step that takes them out (so the total never goes down): the pool counts
        # checkouts per connection (Entry.uses), which costs the checkout nothing more.
        self.retired_uses = 0
        self.waited = Histogram()  # checkouts that did not get a connection at once
        self.connect_time = Histogram()
        self.held = Histogram()
        self.held_counts = self.held.counts  # observed inline on the return path
        self.held_sum = 0.0

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.listeners._lock = threading.Lock()

    def hold_snapshot(self) -> Dict[str, Any]:
        self.held.total = self.held_sum
        return self.held.snapshot()


def empty_distribution() -> Dict[str, Any]:
    return Histogram().snapshot()


# -- every pool of the process ------------------------------------------------------------------

_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_pools_lock = ProcessLock()  # re-made after a fork and once threading is patched


_names: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def claim_name(base: str, owner: Any) -> str:
    """A name for ``owner`` (a pool or an engine's guard) no other live one has: ``base``,
    else ``base#2``, ``#3``... Claimed once, at creation: a pool keeps its name for life,
    so exported series never change owner."""
    with _pools_lock:
        name, n = base, 1
        while _names.get(name) is not None:
            n += 1
            name = f"{base}#{n}"
        _names[name] = owner
        return name


def release_name(name: str, owner: Any) -> None:
    """A closed pool gives its name back (the next pool of that name gets it plain)."""
    with _pools_lock:
        if _names.get(name) is owner:
            del _names[name]


def register(pool: Any) -> None:
    """A connguard.Pool, for ``connguard.stats()`` with no argument."""
    with _pools_lock:
        _pools.add(pool)


# Engines made with the SQLAlchemy plugin: their dialect -> the plugin's EngineGuard (which
# holds its engine weakly). Kept here, not in the plugin, so that stats() and events reach
# them without importing SQLAlchemy.
_engine_guards: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def register_engine(dialect: Any, guard: Any) -> None:
    _engine_guards[dialect] = guard


def engine_guard(engine: Any) -> Optional[Any]:
    """The plugin's guard of ``engine``, or None if it was not made with the plugin."""
    dialect = getattr(engine, "dialect", None)
    return None if dialect is None else _engine_guards.get(dialect)


def engine_guards() -> List[Any]:
    """The plugin's guard of every engine made with it that is still alive."""
    return list(_engine_guards.values())


def guarded_engines() -> List[Any]:
    """Every live engine made with the plugin."""
    engines = (guard._engine() for guard in engine_guards())
    return [engine for engine in engines if engine is not None]


def stats(target: Optional[Any] = None) -> Dict[str, Any]:
    """The stats of a Pool, of an engine made with the plugin, or (no argument) of every open
    pool and plugin engine of the process, by name."""
    if target is None:
        with _pools_lock:
            pools = [p for p in _pools if not p.closed]
        guards = [g for g in engine_guards() if g._engine() is not None]
        # Names are unique among live pools and engines (claim_name): one key each.
        every = [p.stats() for p in pools] + [g.stats() for g in guards]
        return {each["name"]: each for each in every}
    with _pools_lock:
        pool = any(p is target for p in _pools)  # by identity: the target may not hash
    if pool:
        return target.stats()
    guard = engine_guard(target)
    if guard is not None:
        return guard.stats()
    try:
        __import__("sqlalchemy")  # an engine, perhaps: that needs the sqlalchemy extra
    except ModuleNotFoundError as exc:
        if exc.name != "sqlalchemy":
            raise
        raise ModuleNotFoundError(
            "connguard.stats(engine) is for SQLAlchemy engines and needs SQLAlchemy: "
            "pip install 'connguard[sqlalchemy]'", name="sqlalchemy") from None
    raise ValueError(f"{target!r} was not created with the connguard plugin (nor is it a "
                     "connguard.Pool): add ?plugin=connguard to the URL or "
                     "plugins=['connguard']")
