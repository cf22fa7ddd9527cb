"""OpenTelemetry metrics for every connguard pool and plugin engine of the process.

``connguard.otel.instrument()`` (extra ``otel``: ``pip install 'connguard[otel]'``) registers
observable instruments on a meter (from the global MeterProvider unless one is given); each
collection reads ``connguard.stats()`` once (one consistent snapshot for all instruments).

Names follow OpenTelemetry's database client semantic conventions where they have one
(``db.client.connection.count`` with ``db.client.connection.state`` idle/used,
``db.client.connection.max``, ``db.client.connection.timeouts``; attribute
``db.client.connection.pool.name``), and ``connguard.pool.*`` for the rest. Distributions
are exported as their count and sum (observable instruments carry no buckets; the Prometheus
collector has them).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

from connguard import metrics

Source = Callable[[], Dict[str, Dict[str, Any]]]
Callback = Callable[[CallbackOptions], Iterable[Observation]]
POOL = "db.client.connection.pool.name"
KIND = "connguard.pool.kind"
#: A collection calls every callback within this many seconds: one stats() for all.
SNAPSHOT_TTL = 0.5



def _name(key: str, measure: metrics.Measure) -> str:
    """The instrument's name: the semantic convention's, or ``connguard.pool.<key>``."""
    return measure.otel_name or f"connguard.pool.{key}"


class _Snapshot:
    """``source()`` taken once per collection (within SNAPSHOT_TTL)."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._taken = -SNAPSHOT_TTL
        self._data: Dict[str, Dict[str, Any]] = {}

    def __call__(self) -> Iterable[Dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            if now - self._taken >= SNAPSHOT_TTL:
                self._data, self._taken = self._source(), now
            return list(self._data.values())


def _attributes(stats: Dict[str, Any], **extra: str) -> Dict[str, str]:
    return {POOL: stats["name"], KIND: stats["kind"], **extra}


def _connection_count(snapshot: _Snapshot) -> Callback:
    """``db.client.connection.count``: idle and used connections, by state."""
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for stats in snapshot():
            for state, key in (("idle", "idle"), ("used", "in_use")):
                value = stats["sizes"].get(key)
                if value is not None:
                    yield Observation(value, _attributes(
                        stats, **{"db.client.connection.state": state}))
    return callback


def _size(snapshot: _Snapshot, key: str) -> Callback:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for stats in snapshot():
            value = stats["sizes"].get(key)
            if value is not None:
                yield Observation(value, _attributes(stats))
    return callback


def _counter(snapshot: _Snapshot, key: str) -> Callback:
    """A counter; one by ``reason`` (closed) or ``error.type`` (connect failures) when the
    schema breaks it down."""
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for stats in snapshot():
            value = stats["counters"].get(key)
            if isinstance(value, dict):
                label = "reason" if key == "closed" else "error.type"
                for name, n in value.items():
                    yield Observation(n, _attributes(stats, **{label: name}))
            elif value is not None:
                yield Observation(value, _attributes(stats))
    return callback


def _distribution(snapshot: _Snapshot, key: str, part: str) -> Callback:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for stats in snapshot():
            dist = stats["distributions"].get(key)
            if dist is not None:
                yield Observation(dist[part], _attributes(stats))
    return callback


def instrument(meter_provider: Optional[Any] = None, source: Source = metrics.stats) -> List[Any]:
    """Register the instruments; returns them (keep a reference as long as they should
    report)."""
    meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter("connguard")
    snapshot = _Snapshot(source)
    made = [meter.create_observable_up_down_counter(
        "db.client.connection.count", callbacks=[_connection_count(snapshot)],
        unit="{connection}")]
    made += [meter.create_observable_up_down_counter(
        _name(key, metrics.SIZES[key]), callbacks=[_size(snapshot, key)],
        unit=metrics.SIZES[key].unit, description=metrics.SIZES[key].help)
        for key in ("max", "opening", "ceiling")]  # idle and in use: the count's states
    made += [meter.create_observable_counter(_name(key, measure),
                                             callbacks=[_counter(snapshot, key)],
                                             unit=measure.unit, description=measure.help)
             for key, measure in metrics.COUNTERS.items()]
    for key, measure in metrics.DISTRIBUTIONS.items():
        name = _name(key, measure)
        made.append(meter.create_observable_counter(
            f"{name}.count", callbacks=[_distribution(snapshot, key, "count")], unit="{event}",
            description=f"{measure.help} (how many)"))
        made.append(meter.create_observable_counter(
            f"{name}.sum", callbacks=[_distribution(snapshot, key, "sum")], unit="s",
            description=f"{measure.help} (their sum)"))
    return made
