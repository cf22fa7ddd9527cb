"""The statement classifier: which statements may change session state (pure logic)."""

from __future__ import annotations

from typing import Union

import pytest

from connguard.session import may_change_session

CHANGES = [
    "SET @a = 1", "  set session sql_mode = ''", "/* why */ SET NAMES latin1",
    "-- a comment\nUSE other", "# another\nuse other", "(SET @a = 1)",
    "SELECT GET_LOCK('a', 1)", "do get_lock('a', 0)", "SELECT @v := 2", "select 1 into @x",
    "SELECT a FROM t INTO\n@y", "CREATE TEMPORARY TABLE t (x INT)",
    "create or replace temporary table t (x int)", "DROP TEMPORARY TABLE t",
    "SELECT LAST_INSERT_ID(5)", "PREPARE s FROM 'SELECT 1'", "EXECUTE s",
    "DEALLOCATE PREPARE s", "LOCK TABLES t READ", "HANDLER t OPEN", "CALL p()",
    "XA START 'x'", "SET STATEMENT max_statement_time=1 FOR SELECT 1",
    b"SET @a = 1", b"select get_lock('a', 0)",
    "/*!40101 SET NAMES latin1 */", "/*M!100000 SET time_zone='+00:00' */",
    "SELECT 1; SET time_zone = '+05:00'", "FLUSH TABLES WITH READ LOCK", "BACKUP STAGE START",
    "BEGIN NOT ATOMIC SET @a = 1; END", "LOAD DATA INFILE 'f' INTO TABLE t (@v) SET a = @v",
]
NO_CHANGE = [
    "SELECT 1", "(SELECT 1)", "select * from settings", "UPDATE t SET a = 1",
    "INSERT INTO t VALUES (1)", "CREATE TABLE t (x INT)", "DROP TABLE t",
    "SELECT LAST_INSERT_ID()", "select @@session.sql_mode", "SELECT user_id FROM users",
    "BEGIN", "COMMIT", "DELETE FROM t WHERE k = 'a:b'", b"SELECT user_id FROM t",
    "SELECT 1;", "/* a comment */ SELECT 1", "SELECT 'hi!' FROM t",
]


@pytest.mark.parametrize("sql", CHANGES)
def test_statements_that_may_change_the_session(sql: Union[str, bytes]) -> None:
    assert may_change_session(sql)


@pytest.mark.parametrize("sql", NO_CHANGE)
def test_statements_that_cannot(sql: Union[str, bytes]) -> None:
    assert not may_change_session(sql)
