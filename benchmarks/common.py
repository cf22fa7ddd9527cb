"""What every scenario shares: the server, the clients under comparison, timing and reporting."""

from __future__ import annotations

import json
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
    name: str
    description: str
    higher_is_better: bool
    measurements: List[Measurement]
    notes: List[str] = field(default_factory=list)

    def ratios(self, baseline: Optional[str] = None) -> Dict[str, float]:
        """Each client's median relative to ``baseline`` (default: the best alternative)."""
        medians = {m.client: m.median for m in self.measurements}
        if baseline is None:
            others = [v for k, v in medians.items() if not k.startswith("connguard")]
            pick = max if self.higher_is_better else min
            base = pick(others) if others else 1.0
        else:
            base = medians[baseline]
        return {k: (v / base if base else float("nan")) for k, v in medians.items()}

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "higher_is_better": self.higher_is_better, "notes": self.notes,
                "measurements": [m.as_dict() for m in self.measurements]}


def time_per_op(op: Callable[[], Any], ops: int) -> float:
    """Microseconds per call of ``op`` over ``ops`` calls (one round)."""
    began = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - began) / ops * 1e6


def machine() -> Dict[str, Any]:
    """A description of where the numbers came from."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": model, "pymysql": pymysql.__version__,
            "date": time.strftime("%Y-%m-%d")}


def write_report(results: List[ScenarioResult], out_dir: str, server_version: str) -> str:
    """results.json plus a Markdown table; returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {"machine": machine(), "server": server_version,
           "scenarios": [r.as_dict() for r in results]}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
    lines = [f"Machine: {doc['machine']['cpus']} CPUs, {doc['machine']['cpu_model']}, "
             f"Python {doc['machine']['python']}, PyMySQL {doc['machine']['pymysql']}, "
             f"server {server_version}, {doc['machine']['date']}", ""]
    for r in results:
        ratios = r.ratios()
        lines += [f"### {r.name}", "", r.description, "",
                  "| client | median | min | max | ratio vs best alternative |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for m in r.measurements:
            lines.append(f"| {m.client} | {m.median:,.1f} {m.unit} | {min(m.rounds):,.1f} | "
                         f"{max(m.rounds):,.1f} | {ratios[m.client]:.3f}× |")
        lines += [f"- {n}" for n in r.notes] + [""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text
