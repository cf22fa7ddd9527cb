"""Statement errors a retry can cure, reproduced on a real MariaDB: KILL QUERY (1317),
max_statement_time (1969), a lock wait timeout (1205) and a deadlock (1213).

Each goes through ``connguard.translate`` on the raw PyMySQL error, the way the pool's
connections and the SQLAlchemy plugin translate them, and checks the class, ``.transient``,
that it is not a disconnect, and that the connection that raised it still works.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List

import pymysql
import pytest

from connguard import errors
from connguard.errors import (
    Deadlock,
    LockWaitTimeout,
    QueryInterrupted,
    StatementTimeout,
    is_disconnect,
    translate,
)
from tests.mariadb import APP_PASSWORD, MariaDB, wait_until

DEADLINE = 30.0  # seconds, for conditions on a loaded 2-core machine


@pytest.fixture
def connect(mariadb: MariaDB) -> Iterator[Any]:
    """Opens application connections; closes every one afterwards."""
    opened: List[pymysql.connections.Connection] = []

    def make(**overrides: Any) -> pymysql.connections.Connection:
        opened.append(pymysql.connect(**mariadb.connect_kwargs(**overrides)))
        return opened[-1]

    yield make
    for conn in opened:
        conn.close()


@pytest.fixture
def rows(mariadb: MariaDB) -> Iterator[str]:
    """An InnoDB table with rows 1 and 2."""
    mariadb.query("CREATE TABLE app.cg_rows (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    mariadb.query("INSERT INTO app.cg_rows VALUES (1, 0), (2, 0)")
    yield "app.cg_rows"
    # A test that failed may leave a transaction holding locks, and DROP would wait for it
    # (lock_wait_timeout is a year): end the application's sessions first.
    mariadb.kill_app_connections()
    mariadb.query("DROP TABLE app.cg_rows")


def _translated(exc: BaseException, server: MariaDB, conn: Any) -> BaseException:
    new = translate(exc, host="127.0.0.1", port=server.port, password=APP_PASSWORD,
                    extra={"thread_id": conn.thread_id()})
    assert isinstance(new, pymysql.err.OperationalError)  # existing except clauses still match
    assert new.args == exc.args and new.__cause__ is exc
    assert not is_disconnect(exc) and not is_disconnect(new)
    assert "the connection is still usable" in str(new).split("\n", 1)[0]
    assert APP_PASSWORD not in str(new)
    return new


def _still_works(conn: Any, thread_id: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        assert cur.fetchone()[0] == thread_id


def _running(server: MariaDB, thread_id: int, statement: str) -> bool:
    return bool(server.query(
        "SELECT 1 FROM information_schema.processlist WHERE id = %s AND info LIKE %s",
        (thread_id, statement + "%")))


def test_kill_query_gives_query_interrupted(mariadb: MariaDB, connect: Any) -> None:
    conn = connect()
    tid = conn.thread_id()
    failures: List[BaseException] = []

    def kill_query() -> None:
        try:
            wait_until(lambda: _running(mariadb, tid, "SELECT SLEEP"), DEADLINE,
                       message="SELECT SLEEP to run")
            mariadb.query(f"KILL QUERY {int(tid)}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    killer = threading.Thread(target=kill_query)
    killer.start()
    with pytest.raises(pymysql.err.OperationalError) as info, conn.cursor() as cur:
        cur.execute("SELECT SLEEP(10)")
    killer.join(DEADLINE)
    assert not failures, failures
    new = _translated(info.value, mariadb, conn)
    assert isinstance(new, QueryInterrupted) and not isinstance(new, StatementTimeout)
    assert new.args[0] == 1317 and new.transient is True
    assert errors.is_transient(info.value) is True
    assert f"(server thread {tid})" in new.cause
    _still_works(conn, tid)


def test_max_statement_time_gives_statement_timeout(mariadb: MariaDB, connect: Any) -> None:
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("SET SESSION max_statement_time = 0.2")
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("SELECT SLEEP(5)")
    new = _translated(info.value, mariadb, conn)
    assert isinstance(new, StatementTimeout) and isinstance(new, QueryInterrupted)
    assert new.args[0] == 1969 and new.transient is True
    _still_works(conn, conn.thread_id())


def test_lock_wait_timeout(mariadb: MariaDB, connect: Any, rows: str) -> None:
    holder, waiter = connect(), connect()
    with holder.cursor() as cur:
        cur.execute(f"UPDATE {rows} SET v = 1 WHERE id = 1")  # holds the row lock
    with waiter.cursor() as cur:
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute(f"UPDATE {rows} SET v = 2 WHERE id = 1")
    new = _translated(info.value, mariadb, waiter)
    assert isinstance(new, LockWaitTimeout)
    assert new.args[0] == 1205 and new.transient is True
    _still_works(waiter, waiter.thread_id())
    holder.rollback()
    with waiter.cursor() as cur:  # the retry succeeds once the other transaction ended
        cur.execute(f"UPDATE {rows} SET v = 2 WHERE id = 1")
    waiter.commit()


def test_deadlock(mariadb: MariaDB, connect: Any, rows: str) -> None:
    first, second = connect(), connect()
    with first.cursor() as cur:
        cur.execute(f"UPDATE {rows} SET v = 1 WHERE id = 1")
    with second.cursor() as cur:
        cur.execute(f"UPDATE {rows} SET v = 2 WHERE id = 2")
    outcome: Dict[str, Any] = {}

    def first_wants_row_2() -> None:
        try:
            with first.cursor() as cur:
                cur.execute(f"UPDATE {rows} SET v = 1 WHERE id = 2")
            outcome["first"] = "ok"
        except pymysql.err.Error as exc:
            outcome["first"] = exc

    blocked = threading.Thread(target=first_wants_row_2)
    blocked.start()
    wait_until(lambda: mariadb.query(
        "SELECT COUNT(*) FROM information_schema.innodb_lock_waits")[0][0] > 0, DEADLINE,
        message="the first transaction to wait for row 2")
    try:
        with second.cursor() as cur:
            cur.execute(f"UPDATE {rows} SET v = 2 WHERE id = 1")  # closes the cycle
        outcome["second"] = "ok"
    except pymysql.err.Error as exc:
        outcome["second"] = exc
    blocked.join(DEADLINE)
    victims = {name: exc for name, exc in outcome.items() if exc != "ok"}
    assert len(outcome) == 2 and len(victims) == 1, outcome  # InnoDB picks one
    (name, exc), = victims.items()
    conn = first if name == "first" else second
    new = _translated(exc, mariadb, conn)
    assert isinstance(new, Deadlock)
    assert new.args[0] == 1213 and new.transient is True
    _still_works(conn, conn.thread_id())
    for each in (first, second):
        each.rollback()
