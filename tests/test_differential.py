"""Connect arguments as applications write them: connguard agrees with the plain driver.

Each case is a set of ``pymysql.connect`` (or ``MySQLdb.connect``) arguments with common
values, alone and in the usual pairs. The same statements run on a connection opened by the
plain driver and on one from connguard (``connect()``, ``Pool``, ``install()``, the SQLAlchemy
plugin), once fresh and once reused: the first borrower leaves an uncommitted write and
session state behind and gives the connection back, the second borrower gets the same server
session again. What both see must be the same: result row types and values, session
variables, rowcount, autocommit, whether the earlier write is visible, warnings, errors.

The referee for the second borrower is what the driver itself gives after the first closed
its connection: a fresh session. For the plugin the referee is the same engine without the
plugin (SQLAlchemy's pool reuses sessions too; the plugin must not change what it shows).
"""

from __future__ import annotations

import decimal
import gc
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pymysql
import pymysql.converters
import pymysql.cursors
import pytest
import sqlalchemy as sa
from pymysql.constants import CLIENT, FIELD_TYPE

import connguard
from connguard import dropin
from tests.mariadb import MariaDB
from tests.optional import optional

TABLE = "app.t_diff"
MARK = 99  # the value the first borrower writes and never commits

# Result types a connection's arguments change: integers, text, NULL, dates, binary strings,
# floats (conv, use_unicode, binary_prefix, charset all show here).
VALUES_SQL = ("SELECT 1 AS i, 'caf\u00e9' AS s, NULL AS n, DATE '2024-01-02' AS dt, "
              "x'00ff' AS b, 2.5e0 AS f, 12345678901 AS big")
# Decimals apart: PyMySQL with use_unicode=False cannot convert them (Decimal(bytes) raises
# mid-result and the connection is lost), so that case does not ask.
DECIMAL_SQL = "SELECT CAST(1.5 AS DECIMAL(3,1)) AS d"
# Session state the arguments establish and a borrower can change.
SESSION_SQL = ("SELECT DATABASE() AS db, @@autocommit AS ac, @@sql_mode AS mode, "
               "@@character_set_client AS cs_client, @@character_set_results AS cs_results, "
               "@@collation_connection AS coll, @@time_zone AS tz, @v AS v, @init AS init, "
               "@@session.wait_timeout AS wt")
SEEN_SQL = f"SELECT COUNT(*) AS seen FROM {TABLE} WHERE v = {MARK}"
UPDATE_SQL = f"UPDATE {TABLE} SET v = v WHERE id IN (1, 2)"  # matched 2, changed 0


def _conv() -> Dict[Any, Any]:
    """A custom ``conv`` as applications write one: decimals as floats, big ints as text."""
    conv = dict(pymysql.converters.conversions)
    conv[FIELD_TYPE.NEWDECIMAL] = float
    conv[FIELD_TYPE.DECIMAL] = float
    conv[FIELD_TYPE.LONGLONG] = str
    return conv


DICT = pymysql.cursors.DictCursor
SS = pymysql.cursors.SSCursor
SSDICT = pymysql.cursors.SSDictCursor

#: id -> pymysql.connect arguments (beyond host, port, user, password, database).
PYMYSQL_CASES: Dict[str, Dict[str, Any]] = {
    "defaults": {},
    "DictCursor": {"cursorclass": DICT},
    "SSCursor": {"cursorclass": SS},
    "SSDictCursor": {"cursorclass": SSDICT},
    "autocommit=True": {"autocommit": True},
    "autocommit=False": {"autocommit": False},
    "init_command": {"init_command": "SET @init = 42"},
    "sql_mode": {"sql_mode": "ANSI_QUOTES,STRICT_TRANS_TABLES"},
    "conv": {"conv": _conv()},
    "use_unicode=False": {"use_unicode": False},
    "binary_prefix": {"binary_prefix": True},
    "FOUND_ROWS": {"client_flag": CLIENT.FOUND_ROWS},
    "utf8mb4": {"charset": "utf8mb4"},
    "latin1": {"charset": "latin1"},
    "timeouts": {"read_timeout": 30, "write_timeout": 30, "connect_timeout": 5},
    "db+passwd aliases": {"db": "app", "passwd": None},  # password moved to passwd below
    # the usual pairs
    "DictCursor+autocommit": {"cursorclass": DICT, "autocommit": True},
    "DictCursor+init_command": {"cursorclass": DICT, "init_command": "SET @init = 7"},
    "DictCursor+use_unicode=False": {"cursorclass": DICT, "use_unicode": False},
    "DictCursor+conv": {"cursorclass": DICT, "conv": _conv()},
    "DictCursor+utf8mb4": {"cursorclass": DICT, "charset": "utf8mb4"},
    "SSDictCursor+autocommit": {"cursorclass": SSDICT, "autocommit": True},
    "SSCursor+init_command": {"cursorclass": SS, "init_command": "SET @init = 3"},
    "autocommit+init_command": {"autocommit": True, "init_command": "SET @init = 5"},
    "autocommit+FOUND_ROWS": {"autocommit": True, "client_flag": CLIENT.FOUND_ROWS},
    "sql_mode+init_command": {"sql_mode": "TRADITIONAL", "init_command": "SET @init = 9"},
    "latin1+use_unicode=False": {"charset": "latin1", "use_unicode": False},
    "use_unicode=False+conv": {"use_unicode": False, "conv": _conv()},
    "binary_prefix+utf8mb4": {"binary_prefix": True, "charset": "utf8mb4"},
    "NO_BACKSLASH_ESCAPES+DictCursor": {"sql_mode": "NO_BACKSLASH_ESCAPES", "cursorclass": DICT},
}

#: id -> MySQLdb.connect arguments, for install("MySQLdb").
MYSQLDB_CASES: Dict[str, Dict[str, Any]] = {
    "defaults": {},
    "DictCursor": {"cursorclass": "DictCursor"},
    "SSCursor": {"cursorclass": "SSCursor"},
    "autocommit=True": {"autocommit": True},
    "init_command": {"init_command": "SET @init = 42"},
    "charset=utf8mb4": {"charset": "utf8mb4"},
    "charset=latin1": {"charset": "latin1"},
    "use_unicode=False": {"use_unicode": False},
    "DictCursor+autocommit": {"cursorclass": "DictCursor", "autocommit": True},
    "DictCursor+init_command": {"cursorclass": "DictCursor", "init_command": "SET @init = 7"},
    "sql_mode": {"sql_mode": "ANSI_QUOTES"},
}

MODES = ("connect", "Pool", "install", "plugin")


# -- what a borrower sees ------------------------------------------------------------------
def _decodes_decimals(conn: Any) -> bool:
    """Whether a custom ``conv`` decodes decimals (then bytes are fine)."""
    return conn.decoders.get(FIELD_TYPE.NEWDECIMAL) is not decimal.Decimal


def _error(exc: BaseException) -> Tuple[str, ...]:
    """An error as the caller catches it: the driver's class it derives from, and its code."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith(("pymysql", "MySQLdb")):
            return ("error", cls.__name__, str(exc.args[0]) if exc.args else "")
    return ("error", type(exc).__name__)


def _shown(value: Any) -> Any:
    """A value with its type (1 and 1.0 and '1' and b'1' differ); rows as their container."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _shown(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_shown(v) for v in value))
    if isinstance(value, decimal.Decimal):
        return ("Decimal", str(value))
    return (type(value).__name__, repr(value))


def _run(cur: Any, sql: str) -> Any:
    try:
        cur.execute(sql)
        rows = cur.fetchall()
        return ("rows", cur.rowcount, _shown(rows), [d[0] for d in cur.description or ()])
    except Exception as exc:  # noqa: BLE001 - an error is an outcome to compare
        return _error(exc)


def observe(conn: Any, driver: str = "pymysql") -> Dict[str, Any]:
    """Everything the borrower of ``conn`` sees, from the same statements every time."""
    seen: Dict[str, Any] = {}
    cur = conn.cursor()
    seen["cursor"] = type(cur).__name__.replace("Pooled", "")
    try:
        for name, sql in (("values", VALUES_SQL), ("session", SESSION_SQL), ("seen", SEEN_SQL)):
            seen[name] = _run(cur, sql)
        if driver != "pymysql" or conn.use_unicode or _decodes_decimals(conn):
            seen["decimal"] = _run(cur, DECIMAL_SQL)
        try:
            cur.execute(UPDATE_SQL)
            seen["rowcount"] = cur.rowcount
        except Exception as exc:  # noqa: BLE001
            seen["rowcount"] = _error(exc)
    finally:
        cur.close()
    seen["autocommit"] = bool(conn.get_autocommit())
    if driver == "pymysql":
        seen["client"] = (conn.charset, conn.encoding, conn.use_unicode, conn.affected_rows())
    else:
        seen["client"] = (conn.character_set_name(),)
    return seen


def dirty(conn: Any) -> None:
    """What a careless first borrower leaves: an uncommitted write and session state."""
    cur = conn.cursor()
    try:
        cur.execute(f"INSERT INTO {TABLE} (v) VALUES ({MARK})")
        cur.execute("SET @v = 1, time_zone = '+05:00'")
    finally:
        cur.close()


Opener = Callable[[], Any]


def borrow_twice(open_conn: Opener, driver: str = "pymysql") -> Dict[str, Any]:
    """Observe a fresh connection, dirty it, give it back; then observe the next one.
    The outcome of a failing connect or statement is recorded, not raised."""
    outcome: Dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for turn in ("fresh", "reused"):
            try:
                conn = open_conn()
            except Exception as exc:  # noqa: BLE001
                outcome[turn] = _error(exc)
                continue
            try:
                outcome[turn] = observe(conn, driver)
                outcome[f"{turn}_thread"] = conn.thread_id()
                if turn == "fresh":
                    dirty(conn)
            except Exception as exc:  # noqa: BLE001
                outcome[turn] = ("failed during use", _error(exc))
            finally:
                conn.close()
    outcome["warnings"] = sorted({(w.category.__name__, str(w.message)) for w in caught})
    return outcome


# -- the server and the table ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(mariadb: MariaDB) -> Iterator[MariaDB]:
    mariadb.query(f"DROP TABLE IF EXISTS {TABLE}")
    mariadb.query(f"CREATE TABLE {TABLE} (id INT AUTO_INCREMENT PRIMARY KEY, v INT) "
                  "ENGINE=InnoDB")
    mariadb.query(f"INSERT INTO {TABLE} (v) VALUES (1), (2)")
    yield mariadb
    mariadb.query(f"DROP TABLE IF EXISTS {TABLE}")


def _clean(server: MariaDB) -> None:
    """What the first borrower committed (autocommit on) is removed before the next run."""
    server.query(f"DELETE FROM {TABLE} WHERE v = {MARK}")


def _pymysql_kwargs(server: MariaDB, case: str) -> Dict[str, Any]:
    extra = dict(PYMYSQL_CASES[case])
    kwargs = server.connect_kwargs(**extra)
    if "db" in extra:  # the aliases: as older code writes them
        del kwargs["database"]
    if "passwd" in extra:
        kwargs["passwd"] = kwargs.pop("password")
    return kwargs


_references: Dict[Tuple[str, str], Dict[str, Any]] = {}


def _reference(server: MariaDB, key: Tuple[str, str], run: Callable[[], Dict[str, Any]]
               ) -> Dict[str, Any]:
    """The plain driver's outcome for a case, computed once for all modes."""
    if key not in _references:
        _clean(server)
        _references[key] = run()
        _clean(server)
    return _references[key]


def _differences(reference: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    """What connguard's borrowers saw that the plain driver's did not, one line each."""
    lines = []
    for turn in ("fresh", "reused", "warnings", "finalizers"):
        plain, got = reference.get(turn), ours.get(turn)
        if isinstance(plain, dict) and isinstance(got, dict):
            lines += [f"{turn} {key}: plain {plain.get(key)!r}, connguard {got.get(key)!r}"
                      for key in sorted(set(plain) | set(got)) if plain.get(key) != got.get(key)]
        elif plain != got:
            lines.append(f"{turn}: plain {plain!r}, connguard {got!r}")
    if isinstance(reference.get("fresh"), dict) and (
            ours.get("reused_thread") != ours.get("fresh_thread")):
        lines.append("the second borrower got a new session")  # a healthy one is reused
    return lines


def _compared(reference: Dict[str, Any], ours: Dict[str, Any]) -> None:
    differences = _differences(reference, ours)
    if differences:
        pytest.fail("\n".join(differences), pytrace=False)


# -- PyMySQL's arguments through connect(), Pool, install() and the plugin -------------------------
def _connguard_run(server: MariaDB, mode: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if mode == "connect":
        try:
            return borrow_twice(lambda: connguard.connect(**kwargs))
        finally:
            dropin.close_all()
    if mode == "Pool":
        pools: List[connguard.Pool] = []

        def from_pool() -> Any:
            if not pools:
                pools.append(connguard.Pool(**kwargs))
            return pools[0].connect()

        try:
            return borrow_twice(from_pool)
        finally:
            for pool in pools:
                pool.close()
    assert mode == "install"
    connguard.install()
    try:
        return borrow_twice(lambda: pymysql.connect(**kwargs))
    finally:
        connguard.uninstall()
        dropin.close_all()


def _engine_run(server: MariaDB, kwargs: Dict[str, Any], plugin: bool) -> Dict[str, Any]:
    """borrow_twice through an engine's pool (``raw_connection()``), the case's arguments as
    ``connect_args``: with the plugin, or plain SQLAlchemy (the referee)."""
    connect_args = {k: v for k, v in kwargs.items()
                    if k not in ("host", "port", "user", "password", "database")}
    url = server.url() + ("?plugin=connguard" if plugin else "")
    engines: List[sa.engine.Engine] = []

    def raw() -> Any:
        if not engines:
            engines.append(sa.create_engine(url, connect_args=connect_args, pool_size=1))
        return engines[0].raw_connection()

    try:
        outcome = borrow_twice(raw)
    finally:
        for engine in engines:
            engine.dispose()
    outcome["finalizers"] = _finalizer_errors()
    return outcome


def _finalizer_errors() -> List[str]:
    """What finalizers raised when the garbage of a run was collected. SQLAlchemy with an
    unbuffered cursor class leaves PyMySQL results whose ``__del__`` reads a closed
    connection: compared as an outcome here, not left to break a later test."""
    seen: List[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda raised: seen.append(type(raised.exc_value).__name__)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    return sorted(set(seen))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(PYMYSQL_CASES))
def test_pymysql_arguments_agree(server: MariaDB, case: str, mode: str) -> None:
    kwargs = _pymysql_kwargs(server, case)
    if mode == "plugin":
        if "passwd" in kwargs or "db" in kwargs:  # the URL names them: not connect_args
            kwargs = server.connect_kwargs()
        reference = _reference(server, ("sqlalchemy", case),
                               lambda: _engine_run(server, kwargs, plugin=False))
        _clean(server)
        try:
            ours = _engine_run(server, kwargs, plugin=True)
        finally:
            _clean(server)
        _compared(reference, ours)
        return
    reference = _reference(server, ("pymysql", case),
                           lambda: borrow_twice(lambda: pymysql.connect(**kwargs)))
    _clean(server)
    try:
        ours = _connguard_run(server, mode, kwargs)
    finally:
        _clean(server)
    _compared(reference, ours)


# -- mysqlclient's arguments through install("MySQLdb") ------------------------------------------
def _mysqldb_kwargs(server: MariaDB, case: str, mysqldb: Any) -> Dict[str, Any]:
    extra = dict(MYSQLDB_CASES[case])
    if isinstance(extra.get("cursorclass"), str):
        extra["cursorclass"] = getattr(mysqldb.cursors, extra["cursorclass"])
    return server.connect_kwargs(**extra)


@pytest.mark.parametrize("case", list(MYSQLDB_CASES))
def test_mysqldb_arguments_agree(server: MariaDB, case: str) -> None:
    mysqldb = optional("MySQLdb", "pip install 'connguard[mysqlclient]'")
    import MySQLdb.cursors  # noqa: F401 - the cursor classes a case names

    kwargs = _mysqldb_kwargs(server, case, mysqldb)
    plain = mysqldb.connect
    reference = _reference(server, ("mysqldb", case),
                           lambda: borrow_twice(lambda: plain(**kwargs), "mysqldb"))
    _clean(server)
    connguard.install("MySQLdb")
    try:
        ours = borrow_twice(lambda: mysqldb.connect(**kwargs), "mysqldb")
    finally:
        connguard.uninstall()
        dropin.close_all()
        _clean(server)
    _compared(reference, ours)


def test_the_cases_differ(server: MariaDB) -> None:
    """The comparison can fail: arguments that change what a borrower sees show in it."""
    base = _reference(server, ("pymysql", "defaults"),
                      lambda: borrow_twice(lambda: pymysql.connect(**server.connect_kwargs())))
    for case in ("DictCursor", "conv", "use_unicode=False", "FOUND_ROWS", "autocommit=True"):
        kwargs = _pymysql_kwargs(server, case)
        other = _reference(server, ("pymysql", case),
                           lambda kw=kwargs: borrow_twice(lambda: pymysql.connect(**kw)))
        assert other["fresh"] != base["fresh"], case



# -- connguard's own reads, whatever the connection's arguments ------------------------------------
# A failed internal read is not always visible to a borrower (the plugin then does without
# the server's wait_timeout): asked directly here.
READ_CASES = ("defaults", "DictCursor", "SSDictCursor", "use_unicode=False", "conv",
              "use_unicode=False+conv", "DictCursor+conv", "NO_BACKSLASH_ESCAPES+DictCursor")


def _server_wait_timeout(server: MariaDB) -> int:
    return int(server.query("SELECT @@GLOBAL.wait_timeout")[0][0])


@pytest.mark.parametrize("case", READ_CASES)
def test_internal_reads_ignore_the_connections_arguments(server: MariaDB, case: str) -> None:
    from connguard import driver
    from connguard.sqlalchemy_plugin import guard_of

    kwargs = _pymysql_kwargs(server, case)
    wait_timeout = _server_wait_timeout(server)
    pool = connguard.Pool(**kwargs)
    try:
        with pool.connect():
            pass
        assert pool._wait_timeout == wait_timeout  # what the first connect read
        assert pool._server_limits["max_connections"] > 0
        with pool.connect() as conn:  # and on a borrowed connection, which it must not change
            capacity = driver.server_capacity(conn.__wrapped__, timeout=5.0)
            assert capacity["max_connections"] > 0 and capacity["threads_connected"] >= 1
            assert type(conn.cursor()).__name__.endswith(
                kwargs.get("cursorclass", pymysql.cursors.Cursor).__name__)
    finally:
        pool.close()
    connect_args = {k: v for k, v in kwargs.items()
                    if k not in ("host", "port", "user", "password", "database")}
    # The plugin reads wait_timeout on each engine's first connection. SQLAlchemy's own
    # first queries fail with a dict cursor class before that, so it is asked directly.
    engine = sa.create_engine(server.url() + "?plugin=connguard", connect_args=connect_args)
    conn = pymysql.connect(**kwargs)
    try:
        guard = guard_of(engine)
        assert guard is not None and guard.wait_timeout is None
        guard.idle.learn_wait_timeout(conn, partial=False)
        assert guard.wait_timeout == wait_timeout
    finally:
        conn.close()
        engine.dispose()


@pytest.mark.parametrize("case", ("defaults", "DictCursor", "use_unicode=False", "conv"))
def test_mysqldb_limits_ignore_the_connections_arguments(server: MariaDB, case: str) -> None:
    mysqldb = optional("MySQLdb", "pip install 'connguard[mysqlclient]'")
    import MySQLdb.cursors  # noqa: F401

    from connguard import mysqldb as seam

    extra = dict(MYSQLDB_CASES.get(case, {}))
    if case == "conv":
        conv = dict(mysqldb.converters.conversions)
        conv[mysqldb.constants.FIELD_TYPE.LONGLONG] = str
        extra = {"conv": conv}
    if isinstance(extra.get("cursorclass"), str):
        extra["cursorclass"] = getattr(mysqldb.cursors, extra["cursorclass"])
    conn = seam.open_connection(server.connect_kwargs(**extra))
    try:
        limits = seam.server_limits(conn)
    finally:
        seam.close_gracefully(conn)
    assert limits["wait_timeout"] == _server_wait_timeout(server)


def test_limits_from_row_reads_bytes_text_and_numbers() -> None:
    from connguard import driver

    row = (b"28800", "151", decimal.Decimal(0), None)
    assert driver.limits_from_row(row) == {"wait_timeout": 28800, "max_connections": 151,
                                           "max_user_connections": 0}
    assert driver.limits_from_row(("b'1'", 2.0)) == {"max_connections": 2}  # junk left out
    assert driver.limits_from_row(None) == {}
