"""A Prometheus collector for every connguard pool and plugin engine of the process.

``connguard.prometheus.register()`` (extra ``prometheus``: ``pip install
'connguard[prometheus]'``) adds it to ``prometheus_client``'s default registry; each scrape
reads ``connguard.stats()``. Metric names follow Prometheus' conventions: ``connguard_`` prefix,
base units (seconds), ``_total`` for counters; labels ``pool`` (the pool's name) and ``kind``
(``pool`` or ``engine``), plus ``reason`` for closes and ``error`` for connect failures.
The list, with types and units, is in docs/metrics.md.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from connguard import metrics

#: Every metric is ``connguard_<key>`` (distributions: ``_seconds`` for ``_s``), its help
#: text from connguard.metrics' one catalogue.
_COUNTED = [key for key in metrics.COUNTERS if key not in ("closed", "connect_failures")]
LABELS = ["pool", "kind"]


def _le(bound: Optional[float]) -> str:
    return "+Inf" if bound is None else repr(float(bound))


class ConnguardCollector(Collector):
    """Reads ``source()`` (default ``connguard.stats()``) at every scrape."""

    def __init__(self, source: Callable[[], Dict[str, Dict[str, Any]]] = metrics.stats
                 ) -> None:
        self._source = source

    def describe(self) -> List[Any]:
        return []  # collected fresh at each scrape: no fixed description

    def collect(self) -> Iterator[Any]:
        everything = self._source()
        gauges = {k: GaugeMetricFamily(f"connguard_{k}", m.help, labels=LABELS)
                  for k, m in metrics.SIZES.items()}
        counters = {k: CounterMetricFamily(f"connguard_{k}", metrics.COUNTERS[k].help,
                                           labels=LABELS) for k in _COUNTED}
        closed = CounterMetricFamily("connguard_closed", metrics.COUNTERS["closed"].help,
                                     labels=[*LABELS, "reason"])
        failures = CounterMetricFamily("connguard_connect_failures",
                                       metrics.COUNTERS["connect_failures"].help,
                                       labels=[*LABELS, "error"])
        histograms = {k: HistogramMetricFamily(f"connguard_{k.removesuffix('_s')}_seconds",
                                               m.help, labels=LABELS)
                      for k, m in metrics.DISTRIBUTIONS.items()}
        for stats in everything.values():
            labels = [stats["name"], stats["kind"]]
            for key, gauge in gauges.items():
                value = stats["sizes"].get(key)
                if value is not None:
                    gauge.add_metric(labels, float(value))
            for key, count in counters.items():
                value = stats["counters"].get(key)
                if value is not None:
                    count.add_metric(labels, float(value))
            for reason, value in stats["counters"]["closed"].items():
                closed.add_metric([*labels, reason], float(value))
            for error, value in stats["counters"]["connect_failures"].items():
                failures.add_metric([*labels, error], float(value))
            for key, histogram in histograms.items():
                dist = stats["distributions"].get(key)
                if dist is not None:
                    histogram.add_metric(labels, [(_le(le), n) for le, n in dist["buckets"]],
                                         sum_value=dist["sum"])
        yield from gauges.values()
        yield from counters.values()
        yield closed
        yield failures
        yield from histograms.values()


_registered: Dict[int, ConnguardCollector] = {}


def register(registry: CollectorRegistry = REGISTRY) -> ConnguardCollector:
    """Add the collector to ``registry`` (default: prometheus_client's) and return it; a
    second call for the same registry returns the first collector (every series once)."""
    collector = _registered.get(id(registry))
    if collector is None:
        collector = _registered[id(registry)] = ConnguardCollector()
        registry.register(collector)
    return collector
