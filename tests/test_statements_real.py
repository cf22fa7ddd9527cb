"""Indented, commented and large statements through the pools, on a real MariaDB: what the
return resets is decided right, whatever leads the statement (see tests/test_statements.py
for the classifier alone and its cost)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

import connguard
from connguard.statements import SCAN_LIMIT
from tests.mariadb import MariaDB
from tests.optional import optional
from tests.test_transparency import table  # noqa: F401, F811 - a fixture

pytestmark = pytest.mark.timeout(300)  # the backtracking classifier took minutes: fail, not hang

INDENT = "\n" + " " * 40  # a triple-quoted statement inside a method, and then some
LEADS = [INDENT, " " * 10_000, "/* app:42 */\n" * 50, "-- why\n" * 50, "#\n" + INDENT]


def _execute(conn: Any, sql: str) -> Any:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return cur.fetchall()
    finally:
        cur.close()


@pytest.fixture(params=["pymysql", "mysqldb"])
def pool(request: Any, mariadb: MariaDB) -> Iterator[connguard.Pool]:
    if request.param == "mysqldb":
        optional("MySQLdb", "pip install 'connguard[mysqlclient]'")
    with connguard.Pool(driver=request.param, **mariadb.connect_kwargs(autocommit=True),
                        max_size=1) as p:
        yield p


@pytest.mark.parametrize("lead", LEADS, ids=["indent", "10k spaces", "comments", "dashes",
                                              "hash"])
def test_a_led_session_change_is_reset_and_a_led_select_is_not(pool: connguard.Pool,
                                                                lead: str) -> None:
    with pool.connect() as conn:
        assert _execute(conn, lead + "SELECT 1")[0][0] == 1
    assert pool.stats()["resets"] == 0  # a plain SELECT, however led, costs no reset
    with pool.connect() as conn:
        _execute(conn, lead + "SET @v = 3")
        assert _execute(conn, "SELECT @v")[0][0] == 3
    with pool.connect() as conn:
        assert _execute(conn, "SELECT @v")[0][0] is None
    assert pool.stats()["resets"] == 1


def test_a_led_begin_under_autocommit_is_rolled_back(pool: connguard.Pool,
                                                     table: str) -> None:  # noqa: F811
    with pool.connect() as conn:
        _execute(conn, INDENT + "/* unit of work */ BEGIN")
        _execute(conn, f"INSERT INTO {table} VALUES ()")
    with pool.connect() as conn:  # the borrower never committed: nobody sees its row
        assert _execute(conn, f"SELECT COUNT(*) FROM {table}")[0][0] == 0


def test_a_statement_over_the_scan_limit_is_reset_on_return(pool: connguard.Pool) -> None:
    big = "SELECT LENGTH('" + "x" * SCAN_LIMIT + "')"
    with pool.connect() as conn:
        assert _execute(conn, big)[0][0] == SCAN_LIMIT
    assert pool.stats()["resets"] == 1  # unread, so taken to change the session: one reset
    with pool.connect() as conn:
        assert _execute(conn, "SELECT 1")[0][0] == 1


@pytest.mark.parametrize("sql", [
    "--\x01\nSET @v = 3", "SELECT 3 INTO/**/@v", "SELECT 3 INTO -- c\n@v", "SELECT 3 INTO#c\n@v",
    "SET/**/@v = 3", "SELECT 3 INTO @v", "/* a */ SELECT 3 INTO\n    @v",
])
def test_what_a_comment_hides_from_a_reader_still_reaches_no_one(pool: connguard.Pool,
                                                                   sql: str) -> None:
    """The server reads comments and control characters where a careless reader does not:
    each of these sets @v, and the next borrower must not see it."""
    with pool.connect() as conn:
        _execute(conn, sql)
        assert _execute(conn, "SELECT @v")[0][0] == 3
    with pool.connect() as conn:
        assert _execute(conn, "SELECT @v")[0][0] is None


@pytest.mark.parametrize("ddl", ["CREATE/**/TEMPORARY TABLE tt (a INT)",
                                 "CREATE OR/* x */REPLACE TEMPORARY TABLE tt (a INT)",
                                 "CREATE -- x\nTEMPORARY TABLE tt (a INT)"])
def test_a_temporary_table_made_with_comments_between_the_words_is_dropped(
        pool: connguard.Pool, ddl: str) -> None:
    with pool.connect() as conn:
        _execute(conn, ddl)
    with pool.connect() as conn:
        assert _execute(conn, "SELECT COUNT(*) FROM information_schema.tables "
                              "WHERE table_name = 'tt' AND table_type = 'TEMPORARY'")[0][0] == 0
