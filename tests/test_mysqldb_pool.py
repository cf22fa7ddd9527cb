"""The pool and ``install("MySQLdb")`` for mysqlclient code, against a real MariaDB.

The referee is plain mysqlclient on a fresh connection: what a borrower sees must be what
``MySQLdb.connect`` would have given it (session state, transactions, errors after close),
and what the pool adds (no round trip to check a connection, translated errors) must still
be mysqlclient's classes. mysqlclient's own suite runs with it too (tests/drivers).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Iterator, Tuple

import pytest

import connguard
from connguard import dropin
from tests.mariadb import MariaDB, socket_states, wait_until
from tests.optional import optional
from tests.test_transparency import DEADLINE, STATE_SQL, other_database, table  # noqa: F401

MySQLdb = optional("MySQLdb", "pip install mysqlclient (needs libmariadb-dev, pkg-config)")
optional("MySQLdb.cursors")  # MySQLdb.cursors.DictCursor and the others, below


def state(conn: Any) -> Tuple[Any, ...]:
    """The session as a borrower can see it (see tests/test_transparency.STATE_SQL)."""
    cursorclass = conn.cursorclass
    cur = conn.cursor(MySQLdb.cursors.Cursor)
    try:
        cur.execute(STATE_SQL)
        row = cur.fetchone()
        try:
            cur.execute("SELECT COUNT(*) FROM cg_temp")
            temp = True
        except MySQLdb.ProgrammingError:
            temp = False
        cur.execute("SELECT @@in_transaction")
        in_trx = cur.fetchone()[0]
    finally:
        cur.close()
    return (*row, temp, in_trx, conn.get_autocommit(), cursorclass)


@pytest.fixture
def pool(mariadb: MariaDB) -> Iterator[connguard.Pool]:
    with connguard.Pool(driver="mysqldb", **mariadb.connect_kwargs(), max_size=1) as p:
        yield p


def test_install_pools_mysqldb_connect_and_uninstall_restores_it(mariadb: MariaDB) -> None:
    original = MySQLdb.connect
    kwargs = mariadb.connect_kwargs()
    connguard.install("MySQLdb")
    try:
        assert connguard.installed("MySQLdb") and "pooled by connguard" in repr(MySQLdb.connect)
        ids = set()
        for _ in range(5):  # the classic spellings, positional included: one pool
            conn = MySQLdb.connect(kwargs["host"], kwargs["user"], kwargs["password"],
                                   kwargs["database"], kwargs["port"])
            ids.add(conn.thread_id())
            conn.close()
            conn = MySQLdb.connect(host=kwargs["host"], port=kwargs["port"], user=kwargs["user"],
                                   passwd=kwargs["password"], db=kwargs["database"])
            ids.add(conn.thread_id())
            assert isinstance(conn, MySQLdb.connections.Connection)  # the proxy passes for one
            assert repr(conn) == f"<connguard.mysqldb.Handle thread_id={conn.thread_id()}>"
            conn.close()
        assert len(ids) == 1
        assert repr(conn) == "<connguard.mysqldb.Handle (returned)>"
    finally:
        connguard.uninstall()
        dropin.close_all()
    assert MySQLdb.connect is original and not connguard.installed("MySQLdb")
    with pytest.raises(ValueError, match="unknown driver 'mysql'; allowed: 'pymysql', "
                       "'MySQLdb', 'mysqlclient'"):
        connguard.install("mysql")
    with pytest.raises(ValueError, match="driver must be one of 'mysqldb', 'pymysql'"):
        connguard.Pool(driver="MySQL", **kwargs)
    with pytest.raises(TypeError, match="MySQLdb.connect's parameters"):
        connguard.Pool(driver="mysqldb", **kwargs, defer_connect=True)


def test_install_takes_mysqlclient_the_pip_name_for_mysqldb(mariadb: MariaDB) -> None:
    connguard.install("mysqlclient")
    try:
        assert connguard.installed("MySQLdb") and connguard.installed("mysqlclient")
        assert not connguard.installed("pymysql")
        conn = MySQLdb.connect(**mariadb.connect_kwargs())
        try:
            assert repr(conn).startswith("<connguard.mysqldb.Handle thread_id=")
        finally:
            conn.close()
    finally:
        connguard.uninstall()
        dropin.close_all()


@pytest.mark.parametrize("autocommit", [False, True])
def test_session_state_never_reaches_the_next_borrower(mariadb: MariaDB, pool: Any,
                                                       other_database: str,  # noqa: F811
                                                       autocommit: bool) -> None:
    kwargs = mariadb.connect_kwargs(autocommit=autocommit, init_command="SET @init = 1",
                                    sql_mode="ANSI_QUOTES")
    plain = MySQLdb.connect(**kwargs)
    try:
        fresh = state(plain)
    finally:
        plain.close()
    with connguard.Pool(driver="mysqldb", **kwargs, max_size=1) as p:
        with p.connect() as conn:
            tid = conn.thread_id()
            assert state(conn) == fresh
            cur = conn.cursor()
            for sql in ("SET @v = 1", "SET time_zone = '+05:00'", "SET sql_mode = ''",
                        "CREATE TEMPORARY TABLE cg_temp (i INT)", "SELECT GET_LOCK('cg_lock', 0)",
                        f"USE {other_database}", "SET SESSION lock_wait_timeout = 7",
                        "SET NAMES latin1"):
                cur.execute(sql)
            conn.autocommit(not autocommit)
            conn.cursorclass = MySQLdb.cursors.DictCursor
            assert state(conn) != fresh
        with p.connect() as conn:
            assert conn.thread_id() == tid  # the same server connection, made as new
            assert state(conn) == fresh
        assert p.stats()["resets"] == 1


def test_a_select_with_autocommit_off_leaves_no_transaction(mariadb: MariaDB, pool: Any,
                                                             table: str) -> None:  # noqa: F811
    with pool.connect() as conn:  # autocommit off: mysqlclient's default
        cur = conn.cursor()
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        assert cur.fetchone()[0] == 0
    mariadb.query(f"INSERT INTO {table} VALUES ()")
    with pool.connect() as conn:
        cur = conn.cursor()  # no stale REPEATABLE READ snapshot
        cur.execute(f"SELECT COUNT(*), @@in_transaction FROM {table}")
        assert cur.fetchone() == (1, 1)
    with mariadb.admin() as admin:  # an idle pooled connection holds no metadata lock
        admin.execute("SET SESSION lock_wait_timeout = 5")
        admin.execute(f"ALTER TABLE {table} ADD COLUMN note INT")
    assert pool.stats()["rollbacks"] == 2


COUNTERS = ("Com_select", "Com_rollback", "Com_admin_commands", "Com_change_db")


def counters(mariadb: MariaDB) -> dict:
    return {name: mariadb.status(name) for name in COUNTERS}


def test_with_autocommit_on_a_return_costs_no_round_trip(mariadb: MariaDB) -> None:
    with connguard.Pool(driver="mysqldb", **mariadb.connect_kwargs(autocommit=True),
                        max_size=1) as p:
        p.connect().close()
        before = counters(mariadb)
        for _ in range(50):
            with p.connect() as conn:
                cur = conn.cursor()
                cur.execute("SELECT 1")
                cur.close()
        after = counters(mariadb)
        assert {n: after[n] - before[n] for n in COUNTERS} == {
            "Com_select": 50, "Com_rollback": 0, "Com_admin_commands": 0, "Com_change_db": 0}
        with p.connect() as conn:  # BEGIN opens a transaction even with autocommit on
            conn.begin()
            conn.cursor().execute("SELECT 1")
        assert counters(mariadb)["Com_rollback"] == after["Com_rollback"] + 1


def test_uses_after_close_fail_as_on_a_closed_mysqlclient_connection(pool: Any) -> None:
    conn = pool.connect()
    cur = conn.cursor()
    cur.execute("SELECT 1 UNION SELECT 2")
    assert cur.fetchone() == (1,)
    conn.close()
    assert cur.fetchone() == (2,)  # rows already read stay readable
    for use in (lambda: cur.execute("SELECT 1"), lambda: conn.cursor().execute("SELECT 1"),
                conn.close, conn.commit, conn.ping):
        with pytest.raises(MySQLdb.OperationalError) as info:
            use()
        assert info.value.args == (2006, "")  # mysqlclient's own, untranslated
        assert not isinstance(info.value, connguard.ConnGuardError)
    assert not conn.open
    closed = pool.connect()
    cur = closed.cursor()
    cur.close()
    with pytest.raises(MySQLdb.ProgrammingError, match="cursor closed"):
        cur.execute("SELECT 1")
    closed.close()


def test_killed_idle_connections_are_replaced_without_a_ping(mariadb: MariaDB) -> None:
    size = 4
    with connguard.Pool(driver="mysqldb", **mariadb.connect_kwargs(), max_size=size) as p:
        held = [p.connect() for _ in range(size)]
        killed = [c.thread_id() for c in held]
        for c in held:
            c.close()
        for tid in killed:
            mariadb.kill(tid)
        wait_until(lambda: socket_states(mariadb.port).get("close_wait", 0) >= size,
                   DEADLINE, message=f"{size} sockets in CLOSE_WAIT after KILL")
        pings = mariadb.status("Com_admin_commands")
        for _ in range(200):
            with p.connect() as conn:
                assert conn.thread_id() not in killed
                conn.cursor().execute("SELECT 1")
        assert mariadb.status("Com_admin_commands") == pings
        assert p.stats()["peer_closed"] == size


def test_a_killed_session_fails_translated_and_is_not_handed_on(mariadb: MariaDB,
                                                                 pool: Any) -> None:
    with pool.connect() as conn:
        tid = conn.thread_id()
        mariadb.kill(tid)
        with pytest.raises(MySQLdb.OperationalError) as info:
            conn.cursor().execute("SELECT 1")
        assert isinstance(info.value, connguard.ConnectionLost)
        assert "lost" in str(info.value)
    with pool.connect() as conn:
        assert conn.thread_id() != tid
    assert pool.stats()["broken"] == 1


def test_the_pools_own_errors_are_mysqlclient_errors(mariadb: MariaDB) -> None:
    with connguard.Pool(driver="mysqldb", **mariadb.connect_kwargs(), max_size=1,
                        checkout_timeout=0.2) as p, p.connect():
        with pytest.raises(MySQLdb.OperationalError) as info:
            p.connect()
        assert isinstance(info.value, connguard.PoolTimeout)
    with pytest.raises(MySQLdb.InterfaceError) as closed:
        p.connect()
    assert isinstance(closed.value, connguard.PoolClosed)
    wrong = connguard.Pool(driver="mysqldb", **mariadb.connect_kwargs(password="wrong"))
    try:
        with pytest.raises(MySQLdb.OperationalError) as denied:
            wrong.connect()
        assert isinstance(denied.value, connguard.AccessDenied)
        assert "wrong" not in str(denied.value)
    finally:
        wrong.close()


def test_an_unexhausted_streaming_cursor_never_reaches_the_next_borrower(pool: Any) -> None:
    conn = pool.connect()
    tid = conn.thread_id()
    cur = conn.cursor(MySQLdb.cursors.SSCursor)
    cur.execute("SELECT seq FROM seq_1_to_5000")
    assert cur.fetchone() == (1,)
    conn.close()  # neither exhausted nor closed: the session is mid-result
    with pool.connect() as conn:
        cur = conn.cursor()
        cur.execute("SELECT 42")
        assert cur.fetchone() == (42,)
        assert conn.thread_id() != tid
    assert pool.stats()["discarded"] == 1


def test_a_fresh_checkout_reads_as_a_fresh_connection(mariadb: MariaDB, pool: Any) -> None:
    plain = MySQLdb.connect(**mariadb.connect_kwargs())
    try:
        fresh = plain.affected_rows(), plain.insert_id()
        open_flags = plain.closed, plain.open
    finally:
        plain.close()
    closed_flags = plain.closed, plain.open
    conn = pool.connect()  # the pool's first connection: it read the server's limits on it
    assert (conn.affected_rows(), conn.insert_id()) == fresh == (0, 0)
    assert (conn.closed, conn.open) == open_flags
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mysqlclient >= 2.2.1 warns for ping(False)
        conn.ping()
    conn.close()
    assert (conn.closed, conn.open) == closed_flags
    with pytest.warns(DeprecationWarning, match="reconnect parameter"):
        conn.ping(True)  # as mysqlclient's: warns, and reopens through the pool
    assert conn.open and pool.stats()["opened"] == 1
    conn.close()


@pytest.mark.parametrize("database", ["app", None])
def test_the_session_reset_logs_in_as_the_same_account(mariadb: MariaDB,
                                                        database: Any) -> None:
    kwargs = mariadb.connect_kwargs(database=database)
    if database is None:
        del kwargs["database"]
    with connguard.Pool(driver="mysqldb", **kwargs, max_size=1) as p:
        with p.connect() as conn:
            tid = conn.thread_id()
            conn.cursor().execute("SET @v = 1")
        with p.connect() as conn:
            cur = conn.cursor()
            cur.execute("SELECT @v, DATABASE(), CURRENT_USER()")
            assert cur.fetchone() == (None, database, f"{kwargs['user']}@%")
            assert conn.thread_id() == tid
        assert (p.stats()["resets"], p.stats()["discarded"]) == (1, 0)


def test_an_account_from_an_option_file_is_never_guessed(mariadb: MariaDB,
                                                         tmp_path: Any) -> None:
    kwargs = mariadb.connect_kwargs()
    option_file = tmp_path / "my.cnf"
    option_file.write_text(f"[client]\nuser={kwargs['user']}\npassword={kwargs['password']}\n")
    with connguard.Pool(driver="mysqldb", host=kwargs["host"], port=kwargs["port"],
                        read_default_file=str(option_file), max_size=1) as p:
        with p.connect() as conn:
            tid = conn.thread_id()
            conn.cursor().execute("SET @v = 1")
        with p.connect() as conn:  # a new connection, not change_user to a guessed account
            cur = conn.cursor()
            cur.execute("SELECT @v")
            assert cur.fetchone() == (None,)
            assert conn.thread_id() != tid
        assert p.stats()["discarded"] == 1


def test_what_the_tracking_must_not_miss(mariadb: MariaDB) -> None:
    """Found by review: a BEGIN after a comment, a second account, the two-step statement,
    a server option: none of it reaches the next borrower."""
    with mariadb.admin() as admin:
        admin.execute("CREATE USER IF NOT EXISTS 'cg_second'@'%' IDENTIFIED BY 'pw2'")
        admin.execute("GRANT SELECT ON *.* TO 'cg_second'@'%'")
    kwargs = mariadb.connect_kwargs(autocommit=True)
    try:
        with connguard.Pool(driver="mysqldb", **kwargs, max_size=1) as p:
            for begin in ("/* app=web */ BEGIN", "-- tag\nSTART TRANSACTION", b"# x\nBEGIN"):
                with p.connect() as conn:
                    conn.cursor().execute(begin)
                    conn.cursor().execute("SELECT @@in_transaction")
                with p.connect() as conn:
                    cur = conn.cursor()
                    cur.execute("SELECT @@in_transaction")
                    assert cur.fetchone() == (0,), begin
            with p.connect() as conn:
                conn.change_user("cg_second", "pw2")
            with p.connect() as conn:
                cur = conn.cursor()
                cur.execute("SELECT CURRENT_USER()")
                assert cur.fetchone() == (f"{kwargs['user']}@%",)
            with p.connect() as conn:
                conn.send_query("SET @leak = 'x'")
                conn.read_query_result()
            with p.connect() as conn:
                cur = conn.cursor()
                cur.execute("SELECT @leak")
                assert cur.fetchone() == (None,)
                tid = conn.thread_id()
            with p.connect() as conn:
                conn.set_server_option(1)  # MYSQL_OPTION_MULTI_STATEMENTS_OFF (C enum)
            with p.connect() as conn:  # no reset undoes a server option: a new connection
                assert conn.thread_id() != tid
    finally:
        with mariadb.admin() as admin:
            admin.execute("DROP USER IF EXISTS 'cg_second'@'%'")


def test_an_interrupted_close_still_fails_uses_as_mysqlclient(pool: Any,
                                                               monkeypatch: Any) -> None:
    def interrupted(conn: Any, autocommit: bool) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(connguard.mysqldb, "_reset_and_reapply", interrupted)
    conn = pool.connect()
    conn.cursor().execute("SET @v = 1")  # the return must reset: interrupted there
    with pytest.raises(KeyboardInterrupt):
        conn.close()
    assert pool.stats()["in_use"] == 0 and pool.stats()["idle"] == 0
    assert hasattr(conn, "thread_id") and conn.open == 0  # as on a closed mysqlclient one
    with pytest.raises(MySQLdb.OperationalError):
        conn.thread_id()


def test_without_mysqlclient_the_error_says_what_to_install(monkeypatch: Any) -> None:
    # mysqlclient missing (an import of MySQLdb fails as it would): both ways in name the
    # extra to install instead of a bare "No module named 'MySQLdb'".
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    monkeypatch.delitem(sys.modules, "connguard.mysqldb")
    with pytest.raises(ModuleNotFoundError, match=r"connguard\[mysqlclient\]") as raised:
        connguard.install("MySQLdb")
    assert raised.value.name == "MySQLdb" and not connguard.installed("MySQLdb")
    with pytest.raises(ModuleNotFoundError, match=r"driver='mysqldb' needs the MySQLdb module"):
        connguard.Pool(host="127.0.0.1", port=1, user="app", driver="mysqldb")
