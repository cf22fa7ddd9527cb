"""OpenTelemetry metrics for every connguard pool and plugin engine of the process.

``connguard.otel.instrument()`` (extra ``otel``: ``pip install 'connguard[otel]'``) registers
observable instruments on a meter (from the global MeterProvider unless one is given); each
collection reads ``connguard.stats()``. Names follow OpenTelemetry's conventions
(``connguard.pool.<what>``, attributes ``pool.name`` and ``pool.kind``, plus ``reason`` and
``error.type``). Distributions are exported as their count and sum (observable instruments
cannot carry buckets); the Prometheus collector has the buckets.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

from connguard import metrics

Source = Callable[[], Dict[str, Dict[str, Any]]]


def _attributes(stats: Dict[str, Any], **extra: str) -> Dict[str, str]:
    return {"pool.name": stats["name"], "pool.kind": stats["kind"], **extra}


def instrument(meter_provider: Optional[Any] = None, source: Source = metrics.stats) -> List[Any]:
    """Register the instruments; returns them (keep a reference as long as they should
    report)."""
    meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter("connguard")

    def sizes(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for stats in source().values():
                value = stats["sizes"].get(key)
                if value is not None:
                    yield Observation(value, _attributes(stats))
        return callback

    def counter(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for stats in source().values():
                value = stats["counters"].get(key)
                if isinstance(value, dict):
                    label = "reason" if key == "closed" else "error.type"
                    for name, count in value.items():
                        yield Observation(count, _attributes(stats, **{label: name}))
                elif value is not None:
                    yield Observation(value, _attributes(stats))
        return callback

    def distribution(key: str, part: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for stats in source().values():
                dist = stats["distributions"].get(key)
                if dist is not None:
                    yield Observation(dist[part], _attributes(stats))
        return callback

    made = [meter.create_observable_up_down_counter(
        f"connguard.pool.{key}", callbacks=[sizes(key)], unit="{connection}")
        for key in ("idle", "in_use", "opening", "max", "ceiling")]
    made += [meter.create_observable_counter(
        f"connguard.pool.{key}", callbacks=[counter(key)])
        for key in ("checkouts", "opened", "closed", "peer_closed", "reaped", "timeouts",
                    "waits", "connect_failures", "rollbacks", "resets", "breaker_opens")]
    for key, name in (("checkout_wait_s", "checkout_wait"), ("connect_s", "connect"),
                      ("hold_s", "hold")):
        made.append(meter.create_observable_counter(
            f"connguard.pool.{name}.duration.count", callbacks=[distribution(key, "count")]))
        made.append(meter.create_observable_counter(
            f"connguard.pool.{name}.duration.sum", callbacks=[distribution(key, "sum")],
            unit="s"))
    return made
