"""What a benchmark run leaves behind: ``results.json``, ``report.md``, PNG charts, a summary.

Everything here works from the results *document* (the dict written to ``results.json``, see
docs/bench.md), so a report and its charts can be rebuilt from a saved run:
``python -m benchmarks.report DIR`` rewrites ``DIR/report.md`` and the charts from
``DIR/results.json``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.common import NO_FAILURES, ScenarioResult, is_connguard, machine

SCHEMA_VERSION = 1

#: The shape of ``results.json``: required keys and their JSON types, checked by
#: :func:`validate`. docs/bench.md describes every field.
MEASUREMENT_KEYS = {"client": str, "unit": str, "median": (int, float), "min": (int, float),
                    "max": (int, float), "rounds": list, "ratio": (int, float, type(None))}
SCENARIO_KEYS = {"name": str, "group": str, "description": str, "higher_is_better": bool,
                 "skipped": bool, "notes": list, "params": dict,
                 "best_alternative": (str, type(None)), "measurements": list,
                 "series": (dict, type(None))}
RUN_KEYS = {"name": str, "title": str, "status": str, "seconds": (int, float), "note": str}
DOCUMENT_KEYS = {"schema_version": int, "tool": str, "machine": dict, "server": dict,
                 "quick": bool, "started_utc": str, "wall_seconds": (int, float),
                 "runs": list, "scenarios": list, "charts": list}
MACHINE_KEYS = {"python": str, "platform": str, "cpus": (int, type(None)), "cpu_model": str,
                "pymysql": str, "date": str}
RUN_STATUSES = ("ok", "skipped", "failed")


def results_document(results: Sequence[ScenarioResult], server_version: str,
                     **fields: Any) -> Dict[str, Any]:
    """The ``results.json`` document for ``results`` (``fields`` fill in the run's details)."""
    doc: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "tool": "connguard bench", "machine": machine(),
        "server": {"version": server_version, "source": "", "address": ""},
        "quick": False, "started_utc": "", "wall_seconds": 0.0, "runs": [],
        "scenarios": [r.as_dict() for r in results], "charts": []}
    doc.update(fields)
    return doc


def validate(doc: Any) -> List[str]:
    """Problems with a ``results.json`` document against the schema; empty when it conforms."""
    problems: List[str] = []

    def check(obj: Any, keys: Dict[str, Any], where: str) -> bool:
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected an object, got {type(obj).__name__}")
            return False
        for key, kind in keys.items():
            if key not in obj:
                problems.append(f"{where}: missing {key!r}")
            elif not isinstance(obj[key], kind) or (kind is not bool and isinstance(
                    obj[key], bool) and bool not in _as_tuple(kind)):
                problems.append(f"{where}.{key}: unexpected type {type(obj[key]).__name__}")
        return True

    if not check(doc, DOCUMENT_KEYS, "document"):
        return problems
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"document.schema_version: expected {SCHEMA_VERSION}")
    check(doc.get("machine"), MACHINE_KEYS, "machine")
    check(doc.get("server"), {"version": str, "source": str, "address": str}, "server")
    for i, run in enumerate(doc.get("runs") or []):
        if check(run, RUN_KEYS, f"runs[{i}]") and run.get("status") not in RUN_STATUSES:
            problems.append(f"runs[{i}].status: {run.get('status')!r} not in {RUN_STATUSES}")
    for i, scenario in enumerate(doc.get("scenarios") or []):
        if not check(scenario, SCENARIO_KEYS, f"scenarios[{i}]"):
            continue
        for j, m in enumerate(scenario.get("measurements") or []):
            where = f"scenarios[{i}].measurements[{j}]"
            if check(m, MEASUREMENT_KEYS, where) and isinstance(m.get("rounds"), list):
                if not m["rounds"] or not all(isinstance(v, (int, float)) for v in m["rounds"]):
                    problems.append(f"{where}.rounds: expected a non-empty list of numbers")
                elif isinstance(m.get("median"), (int, float)) and not (
                        min(m["rounds"]) <= m["median"] <= max(m["rounds"])):
                    problems.append(f"{where}: median outside [min, max]")
    for i, chart in enumerate(doc.get("charts") or []):
        if not isinstance(chart, str):
            problems.append(f"charts[{i}]: expected a file name")
    return problems


def _as_tuple(kind: Any) -> Tuple[Any, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# --- numbers -------------------------------------------------------------------------------------


def num(value: Optional[float]) -> str:
    """A figure for a table: thousands separators, about three significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):  # counts are whole: "3 errors", not "3.00"
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    if value == 0:
        return "0"
    if magnitude >= 0.01:
        return f"{value:.2f}"
    digits = min(9, 1 - math.floor(math.log10(magnitude)))  # two significant digits, no e-05
    return f"{value:.{digits}f}"


#: Scenarios that compare connguard with itself (a feature on and off): no ratio shown.
INTERNAL_PREFIXES = ("guard:",)


def _factor(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}×"
    if value >= 10:
        return f"{value:.0f}×"
    return f"{value:.1f}×"


def verdict_text(ours: Optional[float], best: Optional[float], higher_is_better: bool) -> str:
    """connguard against the best alternative in one direction: "3.1× better", "1.3× worse",
    "same", or "better (0 vs 1,277)" when a zero makes a ratio meaningless."""
    if ours is None or best is None or any(math.isnan(v) or math.isinf(v)
                                            for v in (ours, best)):
        return "—"
    if ours == best:
        return "same"
    ours_better = ours > best if higher_is_better else ours < best
    if ours == 0 or best == 0:
        return f"{'better' if ours_better else 'worse'} ({num(ours)} vs {num(best)})"
    factor = max(ours, best) / min(ours, best)
    if factor < 1.05:
        return "about the same"
    return f"{_factor(factor)} {'better' if ours_better else 'worse'}"


# --- summary -------------------------------------------------------------------------------------


def summary_rows(doc: Dict[str, Any]) -> List[Tuple[str, str, str, str, str]]:
    """(scenario, unit and direction, connguard, best alternative, connguard vs it)."""
    rows = []
    for s in doc["scenarios"]:
        if s["skipped"]:
            continue
        ms = {m["client"]: m for m in s["measurements"]}
        ours = next((m for m in s["measurements"] if is_connguard(m["client"])), None)
        best = ms.get(s["best_alternative"] or "")
        direction = "higher is better" if s["higher_is_better"] else "lower is better"
        never = _never_failed(s)
        if ours is None and never and best is not None:
            rows.append((s["name"], f"{best['unit']}, {direction}", f"no failed calls ({never})",
                         f"{num(best['median'])} ({best['client']})", "better (none failed)"))
            continue
        if ours is None or best is None:
            continue
        verdict = ("— (connguard vs itself)" if s["name"].startswith(INTERNAL_PREFIXES) else
                   verdict_text(ours["median"], best["median"], s["higher_is_better"]))
        rows.append((s["name"], f"{ours['unit']}, {direction}",
                     f"{num(ours['median'])} ({ours['client']})",
                     f"{num(best['median'])} ({best['client']})", verdict))
    return rows


def _never_failed(scenario: Dict[str, Any]) -> Optional[str]:
    """The connguard client a failure-latency scenario left out for having no failed call."""
    for note in scenario["notes"]:
        if note.startswith(NO_FAILURES):
            ours = [c for c in note[len(NO_FAILURES):].split(", ") if is_connguard(c)]
            if ours:
                return ours[0]
    return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Optional[Sequence[str]] = None) -> List[str]:
    """A Markdown table whose columns also line up in a terminal."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = align or ["l"] * len(header)
    rule = ["-" * max(3, w - 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)]
    out = []
    for row in [cells[0], rule] + cells[1:]:
        parts = [c.rjust(w) if a == "r" and row is not rule else c.ljust(w)
                 for c, w, a in zip(row, widths, align)]
        out.append("| " + " | ".join(parts) + " |")
    return out


def machine_line(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    memory = f", {m['memory_gib']:g} GiB" if m.get("memory_gib") else ""
    load = (f", load average {m['load_avg_1m']:g} at the end"
            if m.get("load_avg_1m") is not None else "")
    versions = ", ".join(f"{name} {m[key]}" for key, name in (
        ("pymysql", "PyMySQL"), ("sqlalchemy", "SQLAlchemy"), ("dbutils", "DBUtils"),
        ("connguard", "connguard")) if m.get(key))
    return (f"{m['date']}: {m.get('cpus')} CPUs ({m.get('cpu_model') or 'unknown CPU'}"
            f"{memory}{load}), {m['platform']}, Python {m['python']}, {versions}; server "
            f"{doc['server']['version']} ({doc['server']['source'] or 'given'})")


def summary(doc: Dict[str, Any]) -> str:
    """The at-a-glance table printed at the end of a run (Markdown)."""
    lines = [machine_line(doc), ""]
    rows = summary_rows(doc)
    if rows:
        lines += markdown_table(("scenario", "unit", "connguard", "best alternative",
                                 "connguard vs best"), rows, ("l", "l", "r", "r", "r"))
    else:
        lines.append("(no scenario compared connguard with an alternative)")
    for run in doc["runs"]:
        if run["status"] != "ok":
            lines.append(f"- {run['name']}: {run['status']}: {run['note']}")
    mode = "--quick" if doc["quick"] else "full"
    lines += ["", f"{mode} run, {doc['wall_seconds']:.0f} s wall time; medians over rounds "
              "(min/max and every round in the report)."]
    return "\n".join(lines)


# --- report.md -----------------------------------------------------------------------------------

CHART_TITLES = {"outage.png": "Connect attempts and errors through an outage",
                "saturation.png": "Throughput under saturation",
                "census.png": "Census cost vs sockets"}


def markdown(doc: Dict[str, Any]) -> str:
    lines = ["# connguard bench", "", machine_line(doc), "",
             f"Started {doc['started_utc']}, {doc['wall_seconds']:.0f} s wall time"
             f"{' (--quick)' if doc['quick'] else ''}. Every figure is the median over rounds "
             "(min and max beside it); the ratio is against the best client that is not "
             "connguard's. Server: " + (doc["server"].get("address") or "—") + ".", "",
             "## Summary", ""]
    lines += markdown_table(("scenario", "unit", "connguard", "best alternative",
                             "connguard vs best"), summary_rows(doc), ("l", "l", "r", "r", "r"))
    for chart in doc["charts"]:
        lines += ["", f"![{CHART_TITLES.get(chart, chart)}]({chart})"]
    lines += ["", "## Scenarios", ""]
    for run in doc["runs"]:
        if run["status"] != "ok":
            lines.append(f"- **{run['name']}** {run['status']}: {run['note']}")
    if any(run["status"] != "ok" for run in doc["runs"]):
        lines.append("")
    for s in doc["scenarios"]:
        lines += [f"### {s['name']}", "", s["description"], ""]
        if s["measurements"]:
            rows = [(m["client"], f"{num(m['median'])} {m['unit']}", num(m["min"]),
                     num(m["max"]), str(len(m["rounds"])), _versus_best(s, m))
                    for m in s["measurements"]]
            lines += markdown_table(("client", "median", "min", "max", "rounds",
                                     "vs best alternative"), rows,
                                    ("l", "r", "r", "r", "r", "r"))
            lines.append("")
        lines += [f"- {n}" for n in s["notes"]]
        if s["notes"]:
            lines.append("")
    return "\n".join(lines)


def _versus_best(scenario: Dict[str, Any], m: Dict[str, Any]) -> str:
    """One client against the best alternative, in the summary's words ("3.1× better");
    nothing for the best alternative itself and for connguard-vs-connguard scenarios."""
    best = scenario.get("best_alternative")
    if best is None or best == m["client"] or scenario["name"].startswith(INTERNAL_PREFIXES):
        return "—"
    medians = {x["client"]: x["median"] for x in scenario["measurements"]}
    return verdict_text(m["median"], medians.get(best), scenario["higher_is_better"])


def write_results(results: Sequence[ScenarioResult], out_dir: str, server_version: str) -> str:
    """results.json, report.md and charts for ``results``; returns the Markdown. For the
    per-module ``main()`` entry points; ``connguard bench`` goes through
    :func:`benchmarks.runner.run`."""
    return write_all(results_document(results, server_version), out_dir)


def write_all(doc: Dict[str, Any], out_dir: str) -> str:
    """Write the charts (when matplotlib is importable), results.json and report.md."""
    os.makedirs(out_dir, exist_ok=True)
    doc["charts"] = write_charts(doc, out_dir)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    text = markdown(doc)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


# --- charts --------------------------------------------------------------------------------------

PALETTE = {"connguard": "#1b7f3b", "pymysql": "#b23a48", "QueuePool pre_ping": "#3d5a98",
           "QueuePool": "#7aa6d8", "DBUtils": "#d99a2b"}


def _color(client: str) -> Optional[str]:
    for key, color in PALETTE.items():
        if key in client:
            return color
    return None


def write_charts(doc: Dict[str, Any], out_dir: str) -> List[str]:
    """PNG charts for the scenarios present; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, draw in (("outage.png", _outage_chart), ("saturation.png", _saturation_chart),
                       ("census.png", _census_chart)):
        fig = draw(plt, doc)
        if fig is None:
            continue
        fig.savefig(os.path.join(out_dir, name), dpi=80)
        plt.close(fig)
        written.append(name)
    return written


def _scenario(doc: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    return next((s for s in doc["scenarios"] if s["name"] == name and not s["skipped"]), None)


def _outage_chart(plt: Any, doc: Dict[str, Any]) -> Any:
    s = _scenario(doc, "outage: connect attempts")
    series = (s or {}).get("series") or {}
    clients = series.get("clients") or {}
    if not clients:
        return None
    width = float(series.get("bucket_s", 0.1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    # Each client had its round: one marker for all, the median moment the server was up.
    stop = statistics.median(data["stop"] for data in clients.values())
    ready = statistics.median(data["ready"] for data in clients.values())
    for client, data in clients.items():
        color = _color(client)
        for axis, key in ((top, "attempts"), (bottom, "errors")):
            xs = [i * width for i in range(len(data[key]))]
            axis.step(xs, data[key], where="post", label=client if axis is top else None,
                      color=color, linewidth=2.2 if is_connguard(client) else 1.2)
    for axis in (top, bottom):
        axis.axvspan(stop, ready, color="#999999", alpha=0.2, lw=0)
        axis.axvline(ready, color="#555555", linestyle=":", linewidth=1.2)
        axis.set_yscale("symlog", linthresh=1)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    top.set_ylabel(f"connect attempts\nper {width * 1000:.0f} ms")
    bottom.set_ylabel(f"failed calls\nper {width * 1000:.0f} ms")
    bottom.set_xlabel("seconds (grey: the server is down; dotted: it accepts connections "
                      "again, median of the clients' rounds)")
    params = (s or {}).get("params") or {}
    fig.suptitle(f"Outage: {params.get('threads', '?')} threads, pools of "
                 f"{params.get('pool_size', '?')}, server stopped for "
                 f"{params.get('outage_s', '?')} s then restarted", fontsize=10)
    fig.legend(fontsize=8, loc="lower center", ncol=3, frameon=False)  # outside the lines
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def _saturation_chart(plt: Any, doc: Dict[str, Any]) -> Any:
    s = _scenario(doc, "saturation: throughput")
    if s is None:
        return None
    errors = _scenario(doc, "saturation: application errors")
    err = {m["client"]: m["median"] for m in (errors or {}).get("measurements", [])}
    ms = s["measurements"]
    fig, axis = plt.subplots(figsize=(9, 4))
    names = [m["client"] for m in ms]
    medians = [m["median"] for m in ms]
    spans = [[m["median"] - m["min"] for m in ms], [m["max"] - m["median"] for m in ms]]
    bars = axis.barh(names, medians, xerr=spans, color=[_color(n) or "#888888" for n in names])
    for bar, name in zip(bars, names):
        label = f" {num(bar.get_width())}/s"
        if name in err:
            label += f", {num(err[name])} errors"
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center",
                  fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("successful calls per second (median, min-max)")
    params = s.get("params") or {}
    axis.set_title(f"Saturation: {params.get('threads', '?')} threads, server "
                   f"max_connections {params.get('max_connections', '?')}, pools allowed "
                   f"{params.get('pool_size', '?')}", fontsize=10)
    axis.set_xlim(0, max(medians + [1]) * 1.45)
    fig.tight_layout()
    return fig


def _census_chart(plt: Any, doc: Dict[str, Any]) -> Any:
    points: Dict[str, List[Tuple[int, float, float, float]]] = {}
    for s in doc["scenarios"]:
        sockets = (s.get("params") or {}).get("sockets")
        if s["skipped"] or not s["name"].startswith("census") or not sockets:
            continue
        for m in s["measurements"]:
            points.setdefault(m["client"], []).append((sockets, m["median"], m["min"],
                                                       m["max"]))
    if not points:
        return None
    fig, axis = plt.subplots(figsize=(7, 4))
    for client, values in points.items():
        values.sort()
        xs = [v[0] for v in values]
        axis.errorbar(xs, [v[1] for v in values],
                      yerr=[[v[1] - v[2] for v in values], [v[3] - v[1] for v in values]],
                      marker="o", capsize=3, label=client)
    axis.set_yscale("log")
    axis.set_title("Socket census: cost of one count against the sockets toward the server",
                   fontsize=10)
    axis.set_xlabel("sockets toward the destination")
    axis.set_ylabel("ms per count (median, min-max)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report DIR  (rebuilds DIR/report.md and charts)",
              file=sys.stderr)
        return 2
    with open(os.path.join(args[0], "results.json")) as f:
        doc = json.load(f)
    problems = validate(doc)
    if problems:
        print("results.json does not match the schema:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    write_all(doc, args[0])
    print(summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
