"""CPU cost per operation in instructions, under ``valgrind --tool=callgrind``.

Timings on a loaded 2-core machine swing by tens of percent; instruction counts do not.
Each scenario runs in a child process under callgrind twice, with two loop lengths; the
difference of the two totals divided by the difference of the lengths is the cost of one
operation, with start-up, imports and set-up cancelled out.

One layout of the same code can cost several percent more than another: CPython's method
cache (4,096 slots, indexed by a type's version tag and the attribute name) gives each type
its tag when first looked up, so any change that creates or looks up one type more shifts
which lookups of the hot loop collide and miss. Measured: tagging 0 to 101 throwaway types
before the scenario moves an unchanged plugin engine checkout between 144.4k and 152.3k
instructions. So each scenario is measured under ``--shifts`` such layouts (0, 5, 13, 37,
101, ... throwaway types tagged first: spread, since neighbouring shifts tend to keep the
same collisions) and the median is reported, with the range. Differences smaller than the
range are not shown by this bench.

    python -m benchmarks.instructions [--dsn mysql://user@host:port/db] [--out DIR]
                                      [--shifts N]

Without ``--dsn`` a throwaway MariaDB is started (``mariadbd`` on PATH). The password comes
from ``MYSQL_PWD`` (never the command line). Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

SHORT, LONG = 200, 1200  # loop lengths: the difference, 1,000 operations, is what is measured
SHIFTS = 5  # method-cache layouts per scenario (see the module docstring): the median counts
#: How many throwaway types each layout tags first (the first ``--shifts`` of these).
LAYOUTS = (0, 5, 13, 37, 101, 211, 401, 809)

# The child's first lines: ``shift`` throwaway types get their version tags before anything
# else is imported, then the module runs as the child.
_SHIFTED_CHILD = (
    "import sys\n"
    "kept = [type(f'_Shift{i}', (), {'x': i}) for i in range(int(sys.argv[1]))]\n"
    "[t.x for t in kept]\n"
    "sys.argv = ['instructions'] + sys.argv[2:]\n"
    "import runpy\n"
    "runpy.run_module('benchmarks.instructions', run_name='__main__', alter_sys=True)\n")

# Scenario -> (what it measures, the scenario it is compared with, the target ratio).
SCENARIOS: Dict[str, Tuple[str, Optional[str], Optional[float]]] = {
    "connguard checkout+return": ("Pool.connect() + close()", "QueuePool checkout+return", 0.3),
    "QueuePool checkout+return": ("SQLAlchemy QueuePool connect() + close(), no pre-ping",
                                  None, None),
    "QueuePool pre_ping checkout+return": ("the same with pool_pre_ping", None, None),
    "connguard checkout+SELECT 1+return": ("Pool.connect(), cursor SELECT 1, fetch, close()",
                                           "pymysql SELECT 1 held", 1.3),
    "pymysql SELECT 1 held": ("a held PyMySQL connection: cursor SELECT 1, fetch", None, None),
    "plugin engine checkout": ("engine.connect() + close() with plugins=['connguard']",
                               "engine checkout", 1.1),
    "engine checkout": ("engine.connect() + close(), plain QueuePool, no pre-ping", None, None),
    "plugin engine checkout (mysqlclient)": ("the same on mysql+mysqldb with the plugin",
                                             "engine checkout pre_ping (mysqlclient)", None),
    "engine checkout pre_ping (mysqlclient)": ("engine.connect() + close() on mysql+mysqldb "
                                               "with pool_pre_ping", None, None),
}


# -- the operations (run in the child) -------------------------------------------------------
def _select_one(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchall()


def _engine(kwargs: Dict[str, Any], plugin: bool, pre_ping: bool = False,
            driver: str = "pymysql") -> Any:
    import pymysql
    import sqlalchemy

    url = sqlalchemy.engine.URL.create(
        f"mysql+{driver}", username=kwargs["user"], password=kwargs["password"],
        host=kwargs["host"], port=kwargs["port"], database=kwargs["database"])
    extra: Dict[str, Any] = {"plugins": ["connguard"]} if plugin else {} if (
        driver != "pymysql") else {"creator": lambda: pymysql.connect(**kwargs)}
    return sqlalchemy.create_engine(url, pool_size=2, pool_pre_ping=pre_ping, **extra)


def operation(name: str, kwargs: Dict[str, Any]) -> Callable[[], None]:
    """One operation of scenario ``name``, set up and warmed (the connection opened)."""
    import pymysql

    import connguard

    if name.startswith("connguard"):
        pool = connguard.Pool(**kwargs, max_size=2)

        def checkout() -> None:
            conn = pool.connect()
            if "SELECT" in name:
                _select_one(conn)
            conn.close()
        op = checkout
    elif name.startswith("QueuePool"):
        engine = _engine(kwargs, plugin=False, pre_ping="pre_ping" in name)
        op = lambda: engine.pool.connect().close()  # noqa: E731
    elif name == "pymysql SELECT 1 held":
        held = pymysql.connect(**kwargs)
        op = lambda: _select_one(held)  # noqa: E731
    else:
        engine = _engine(kwargs, plugin=name.startswith("plugin"), pre_ping="pre_ping" in name,
                         driver="mysqldb" if "mysqlclient" in name else "pymysql")
        op = lambda: engine.connect().close()  # noqa: E731
    for _ in range(50):
        op()
    return op


def child(name: str, loops: int) -> None:
    kwargs = json.loads(os.environ["CONNGUARD_BENCH_KWARGS"])
    kwargs["password"] = os.environ.get("MYSQL_PWD", "")
    op = operation(name, kwargs)
    for _ in range(loops):
        op()


# -- the parent: callgrind runs and arithmetic -----------------------------------------------
def instructions(name: str, loops: int, env: Dict[str, str], workdir: str,
                 shift: int = 0) -> int:
    """Total instructions (Ir) of a child running ``loops`` operations of ``name``, with
    ``shift`` throwaway types tagged first."""
    out = os.path.join(workdir, f"callgrind.{abs(hash((name, loops, shift)))}.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, "-c", _SHIFTED_CHILD, str(shift), "--child", name, str(loops)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({loops} loops) failed:\n{proc.stderr[-2000:]}")
    match = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output for {name}")
    return int(match.group(1))


def per_operation(name: str, env: Dict[str, str], workdir: str, shift: int = 0) -> float:
    short = instructions(name, SHORT, env, workdir, shift)
    long = instructions(name, LONG, env, workdir, shift)
    return (long - short) / (LONG - SHORT)


def measure(kwargs: Dict[str, Any], password: str, names: List[str],
            shifts: int = SHIFTS) -> Dict[str, List[float]]:
    """Per scenario: the cost of one operation under each of ``shifts`` layouts."""
    env = dict(os.environ, CONNGUARD_BENCH_KWARGS=json.dumps(kwargs), MYSQL_PWD=password,
               PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory(prefix="connguard-callgrind-") as workdir:
        return {name: [per_operation(name, env, workdir, shift)
                       for shift in LAYOUTS[:shifts]] for name in names}


def table(runs: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    """A row per scenario: the median over the layouts, the range, the ratio of medians."""
    costs = {name: statistics.median(each) for name, each in runs.items()}
    rows = []
    for name, (what, baseline, target) in SCENARIOS.items():
        if name not in costs:
            continue
        ratio = costs[name] / costs[baseline] if baseline in costs else None
        rows.append({"scenario": name, "what": what, "instructions": round(costs[name]),
                     "range": [round(min(runs[name])), round(max(runs[name]))],
                     "compared_with": baseline, "ratio": ratio, "target": target,
                     "met": None if ratio is None or target is None else ratio <= target})
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"{'scenario':40} {'instr/op':>10} {'range':>17}  {'ratio':>6}  target")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}x"
        low, high = row["range"]
        target = "" if row["target"] is None else (
            f"<= {row['target']}x vs {row['compared_with']}: "
            f"{'met' if row['met'] else 'MISSED'}")
        print(f"{row['scenario']:40} {row['instructions']:>10,} {low:>8,}-{high:<8,}  "
              f"{ratio:>6}  {target}")


# -- the server ------------------------------------------------------------------------------
def _from_dsn(dsn: str) -> Tuple[Dict[str, Any], str]:
    parts = urlsplit(dsn)
    if parts.scheme != "mysql" or not parts.hostname:
        raise SystemExit("--dsn must look like mysql://user@host:port/database")
    kwargs = {"host": parts.hostname, "port": parts.port or 3306, "user": parts.username or "",
              "database": parts.path.lstrip("/") or None}
    return kwargs, os.environ.get("MYSQL_PWD", "")


@contextlib.contextmanager
def _throwaway_server() -> Iterator[Tuple[Dict[str, Any], str]]:
    from testsupport.servers import APP_PASSWORD, MariaDB, Template

    root = tempfile.mkdtemp(prefix="connguard-callgrind-server-")
    os.chmod(root, 0o755)
    server = None
    try:
        template = Template(root)
        template.build()
        server = MariaDB(template, {}).start()
        kwargs = server.connect_kwargs()
        kwargs.pop("password")
        yield kwargs, APP_PASSWORD
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="mysql://user@host:port/db (password from MYSQL_PWD)")
    parser.add_argument("--out", help="directory for instructions.json")
    parser.add_argument("--shifts", type=int, default=SHIFTS,
                        help=f"method-cache layouts per scenario, the median reported "
                             f"(default {SHIFTS}, at most {len(LAYOUTS)})")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="only these (repeatable); default all")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "LOOPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.shifts <= len(LAYOUTS):
        parser.error(f"--shifts must be a whole number from 1 to {len(LAYOUTS)}, "
                     f"got {args.shifts}")
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    names = args.scenario or list(SCENARIOS)
    if args.dsn:
        costs = measure(*_from_dsn(args.dsn), names, args.shifts)
    else:
        with _throwaway_server() as (kwargs, password):
            costs = measure(kwargs, password, names, args.shifts)
    rows = table(costs)
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "instructions.json"), "w") as f:
            json.dump({"short": SHORT, "long": LONG, "shifts": args.shifts, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
