"""SQLAlchemy engine scenarios: the connguard plugin vs ``pool_pre_ping=True`` vs no pre-ping.

The plugin's claim is that its socket-level check costs a small fraction of pre_ping's round
trip (target: a checkout at most 0.5x the pre_ping engine's). Every engine runs against the
same server in the same run; rounds alternate between them so a noisy neighbour hurts all.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Union

from benchmarks.common import Measurement, ScenarioResult, time_per_op

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


def _engines(url: Any, **common: Any) -> Dict[str, Any]:
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


def engine_checkout(url: Any, rounds: int, ops: int) -> ScenarioResult:
    """``engine.connect()`` then ``close()``: the pool checkout every unit of work pays.

    ``pool_reset_on_return=None`` for all three engines: the return's ROLLBACK is one round
    trip for every client alike and would hide the difference being measured (what the
    checkout does: nothing, a socket check, or COM_PING).
    """
    def body(engine: Any) -> float:
        return time_per_op(lambda: engine.connect().close(), ops)
    return _note_vs_pre_ping(ScenarioResult(
        "engine checkout", "engine.connect() + close() on a warm pool of one, no reset on "
        "return (µs/op); the plugin checks the socket, pre_ping sends COM_PING.", False,
        _measure(url, body, rounds, "µs", pool_reset_on_return=None)), TARGET)


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


def run_all(kwargs_or_url: Union[str, Mapping[str, Any]], quick: bool) -> List[ScenarioResult]:
    """Every scenario; ``kwargs_or_url`` is a SQLAlchemy URL or ``pymysql.connect`` arguments."""
    url = _url(kwargs_or_url)
    rounds = 3 if quick else 7
    return [
        engine_checkout(url, rounds, 2000 if quick else 20000),
        engine_select_one(url, rounds, 500 if quick else 5000),
    ]


def main() -> None:
    """``python -m benchmarks.sqlalchemy_plugin [--quick]``: these scenarios alone, on a
    throwaway MariaDB started by the test harness."""
    import os
    import shutil
    import sys
    import tempfile

    from benchmarks.common import write_report
    from tests.mariadb import MariaDB, Template

    root = tempfile.mkdtemp(prefix="connguard-bench-")
    try:
        os.chmod(root, 0o755)
        template = Template(root)
        template.build()
        server = MariaDB(template, {"max_connections": 500}).start()
        try:
            version = server.variable("version")
            results = run_all(server.connect_kwargs(), "--quick" in sys.argv)
        finally:
            server.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(write_report(results, os.path.join("bench-results", "sqlalchemy"), version))


if __name__ == "__main__":
    main()
