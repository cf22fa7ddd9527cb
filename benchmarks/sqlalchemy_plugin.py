"""SQLAlchemy engine scenarios: the connguard plugin vs ``pool_pre_ping=True`` vs no pre-ping.

Two claims. Its socket-level check costs a small fraction of pre_ping's round trip (target:
a checkout at most 0.5x the pre_ping engine's): every engine runs against the same server in
the same run, rounds alternating between them so a noisy neighbour hurts all. And through an
engine, the outage and saturation scenarios of issue 6 stay bounded: those run on throwaway
servers of their own (``testsupport.servers``), since they stop the server or cap it at 16
connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from benchmarks.common import Measurement, ScenarioResult, failure_latency, time_per_op
from benchmarks.storm import EngineClient, Load, run_for
from connguard.census import own_sockets
from testsupport.servers import MariaDB, Template, wait_until

PLUGIN = "connguard plugin"
PRE_PING = "pool_pre_ping=True"
NO_PRE_PING = "no pre-ping"
TARGET = 0.5  # plugin checkout cost as a fraction of pre_ping's


def _url(kwargs_or_url: Union[str, Mapping[str, Any]]) -> Any:
    """A ``mysql+pymysql`` URL from a URL string or ``pymysql.connect`` keyword arguments."""
    from sqlalchemy.engine import URL, make_url

    if isinstance(kwargs_or_url, str):
        return make_url(kwargs_or_url)
    kw = dict(kwargs_or_url)
    return URL.create("mysql+pymysql", username=kw.get("user"), password=kw.get("password"),
                      host=kw.get("host"), port=kw.get("port"),
                      database=kw.get("database") or kw.get("db"))


#: The other drivers the plugin guards: (label, SQLAlchemy driver name, module, async).
#: Their rows are measured when the driver is installed (extras ``mysqlclient``, ``aiomysql``,
#: ``asyncmy``) and left out otherwise, with a note.
OTHER_DRIVERS = (("mysqlclient", "mysqldb", "MySQLdb", False),
                 ("aiomysql", "aiomysql", "aiomysql", True),
                 ("asyncmy", "asyncmy", "asyncmy", True))


def _installed(module: str, is_async: bool) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None and (
        not is_async or importlib.util.find_spec("greenlet") is not None)


def _engines(url: Any, is_async: bool = False, **common: Any) -> Dict[str, Any]:
    create_engine: Callable[..., Any]
    if is_async:  # imported only then: async engines need greenlet, the sync ones do not
        from sqlalchemy.ext.asyncio import create_async_engine as create_engine
    else:
        from sqlalchemy import create_engine

    common.update(pool_size=1, max_overflow=0)
    # The storm gate is a connect-path feature and would only slow the warm-up here.
    return {
        PLUGIN: create_engine(url, plugins=["connguard"], connguard_storm_control=False,
                              **common),
        PRE_PING: create_engine(url, pool_pre_ping=True, **common),
        NO_PRE_PING: create_engine(url, **common),
    }


def _measure(url: Any, body: Callable[[Any], float], rounds: int, unit: str,
             **engine_options: Any) -> List[Measurement]:
    engines = _engines(url, **engine_options)
    results = {name: Measurement(name, unit) for name in engines}
    try:
        for engine in engines.values():  # warm: connect, and the dialect's first queries
            engine.connect().close()
        for _ in range(rounds):
            for name, engine in engines.items():
                results[name].rounds.append(body(engine))
    finally:
        for engine in engines.values():
            engine.dispose()
    return list(results.values())


def _note_vs_pre_ping(result: ScenarioResult, target: float = 0.0) -> ScenarioResult:
    ratio = result.ratios(PRE_PING)[PLUGIN]
    goal = f" (target <= {target}x)" if target else ""
    result.notes.append(f"connguard plugin / pool_pre_ping: {ratio:.2f}x{goal}")
    return result


def engine_checkout(url: Any, rounds: int, ops: int, label: str = "") -> ScenarioResult:
    """``engine.connect()`` then ``close()``: the pool checkout every unit of work pays.

    ``pool_reset_on_return=None`` for all three engines: the return's ROLLBACK is one round
    trip for every client alike and would hide the difference being measured (what the
    checkout does: nothing, a socket check, or COM_PING). ``label``: the driver, when not
    PyMySQL (``url`` names it).
    """
    def body(engine: Any) -> float:
        return time_per_op(lambda: engine.connect().close(), ops)
    return _note_vs_pre_ping(ScenarioResult(
        "engine checkout" + (f" ({label})" if label else ""),
        "engine.connect() + close() on a warm pool of one, no reset on "
        "return (µs/op); the plugin checks the socket, pre_ping sends COM_PING.", False,
        _measure(url, body, rounds, "µs", pool_reset_on_return=None)), TARGET)


def async_engine_checkout(url: Any, rounds: int, ops: int, label: str) -> ScenarioResult:
    """``engine_checkout`` for an async engine: ``await engine.connect()`` then ``close()``,
    in one event loop, rounds alternating between the three engines."""
    import asyncio

    async def measure() -> List[Measurement]:
        engines = _engines(url, is_async=True, pool_reset_on_return=None)
        results = {name: Measurement(name, "µs") for name in engines}
        try:
            for engine in engines.values():  # warm: connect, and the dialect's first queries
                await (await engine.connect()).close()
            for _ in range(rounds):
                for name, engine in engines.items():
                    began = time.perf_counter()
                    for _ in range(ops):
                        await (await engine.connect()).close()
                    results[name].rounds.append((time.perf_counter() - began) / ops * 1e6)
        finally:
            for engine in engines.values():
                await engine.dispose()
        return list(results.values())

    return _note_vs_pre_ping(ScenarioResult(
        f"engine checkout ({label})",
        "await engine.connect() + close() on a warm async engine's pool of one, no reset on "
        "return (µs/op); the plugin checks the transport's socket, pre_ping sends COM_PING.",
        False, asyncio.run(measure())), TARGET)


def engine_select_one(url: Any, rounds: int, ops: int) -> ScenarioResult:
    from sqlalchemy import text

    statement = text("SELECT 1")

    def one(engine: Any) -> None:
        with engine.connect() as conn:
            conn.execute(statement).fetchall()

    def body(engine: Any) -> float:
        return time_per_op(lambda: one(engine), ops)
    return _note_vs_pre_ping(ScenarioResult(
        "engine SELECT 1", "A checkout, `SELECT 1` and the return through the engine, "
        "rollback on close included (µs/op).", False, _measure(url, body, rounds, "µs")))


# --- outage and saturation through the engine --------------------------------------------

EXACT = "exact-size pool, no plugin"
THREADS = 64
SERVER_CAP = 16  # max_connections of the saturation server


def _storm_engine(url: Any, client: str, **options: Any) -> Tuple[Any, Callable[[], int]]:
    """An engine for ``client`` and a function counting the connects it has tried: the
    storm gate's admitted attempts for the plugin (a call refused by the open breaker does
    not touch the network), every ``do_connect`` otherwise."""
    from sqlalchemy import create_engine, event

    if client == PLUGIN:
        from connguard.sqlalchemy_plugin import stats

        engine = create_engine(url, plugins=["connguard"], **options)
        return engine, lambda: int(stats(engine).get("connect_attempts", 0))
    engine = create_engine(url, pool_pre_ping=client == PRE_PING, **options)
    lock, count = threading.Lock(), [0]

    def counted(*args: Any) -> None:
        with lock:
            count[0] += 1
    event.listen(engine, "do_connect", counted)
    return engine, lambda: count[0]


def _close_wait(port: int) -> int:
    return own_sockets(port, "127.0.0.1").get("close_wait", 0)


def _saturation_round(server: Any, client: str, warm: float, seconds: float
                      ) -> Dict[str, float]:
    sizes = ({"pool_size": SERVER_CAP, "max_overflow": 0} if client == EXACT
             else {"pool_size": 32, "max_overflow": 32})
    kind = NO_PRE_PING if client == EXACT else client
    engine, attempts = _storm_engine(server.url(), kind, pool_timeout=60, **sizes)
    try:
        with Load(EngineClient(engine), THREADS, "SELECT SLEEP(0.005)") as load:
            if client == PLUGIN:  # growing until the server says no
                from connguard.sqlalchemy_plugin import stats

                wait_until(lambda: stats(engine)["ceiling"] is not None, 60,
                           message="the server to refuse a connection")
            run_for(warm)  # and the connects under way then
            before, began = attempts(), time.monotonic()
            run_for(seconds)
            ended = time.monotonic()
            tried = attempts() - before
            close_wait = _close_wait(server.port)
    finally:
        engine.dispose()
    wait_until(lambda: server.status("Threads_connected") <= 1, 60,
               message="the engine's connections to go")
    return {"throughput": load.rate(began, ended), "errors": load.rate(began, ended, ok=False),
            "attempts": tried / (ended - began), "close_wait": close_wait}


def _outage_round(server: Any, client: str, before: float, outage: float, after: float,
                  driver: str = "pymysql") -> Dict[str, float]:
    engine, attempts = _storm_engine(server.url(f"mysql+{driver}"), client, pool_size=16,
                                     max_overflow=0,
                                     pool_timeout=5, connect_args={"connect_timeout": 2})
    try:
        with Load(EngineClient(engine), THREADS, "SELECT 1") as load:
            wait_until(lambda: load.first_success_after(0.0) is not None, 60,
                       message="the load to run")
            run_for(before)
            attempts_before, stopped = attempts(), time.monotonic()
            server.stop()
            run_for(outage)
            down = time.monotonic() - stopped
            tried = attempts() - attempts_before
            close_wait = _close_wait(server.port)
            server.start()
            started = time.monotonic()
            run_for(after)
    finally:
        engine.dispose()
    failed = [e - t for t, e, ok in load.calls if not ok and stopped + 1.0 <= t < started]
    recovery = load.first_success_after(started)
    return {"attempts": tried / down, "recovery": after if recovery is None else recovery,
            "errors": float(sum(1 for t, _, ok in load.calls if not ok and t >= stopped)),
            "fail_ms": statistics.median(failed) * 1000 if failed else 0.0,
            "late_errors": float(sum(1 for t, _, ok in load.calls if not ok and t >= started)),
            "close_wait": close_wait}


#: (metric, scenario name, description, unit, higher is better)
_SATURATION_METRICS = (
    ("throughput", "engine saturation: throughput",
     f"{THREADS} threads, `SELECT SLEEP(0.005)`, server max_connections {SERVER_CAP}; pools "
     f"of 32 + 32 overflow, and a plain pool of exactly {SERVER_CAP} for reference "
     "(queries/s after the first seconds; for the plugin, after it learnt the ceiling).",
     "q/s", True),
    ("errors", "engine saturation: application errors",
     "Failed calls per second in the same window (1040 Too many connections, timeouts).",
     "err/s", False),
    ("attempts", "engine saturation: connect attempts",
     "Connects tried per second after the first seconds (the plugin: the storm gate's "
     "admitted attempts; the others: every do_connect).", "/s", False),
    ("close_wait", "engine saturation: CLOSE_WAIT left",
     "Sockets of this process in CLOSE_WAIT toward the server at the end of the window.",
     "sockets", False),
)

_OUTAGE_METRICS = (
    ("attempts", "engine outage: connect attempts",
     f"{THREADS} threads on a pool of 16; the server is stopped, then started on the same "
     "port: connects tried per second while it is down (target: <= 5/s).", "/s", False),
    ("errors", "engine outage: application errors",
     "Failed calls that began from the stop to the end of the run (the plugin's callers wait "
     "for the server within pool_timeout, 5 s here; the others fail while it is down).",
     "errors", False),
    ("recovery", "engine outage: recovery",
     "Seconds from the restart to the first successful query.", "s", False),
    ("fail_ms", "engine outage: failure latency",
     "Median duration of a failed call during the outage, from its second second on (fail "
     "fast).", "ms", False),
    ("late_errors", "engine outage: errors after the restart",
     "Failed calls that began after the server was started again (goal: 0).", "errors",
     False),
    ("close_wait", "engine outage: CLOSE_WAIT",
     "Sockets of this process in CLOSE_WAIT toward the server at the end of the outage.",
     "sockets", False),
)


def _results(metrics: Any, runs: Dict[str, List[Dict[str, float]]]) -> List[ScenarioResult]:
    results = [ScenarioResult(name, description, higher,
                              [Measurement(client, unit, [run[key] for run in client_runs])
                               for client, client_runs in runs.items()])
               for key, name, description, unit, higher in metrics]
    return [failure_latency(r) if r.name.endswith("failure latency") else r for r in results]


StartServer = Callable[..., Any]


def engine_saturation(start_server: StartServer, quick: bool) -> List[ScenarioResult]:
    """``start_server(**options)`` returns a started server of its own (a
    :class:`testsupport.servers.MariaDB`), destroyed here at the end."""
    clients = (PLUGIN, PRE_PING, NO_PRE_PING, EXACT)
    runs: Dict[str, List[Dict[str, float]]] = {client: [] for client in clients}
    server = start_server(max_connections=SERVER_CAP)
    try:
        for _ in range(1 if quick else 3):
            for client in clients:
                runs[client].append(_saturation_round(server, client, 1.0 if quick else 2.0,
                                                      1.0 if quick else 5.0))
    finally:
        server.destroy()
    results = _results(_SATURATION_METRICS, runs)
    ratio = results[0].ratios(EXACT)[PLUGIN]
    results[0].notes.append(f"connguard plugin (32 + 32) / exact-size plain pool: {ratio:.2f}x "
                            f"(target >= 0.8x: {'met' if ratio >= 0.8 else 'MISSED'})")
    return results


def engine_outage(start_server: StartServer, quick: bool, driver: str = "pymysql",
                  label: str = "") -> List[ScenarioResult]:
    """Stops and starts the server ``start_server()`` returns, and destroys it at the end.
    ``driver``: SQLAlchemy's name of a sync driver; ``label`` names it in the results."""
    clients = (PLUGIN, PRE_PING, NO_PRE_PING)
    runs: Dict[str, List[Dict[str, float]]] = {client: [] for client in clients}
    server = start_server()
    try:
        for _ in range(1 if quick else 3):
            for client in clients:
                runs[client].append(_outage_round(server, client, *(
                    (0.5, 1.5, 1.2) if quick else (2.0, 4.0, 4.0)), driver=driver))
    finally:
        server.destroy()
    metrics = tuple((key, name.replace("engine outage", f"engine outage ({label})")
                     if label else name, *rest) for key, name, *rest in _OUTAGE_METRICS)
    results = _results(metrics, runs)
    rate = next(m.median for m in results[0].measurements if m.client == PLUGIN)
    results[0].notes.append(f"connguard plugin: {rate:.1f} connect attempts/s while the server "
                            f"was down (target <= 5/s: {'met' if rate <= 5 else 'MISSED'}; "
                            "probes every 0.2-0.25 s, plus the handshakes in flight at the stop)")
    return results


@contextlib.contextmanager
def _server_starter() -> Iterator[StartServer]:
    """``start_server(**options)`` for throwaway servers, on a datadir template made once."""
    root = tempfile.mkdtemp(prefix="connguard-bench-sqla-")
    try:
        os.chmod(root, 0o755)
        template = Template(root)
        template.build()
        yield lambda **options: MariaDB(template, options).start()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _skipped(name: str, description: str, why: str) -> ScenarioResult:
    return ScenarioResult(name, description, False, [], notes=[f"skipped: {why}"])


def run_all(kwargs_or_url: Union[str, Mapping[str, Any]], quick: bool,
            start_server: Optional[StartServer] = None) -> List[ScenarioResult]:
    """Every scenario; ``kwargs_or_url`` is a SQLAlchemy URL or ``pymysql.connect`` arguments.

    The outage and saturation scenarios stop and cap servers, so they run only on throwaway
    ones: ``start_server(**mariadbd options)`` starts one (``connguard bench`` lends its
    own); without it they are skipped with a note.
    """
    url = _url(kwargs_or_url)
    rounds = 3 if quick else 7
    ops = 2000 if quick else 20000
    results = [engine_checkout(url, rounds, ops), engine_select_one(url, rounds, ops // 4)]
    missing = []
    drivers = []
    for label, name, module, is_async in OTHER_DRIVERS:
        if not _installed(module, is_async):
            missing.append(label)
            continue
        other = url.set(drivername=f"mysql+{name}")
        results.append(async_engine_checkout(other, rounds, ops // 4, label) if is_async
                       else engine_checkout(other, rounds, ops, label))
        drivers += [] if is_async else [(name, label)]
    if missing:
        results[0].notes.append(f"not installed, so not measured: {', '.join(missing)} "
                                "(pip install 'connguard[mysqlclient,aiomysql,asyncmy]')")
    if start_server is None:
        why = ("it stops or caps the server, so it runs only on throwaway servers "
               "(start_server=)")
        return results + [_skipped("engine saturation", _SATURATION_METRICS[0][2], why),
                          _skipped("engine outage", _OUTAGE_METRICS[0][2], why)]
    results += engine_saturation(start_server, quick) + engine_outage(start_server, quick)
    for name, label in drivers:
        results += engine_outage(start_server, quick, name, label)
    return results


def main() -> None:
    """``python -m benchmarks.sqlalchemy_plugin [--quick]``: these scenarios alone, on
    throwaway MariaDB servers (``testsupport.servers``)."""
    import sys

    from benchmarks.report import write_results

    with _server_starter() as start_server:
        server = start_server(max_connections=500)
        try:
            version = server.variable("version")
            results = run_all(server.connect_kwargs(), "--quick" in sys.argv,
                              start_server=start_server)
        finally:
            server.destroy()
    print(write_results(results, os.path.join("bench-results", "sqlalchemy"), version))


if __name__ == "__main__":
    main()
