"""What every scenario shares: the server, the clients under comparison, timing and reporting."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pymysql


@dataclass
class Measurement:
    """One client in one scenario: a value per round (lower or higher is better per unit)."""

    client: str
    unit: str
    rounds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def as_dict(self) -> Dict[str, Any]:
        return {"client": self.client, "unit": self.unit, "median": self.median,
                "min": min(self.rounds), "max": max(self.rounds), "rounds": self.rounds}


@dataclass
class ScenarioResult:
    """One metric of one scenario, every client side by side.

    ``group`` names the registry scenario that produced it (``outage``, ``census``, ...; the
    runner fills it in); ``params`` holds the sizes that shaped it (sockets, threads, ...);
    ``series`` optional raw data for a chart (see docs/bench.md). No measurements means the
    scenario was skipped: the notes say why.
    """

    name: str
    description: str
    higher_is_better: bool
    measurements: List[Measurement]
    notes: List[str] = field(default_factory=list)
    group: str = ""
    params: Dict[str, Any] = field(default_factory=dict)
    series: Optional[Dict[str, Any]] = None

    @property
    def skipped(self) -> bool:
        return not self.measurements

    def best_alternative(self) -> Optional[str]:
        """The best client that is not connguard's, or None if every client is connguard's."""
        others = [m for m in self.measurements if not is_connguard(m.client)]
        if not others:
            return None
        pick = max if self.higher_is_better else min
        return pick(others, key=lambda m: m.median).client

    def ratios(self, baseline: Optional[str] = None) -> Dict[str, float]:
        """Each client's median relative to ``baseline`` (default: the best alternative; the
        best client overall when every client is connguard's)."""
        medians = {m.client: m.median for m in self.measurements}
        if not medians:
            return {}
        if baseline is None:
            baseline = self.best_alternative()
        if baseline is None:
            pick = max if self.higher_is_better else min
            base = pick(medians.values())
        else:
            base = medians[baseline]
        return {k: (v / base if base else float("nan")) for k, v in medians.items()}

    def as_dict(self) -> Dict[str, Any]:
        ratios = self.ratios()
        return {"name": self.name, "group": self.group, "description": self.description,
                "higher_is_better": self.higher_is_better, "skipped": self.skipped,
                "notes": self.notes, "params": self.params,
                "best_alternative": self.best_alternative(),
                "measurements": [dict(m.as_dict(), ratio=_finite(ratios[m.client]))
                                 for m in self.measurements],
                "series": self.series}


NO_FAILURES = "no failed calls, so no failure latency: "


def failure_latency(result: ScenarioResult) -> ScenarioResult:
    """A failure-latency scenario: a client none of whose calls failed has no latency to
    show (a 0 would read as "fastest to fail"): it is left out and named in a note."""
    none = [m.client for m in result.measurements
            if m.rounds and all(r == 0 for r in m.rounds)]
    if none:
        result.measurements = [m for m in result.measurements if m.client not in none]
        result.notes.append(NO_FAILURES + ", ".join(none))
    return result


def is_connguard(client: str) -> bool:
    """Whether a client name stands for connguard (its pool, drop-in, plugin or census)."""
    return client.startswith("connguard")


def _finite(value: float) -> Optional[float]:
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def time_per_op(op: Callable[[], Any], ops: int) -> float:
    """Microseconds per call of ``op`` over ``ops`` calls (one round)."""
    began = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - began) / ops * 1e6


def machine() -> Dict[str, Any]:
    """A description of where the numbers came from (no host name, no user)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    memory_gib: Optional[float] = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    load: Optional[float] = None
    with contextlib.suppress(OSError, AttributeError):
        load = round(os.getloadavg()[0], 2)
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": model, "memory_gib": memory_gib,
            "load_avg_1m": load,
            "pymysql": _version("PyMySQL") or pymysql.VERSION_STRING,
            "sqlalchemy": _version("sqlalchemy"),
            "dbutils": _version("DBUtils"), "connguard": _version("connguard"),
            "date": time.strftime("%Y-%m-%d"),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def alternate(rounds: int, clients: Dict[str, Callable[[], float]], unit: str
              ) -> List[Measurement]:
    """Run each client once per round, in turn, for ``rounds`` rounds: a noisy neighbour
    then hurts every client alike, and each gets a value per round."""
    results = {name: Measurement(name, unit) for name in clients}
    for _ in range(rounds):
        for name, run in clients.items():
            results[name].rounds.append(run())
    return list(results.values())
