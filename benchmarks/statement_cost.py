"""What reading a statement costs per ``cursor.execute``: connguard against plain PyMySQL.

Every statement a borrower sends is read by connguard (what the return must reset). This
measures one ``execute`` of the same statement on a held plain PyMySQL connection and on a
connection from ``connguard.connect()``, alternating rounds in one run, for:

* indented SQL (a triple-quoted statement inside a method: ``"\\n" + " " * k + "SELECT 1"``),
  k from 0 to 10,000: the lead the old classifier backtracked on;
* large ``INSERT`` statements (1 MB, 16 MB): not read past ``statements.SCAN_LIMIT`` (the
  return then pays one session reset: a round trip, not counted here).

``python -m benchmarks.statement_cost [--dsn URL] [--rounds N]`` prints the table; with no
DSN it starts a throwaway MariaDB (``max_allowed_packet`` 64 MB).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import pymysql

import connguard

INDENTS = (0, 10, 14, 18, 20, 23, 100, 1_000, 10_000)
INSERT_SIZES = (1 << 20, 16 << 20)


def _time(op: Callable[[], Any], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        op()
    return (time.perf_counter() - start) / repeat


def _pair(kwargs: Dict[str, Any], sql: str, repeat: int, rounds: int) -> Tuple[float, float]:
    """Median seconds per execute on a held connection: plain PyMySQL, then a connection
    borrowed from ``connguard.connect()`` (the drop-in), in alternating rounds."""
    plain = pymysql.connect(**kwargs)
    guarded = connguard.connect(**kwargs)

    def on(conn: Any) -> Callable[[], None]:
        def execute() -> None:
            with conn.cursor() as cur:
                cur.execute(sql)
        return execute

    samples: Dict[str, List[float]] = {"plain": [], "connguard": []}
    try:
        for _ in range(rounds):
            samples["plain"].append(_time(on(plain), repeat))
            samples["connguard"].append(_time(on(guarded), repeat))
    finally:
        plain.close()
        guarded.close()
        connguard.close_all()
    return statistics.median(samples["plain"]), statistics.median(samples["connguard"])


def run(kwargs: Dict[str, Any], rounds: int) -> List[Dict[str, Any]]:
    rows = []
    for indent in INDENTS:
        sql = "\n" + " " * indent + "SELECT 1"
        plain, guarded = _pair(kwargs, sql, repeat=200, rounds=rounds)
        rows.append({"statement": f"SELECT 1 after {indent:,} characters of indentation",
                     "plain": plain, "connguard": guarded})
    setup = pymysql.connect(**kwargs)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_big (v LONGTEXT)")
    setup.close()
    for size in INSERT_SIZES:
        value = "a_b:c@d;" * (size // 8)
        sql = f"INSERT INTO bench_big VALUES ('{value}')"
        plain, guarded = _pair({**kwargs, "autocommit": True}, sql, repeat=2, rounds=rounds)
        rows.append({"statement": f"INSERT of {size >> 20} MB", "plain": plain,
                     "connguard": guarded})
    return rows


def report(rows: List[Dict[str, Any]]) -> str:
    lines = ["| statement | plain PyMySQL | connguard | ratio |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['statement']} | {row['plain'] * 1e6:,.1f} µs | "
                     f"{row['connguard'] * 1e6:,.1f} µs | {row['connguard'] / row['plain']:.2f}x |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.statement_cost")
    parser.add_argument("--dsn", help="a server of yours (mysql://user:pw@host:port/db)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median)")
    args = parser.parse_args(argv)
    if args.dsn:
        from benchmarks.runner import kwargs_from_dsn

        print(report(run(kwargs_from_dsn(args.dsn), args.rounds)))
        return 0
    from benchmarks.runner import Sandbox

    sandbox = Sandbox()
    try:
        server = sandbox.start(max_allowed_packet="64M")
        print(report(run(server.connect_kwargs(), args.rounds)))
    finally:
        sandbox.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
