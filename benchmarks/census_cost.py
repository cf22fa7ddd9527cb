"""What the OS resource guard costs: the socket census, and the guard on the connect path.

* **census at 10k / 30k sockets**: every socket toward one destination counted by state, with
  connguard's netlink dump, its /proc parser and ``psutil.net_connections``.  The sockets live
  in a private network namespace (``unshare -n``, needs root) so the host's own sockets do not
  blur the numbers.  The fd hard limit may be ~20 000, so most of the count is TIME_WAIT
  sockets, which hold no descriptor; they last 60 s, so the child measures right after
  making them and reports whether the count held still.
* **guard: cold connect / checkout / preflight**: a pool with the guard on against the same
  pool with ``resource_guard=False``.

``run_all(kwargs, quick)`` returns the scenarios (kwargs: a server's ``pymysql.connect``
arguments).  ``python -m benchmarks.census_cost [--quick]`` runs only the census part.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import connguard
from benchmarks.common import Measurement, ScenarioResult, alternate, time_per_op
from connguard import driver
from connguard.arguments import POOL_OPTIONS
from connguard.census import census
from connguard.connector import Connector
from connguard.guard import ResourceGuard

# The checkout (benchmarks/ beside connguard/ and testsupport/): the child's path.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "@@CENSUS-COST@@"
NETLINK, PROC, PSUTIL = "connguard census (netlink)", "connguard census (/proc)", \
    "psutil.net_connections"
# Rate limiting of new connections (another feature) would dominate the cold-connect timing.
NO_STORM: Dict[str, Any] = {"storm_control": False} if "storm_control" in POOL_OPTIONS else {}


# --- inside the namespace -----------------------------------------------------------------------


def _setup_namespace() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as handle:
        handle.write("1024 65535")  # 64 512 ports toward one destination
    with open("/proc/sys/net/ipv4/tcp_tw_reuse", "w") as handle:
        handle.write("0")  # else loopback connects recycle our TIME_WAIT sockets after 1 s
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pair(listener: socket.socket, port: int) -> Tuple[socket.socket, socket.socket]:
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    return client, server


def make_sockets(listener: socket.socket, established: int, time_wait: int
                 ) -> List[socket.socket]:
    """``established`` open pairs and ``time_wait`` client sockets in TIME_WAIT."""
    port = listener.getsockname()[1]
    held: List[socket.socket] = []
    for _ in range(established):
        held.extend(_pair(listener, port))
    for _ in range(time_wait):
        client, server = _pair(listener, port)
        client.close()  # we close first: the client side keeps the TIME_WAIT
        server.recv(1)
        server.close()
    return held


def _psutil_count(port: int) -> Optional[Dict[str, int]]:
    try:
        import psutil
    except ImportError:
        return None
    found = Counter(c.status.lower() for c in
                    psutil.net_connections(kind="tcp") if c.raddr and c.raddr.port == port)
    return dict(found)


def _timed(call: Callable[[], Any]) -> Tuple[float, Any]:
    began = time.perf_counter()
    result = call()
    return (time.perf_counter() - began) * 1e3, result


def _nonzero(counts: Optional[Dict[str, int]]) -> Optional[Dict[str, int]]:
    return None if counts is None else {k: v for k, v in counts.items() if v}


def measure_in_namespace(total: int, established: int, rounds: int) -> Dict[str, Any]:
    """Make ``total`` sockets toward one listener; time each counter ``rounds`` times."""
    _setup_namespace()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        port = listener.getsockname()[1]
        made_at = time.monotonic()
        held = make_sockets(listener, established, total - established)
        try:
            before = _nonzero(census("127.0.0.1", port, impl="netlink"))
            timings: Dict[str, List[float]] = {NETLINK: [], PROC: [], PSUTIL: []}
            seen: Dict[str, Any] = {}
            counters: Dict[str, Callable[[], Any]] = {
                NETLINK: lambda: census("127.0.0.1", port, impl="netlink"),
                PROC: lambda: census("127.0.0.1", port, impl="proc"),
                PSUTIL: lambda: _psutil_count(port),
            }
            for _ in range(rounds):
                for name, counter in counters.items():
                    ms, result = _timed(counter)
                    if result is None:
                        continue
                    timings[name].append(ms)
                    seen[name] = _nonzero(result)
            after = _nonzero(census("127.0.0.1", port, impl="netlink"))
        finally:
            for sock in held:
                sock.close()
    return {"timings": timings, "seen": seen, "before": before, "after": after,
            "seconds": time.monotonic() - made_at}


def _child() -> None:
    spec = json.loads(sys.stdin.read())
    result = measure_in_namespace(spec["total"], spec["established"], spec["rounds"])
    print(MARKER + json.dumps(result), flush=True)


# --- from the benchmark run ---------------------------------------------------------------------


def _run_child(total: int, established: int, rounds: int) -> Dict[str, Any]:
    spec = {"total": total, "established": established, "rounds": rounds}
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["unshare", "-n", "--", sys.executable, "-m",
                           "benchmarks.census_cost", "--child"], input=json.dumps(spec),
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return dict(json.loads(line[len(MARKER):]))
    raise RuntimeError(f"census benchmark child failed ({proc.returncode}): "
                       f"{proc.stderr[-2000:]}")


def census_scenario(total: int, rounds: int) -> ScenarioResult:
    established = min(5000, total // 2)  # 2 fds each; the rest TIME_WAIT (no fd)
    title = f"census {total // 1000}k sockets"
    description = (f"Count the sockets toward one destination by state: {established:,} "
                   f"ESTABLISHED + {total - established:,} TIME_WAIT, in a private network "
                   "namespace (ms per count).")
    try:
        result = _run_child(total, established, rounds)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return ScenarioResult(title, description, False, [], notes=[f"skipped: {exc}"],
                              params={"sockets": total})
    measurements = [Measurement(name, "ms", rounds=values)
                    for name, values in result["timings"].items() if values]
    return ScenarioResult(title, description, False, measurements,
                          notes=_census_notes(result), params={"sockets": total})


def _census_notes(result: Dict[str, Any]) -> List[str]:
    notes = [f"sockets seen: {result['before']}; after {result['seconds']:.0f} s: "
             f"{result['after']}"]
    if PSUTIL not in result["seen"]:
        notes.append("psutil not installed: `pip install psutil` to compare (bench extra)")
    netlink = result["seen"].get(NETLINK)
    for name, seen in result["seen"].items():
        if seen != netlink:
            notes.append(f"{name} counted {seen}, netlink {netlink} (TIME_WAIT expiring?)")
    return notes


# --- the guard on the connect path --------------------------------------------------------------


def _pool(kwargs: Dict[str, Any], guard: bool, size: int) -> connguard.Pool:
    return connguard.Pool(**kwargs, max_size=size, checkout_timeout=120, resource_guard=guard,
                          **NO_STORM)


def _cold_connects(kwargs: Dict[str, Any], guard: bool, ops: int) -> float:
    """µs per new connection through a fresh pool (its guard counts once, then estimates)."""
    pool = _pool(kwargs, guard, ops)
    try:
        began = time.perf_counter()
        held = [pool.connect() for _ in range(ops)]
        elapsed = time.perf_counter() - began
        for conn in held:
            conn.close()
    finally:
        pool.close()
    return elapsed / ops * 1e6


def guard_cold_connect(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    """Steady state: one long-lived guard in front of every new connection."""
    host, port = driver.destination(kwargs)
    guarded = Connector(kwargs, guard=ResourceGuard(host, port))
    bare = Connector(kwargs)

    def run(connector: Connector) -> float:
        return time_per_op(lambda: connector.open().close(), ops)

    return ScenarioResult(
        "guard: cold connect", "Open (handshake included) and close a new connection through "
        "the pool's connect path, with a long-lived guard vs none (µs/op).", False,
        alternate(rounds, {"connguard (guard on)": lambda: run(guarded),
                            "connect path without guard": lambda: run(bare)}, "µs"))


def guard_fresh_pool(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    """Worst case: a new pool (a new guard, hence a first count) for every ``ops`` connects."""
    clients = {"connguard (guard on)": lambda: _cold_connects(kwargs, True, ops),
               "pool without guard": lambda: _cold_connects(kwargs, False, ops)}
    return ScenarioResult(
        "guard: cold connects of a fresh pool", f"{ops} new connections through a new pool, "
        "guard on vs off (µs per connection; includes the guard's first count, 1.5-5 ms).",
        False, alternate(rounds, clients, "µs"))


def _checkouts(pool: connguard.Pool, ops: int) -> float:
    return time_per_op(lambda: pool.connect().close(), ops)


def guard_checkout(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    pools = {"connguard (guard on)": _pool(kwargs, True, 1),
             "pool without guard": _pool(kwargs, False, 1)}
    try:
        for pool in pools.values():
            pool.connect().close()  # warm: one idle connection each
        clients: Dict[str, Callable[[], float]] = {
            name: functools.partial(_checkouts, pool, ops) for name, pool in pools.items()}
        measurements = alternate(rounds, clients, "µs")
    finally:
        for pool in pools.values():
            pool.close()
    return ScenarioResult(
        "guard: checkout", "Checkout and return of an idle connection, guard on vs off (µs/op; "
        "the guard is not on this path).", False, measurements)


def guard_preflight(kwargs: Dict[str, Any], rounds: int, ops: int) -> ScenarioResult:
    """The guard alone: the fast path far from limits, and one count (its worst case here)."""
    host, port = str(kwargs.get("host") or "localhost"), int(kwargs.get("port") or 3306)

    def cached() -> float:
        guard = ResourceGuard(host, port)
        guard.preflight()  # the first call counts
        return time_per_op(guard.preflight, ops)

    def first_call() -> None:
        # Guards share a count per destination and clock: a clock of its own makes this
        # guard count afresh, as the first pool toward a server in a process does.
        ResourceGuard(host, port, clock=functools.partial(time.monotonic)).preflight()

    def counting() -> float:
        return time_per_op(first_call, max(10, ops // 1000))

    return ScenarioResult(
        "guard: preflight", "ResourceGuard.preflight(): far from the limits (estimate only) "
        "and a first call (one census of this host's sockets toward the server) (µs/op).",
        False, alternate(rounds, {"connguard preflight (cached)": cached,
                                   "connguard preflight (with census)": counting}, "µs"))


def run_all(kwargs: Dict[str, Any], quick: bool) -> List[ScenarioResult]:
    rounds = 3 if quick else 7
    return [
        census_scenario(10_000, rounds),
        census_scenario(30_000, rounds),
        guard_cold_connect(kwargs, rounds, 100 if quick else 500),
        guard_fresh_pool(kwargs, rounds, 50 if quick else 200),
        guard_checkout(kwargs, rounds, 2000 if quick else 20000),
        guard_preflight(kwargs, rounds, 20000 if quick else 200000),
    ]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.census_cost")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        _child()
        return 0
    rounds = 3 if args.quick else 7
    for total in (10_000, 30_000):
        result = census_scenario(total, rounds)
        print(result.name, json.dumps([m.as_dict() for m in result.measurements]), result.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
