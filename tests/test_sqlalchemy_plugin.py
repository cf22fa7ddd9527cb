"""The SQLAlchemy engine plugin against a real MariaDB, through Core and the ORM Session.

Runs on SQLAlchemy 1.4 and 2.x (tox envs sqla14, sqla2): only APIs both have are used.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import traceback
import weakref
from typing import Any, Callable, Iterator, List

import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, declarative_base

import connguard
from connguard import sqlalchemy_plugin
from connguard.sqlalchemy_plugin import OPTION_NAMES, ConnGuardPluginWarning, stats
from tests.mariadb import APP_PASSWORD, MariaDB, socket_states, wait_until

pytestmark = pytest.mark.filterwarnings(
    # SQLAlchemy 1.4 warns about its own 2.0 migration on some legacy paths; not ours.
    "ignore::DeprecationWarning:sqlalchemy")

POOL_SIZE = 4
QUERIES = 200

Base: Any = declarative_base()


class Item(Base):
    __tablename__ = "cg_items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(50), nullable=False)


EngineFactory = Callable[..., sa.engine.Engine]


@pytest.fixture
def make_engine(mariadb: MariaDB) -> Iterator[EngineFactory]:
    """create_engine with the plugin on the module's server; every engine is disposed."""
    engines: List[sa.engine.Engine] = []

    def make(url: str = "", plugin: bool = True, **kwargs: Any) -> sa.engine.Engine:
        kwargs.setdefault("pool_size", POOL_SIZE)
        url = url or mariadb.url()
        if plugin and "plugins" not in kwargs:
            url += ("&" if "?" in url else "?") + "plugin=connguard"
        engine = sa.create_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()
    engines.clear()
    gc.collect()  # engines sit in reference cycles; the reaper holds them only weakly


def _fill_idle(engine: sa.engine.Engine, n: int) -> List[int]:
    """Check out n connections at once, return them: n idle in the pool; their thread ids."""
    conns = [engine.connect() for _ in range(n)]
    ids = [int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar()) for c in conns]
    for c in conns:
        c.close()
    return ids


def _kill_all(server: MariaDB, ids: List[int], wait_close_wait: bool) -> None:
    for tid in ids:
        server.kill(tid)
    if wait_close_wait:  # only when nothing else may close them (reaper off)
        wait_until(lambda: socket_states(server.port).get("close_wait", 0) >= len(ids), 30,
                   message=f"{len(ids)} sockets in CLOSE_WAIT after KILL")


def _core_query(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar())


def _orm_query(engine: sa.engine.Engine) -> int:
    with Session(engine) as session:
        session.add(Item(name="x"))
        session.commit()
        session.execute(sa.select(sa.func.count(Item.id))).scalar()
        return int(session.execute(sa.text("SELECT CONNECTION_ID()")).scalar())


@pytest.fixture
def items_table(mariadb: MariaDB) -> Iterator[None]:
    engine = sa.create_engine(mariadb.url())
    Base.metadata.create_all(engine)
    yield
    Base.metadata.drop_all(engine)
    engine.dispose()


def _run_queries(engine: sa.engine.Engine, query: Callable[[sa.engine.Engine], int],
                 killed: List[int]) -> List[BaseException]:
    failures: List[BaseException] = []
    for _ in range(QUERIES):
        try:
            assert query(engine) not in killed
        except Exception as exc:  # noqa: BLE001 - counted and shown by the caller
            failures.append(exc)
    return failures


# --- checkout: the peer-closed check replaces pre_ping ------------------------------------


@pytest.mark.parametrize("query", [_core_query, _orm_query], ids=["core", "orm"])
def test_killed_idle_connections_are_replaced_without_a_ping(
        mariadb: MariaDB, make_engine: EngineFactory, items_table: None,
        query: Callable[[sa.engine.Engine], int]) -> None:
    # Reaper off: every dead connection must be caught by the checkout check itself.
    engine = make_engine(connguard_reaper=False)
    killed = _fill_idle(engine, POOL_SIZE)
    _kill_all(mariadb, killed, wait_close_wait=True)
    pings_before = mariadb.status("Com_admin_commands")
    failures = _run_queries(engine, query, killed)
    assert not failures, failures[:3]
    assert mariadb.status("Com_admin_commands") == pings_before  # no COM_PING at all
    counts = stats(engine)
    assert counts["peer_closed"] == POOL_SIZE and counts["reaped"] == 0
    assert counts["checkouts"] >= QUERIES


def test_control_pre_ping_engine_pays_a_round_trip_per_checkout(
        mariadb: MariaDB, make_engine: EngineFactory) -> None:
    # The control for the test above: the counter it watches does move for pre_ping.
    engine = make_engine(plugin=False, pool_pre_ping=True)
    killed = _fill_idle(engine, POOL_SIZE)
    _kill_all(mariadb, killed, wait_close_wait=True)
    pings_before = mariadb.status("Com_admin_commands")
    failures = _run_queries(engine, _core_query, killed)
    assert not failures, failures[:3]
    assert mariadb.status("Com_admin_commands") - pings_before >= QUERIES // 2


def test_reaper_closes_dead_idle_connections_without_any_checkout(
        mariadb: MariaDB, make_engine: EngineFactory) -> None:
    engine = make_engine()
    killed = _fill_idle(engine, POOL_SIZE)
    _kill_all(mariadb, killed, wait_close_wait=False)
    # The bound is 2 s (reaper period 0.5 s); the deadline is generous for a loaded
    # machine, and the socket count is read from `ss`, not from connguard.
    wait_until(lambda: stats(engine)["reaped"] == POOL_SIZE, 30, message="reaper to close 4")
    assert socket_states(mariadb.port).get("close_wait", 0) == 0
    assert stats(engine)["peer_closed"] == 0  # nothing was left for a checkout to find
    assert _core_query(engine) not in killed  # the emptied records connect again


def test_idle_connections_are_closed_gracefully_after_idle_timeout(
        mariadb: MariaDB, make_engine: EngineFactory) -> None:
    engine = make_engine(connguard_idle_timeout=1)
    ids = _fill_idle(engine, 3)
    aborted_before = mariadb.status("Aborted_clients")
    wait_until(lambda: stats(engine)["idle_evicted"] == 3, 30, message="3 idle evictions")
    wait_until(lambda: not set(ids) & set(mariadb.app_threads()), 30,
               message="the server to see the evicted connections go")
    assert mariadb.status("Aborted_clients") == aborted_before  # COM_QUIT, not a timeout
    assert _core_query(engine) not in ids


def test_idle_timeout_is_derived_from_wait_timeout_unless_pool_recycle_is_set(
        mariadb_factory: Any) -> None:
    server = mariadb_factory(wait_timeout=10)
    derived = sa.create_engine(server.url() + "?plugin=connguard")
    managed = sa.create_engine(server.url() + "?plugin=connguard", pool_recycle=3600)
    try:
        for engine in (derived, managed):
            _core_query(engine)
        assert stats(derived)["wait_timeout"] == 10
        assert stats(derived)["idle_timeout"] == 9.0  # 10% margin, at least 1 s
        assert stats(managed)["idle_timeout"] is None
        assert managed.pool._recycle == 3600
    finally:
        derived.dispose()
        managed.dispose()


def test_without_the_reaper_pool_recycle_is_derived_instead(mariadb_factory: Any) -> None:
    server = mariadb_factory(wait_timeout=10)
    engine = sa.create_engine(server.url() + "?plugin=connguard&connguard_reaper=false")
    try:
        _core_query(engine)
        assert engine.pool._recycle == 9
        assert stats(engine)["reaper"] is False
    finally:
        engine.dispose()


# --- errors -------------------------------------------------------------------------------


def _kill_when_running(server: MariaDB, thread_id: int, failures: List[BaseException]) -> None:
    try:
        wait_until(lambda: server.query(
            "SELECT 1 FROM information_schema.processlist WHERE id = %s AND info LIKE %s",
            (thread_id, "SELECT SLEEP%")), 30, message="the query to start")
        server.kill(thread_id)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        failures.append(exc)


def test_kill_mid_query_gives_translated_orig_and_keeps_the_rest_of_the_pool(
        mariadb: MariaDB, make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=3)
    pooled = _fill_idle(engine, 3)
    killer_failures: List[BaseException] = []
    with engine.connect() as conn:
        victim = int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar())
        killer = threading.Thread(target=_kill_when_running,
                                  args=(mariadb, victim, killer_failures))
        killer.start()
        with pytest.raises(sa.exc.OperationalError) as info:
            conn.execute(sa.text("SELECT SLEEP(60)"))
        killer.join(60)
    assert not killer_failures, killer_failures
    error = info.value
    assert isinstance(error.orig, connguard.ConnectionLost)
    assert isinstance(error.orig, pymysql.err.OperationalError)
    assert error.connection_invalidated
    assert APP_PASSWORD not in str(error)
    # Only the killed connection was dropped (connguard_invalidate_pool is off): the two
    # others are still the same server sessions (SQLAlchemy alone would replace them too).
    assert set(_fill_idle(engine, 2)) == set(pooled) - {victim}
    counts = stats(engine)
    assert counts["translated"] >= 1 and counts["disconnects"] >= 1


def test_mariadb_4031_is_not_a_disconnect(mariadb: MariaDB, make_engine: EngineFactory) -> None:
    # MariaDB's 4031 is "referenced trigger does not exist"; MySQL's is the inactivity
    # disconnect. SQLAlchemy's dialect treats 4031 as a disconnect and drops the connection.
    mariadb.query("CREATE TABLE IF NOT EXISTS app.cg_trg (a INT)")
    statement = sa.text("CREATE TRIGGER cg_t2 BEFORE INSERT ON cg_trg FOR EACH ROW "
                        "FOLLOWS cg_missing SET NEW.a = 1")
    try:
        for plugin, invalidated in ((False, True), (True, False)):
            engine = make_engine(plugin=plugin, pool_size=1)
            with engine.connect() as conn:
                before = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
                with pytest.raises(sa.exc.DBAPIError) as info:
                    conn.execute(statement)
                assert info.value.orig.args[0] == 4031
                assert info.value.connection_invalidated is invalidated
            if plugin:
                assert _core_query(engine) == before  # the connection was kept
    finally:
        mariadb.query("DROP TABLE app.cg_trg")


def test_password_never_appears_in_logs_or_errors(
        mariadb_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = mariadb_factory()
    caplog.set_level(logging.DEBUG)
    engine = sa.create_engine(server.url() + "?plugin=connguard", pool_size=2,
                              echo_pool="debug")
    texts: List[str] = []
    try:
        killed = _fill_idle(engine, 2)
        _kill_all(server, killed, wait_close_wait=False)
        _core_query(engine)
        server.stop()
        with pytest.raises(sa.exc.OperationalError) as info:
            engine.dispose()
            _core_query(engine)
        texts += [str(info.value), repr(info.value.orig),
                  "".join(traceback.format_exception(type(info.value), info.value,
                                                     info.value.__traceback__))]
        assert isinstance(info.value.orig, connguard.ServerUnavailable)
        with pytest.raises(sa.exc.ArgumentError) as bad:
            sa.create_engine(server.url() + "?plugin=connguard&connguard_nope=1")
        texts += [str(bad.value), repr(engine), repr(stats(engine))]
    finally:
        engine.dispose()
    assert all(APP_PASSWORD not in text for text in texts)
    assert APP_PASSWORD not in caplog.text
    assert "Invalidate connection" in caplog.text  # the logs did cover the reconnects


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["url", "plugins"])
def test_plugin_is_enabled_by_url_or_plugins_argument(
        mariadb: MariaDB, make_engine: EngineFactory, how: str) -> None:
    if how == "url":
        engine = make_engine(mariadb.url() + "?connguard_reaper=false")
    else:
        engine = make_engine(plugins=["connguard"], connguard_reaper=False)
    assert "plugin" not in engine.url.query
    assert not [k for k in engine.url.query if k.startswith("connguard_")]
    _core_query(engine)
    counts = stats(engine)
    assert counts["support"] == "full" and counts["reaper"] is False
    assert counts["connects"] == 1 and counts["checkouts"] == 1


def test_stats_refuses_an_engine_without_the_plugin(make_engine: EngineFactory) -> None:
    with pytest.raises(ValueError, match="plugin=connguard"):
        stats(make_engine(plugin=False))


@pytest.mark.parametrize("url_query, kwargs, message", [
    ("connguard_max_size=3", {}, "unknown connguard plugin option connguard_max_size"),
    ("", {"connguard_reaperr": True}, "unknown connguard plugin option connguard_reaperr"),
    ("connguard_reaper=maybe", {}, "connguard_reaper must be true or false"),
    ("connguard_idle_timeout=-1", {}, "connguard_idle_timeout must be a number"),
    ("connguard_connect_burst=0", {}, "connguard_connect_burst must be an integer >= 1"),
    ("connguard_reaper=1", {"connguard_reaper": False}, "given both in the URL"),
], ids=["unknown-url", "unknown-kwarg", "bad-bool", "bad-number", "bad-storm", "conflict"])
def test_bad_plugin_options_are_rejected_clearly(
        mariadb: MariaDB, url_query: str, kwargs: Any, message: str) -> None:
    url = mariadb.url() + "?plugin=connguard" + (f"&{url_query}" if url_query else "")
    with pytest.raises(sa.exc.ArgumentError) as info:
        sa.create_engine(url, **kwargs)
    text = str(info.value)
    assert message in text
    if "unknown" in message:
        assert all(name in text for name in OPTION_NAMES)  # names the allowed ones
    assert APP_PASSWORD not in text


def test_other_mysql_drivers_get_a_warning_not_a_crash(mariadb: MariaDB) -> None:
    # mysqlclient is not installed here; the mysqldb dialect runs on PyMySQL's
    # MySQLdb-compatible module, which is enough to build the engine.
    url = mariadb.url("mysql+mysqldb") + "?plugin=connguard"
    with pytest.warns(ConnGuardPluginWarning, match="not PyMySQL"):
        engine = sa.create_engine(url, module=pymysql)
    assert stats(engine)["support"] == "partial"
    engine.dispose()


def test_non_mysql_databases_get_a_warning(tmp_path: Any) -> None:
    with pytest.warns(ConnGuardPluginWarning, match="does nothing"):
        engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db", plugins=["connguard"])
    assert stats(engine)["support"] == "none"
    engine.dispose()


# --- users' own listeners -----------------------------------------------------------------


def test_users_listeners_still_fire(mariadb: MariaDB, make_engine: EngineFactory) -> None:
    # A wrong password in the URL: the user's do_connect listener supplies the right one,
    # the way token-based authentication is usually done.
    url = mariadb.url().replace(APP_PASSWORD, "not-the-password")
    engine = make_engine(url, connguard_reaper=False)
    seen: List[str] = []

    @event.listens_for(engine, "do_connect")
    def provide_token(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        cparams["password"] = APP_PASSWORD
        seen.append("do_connect")

    for name in ("connect", "checkout", "checkin", "invalidate"):
        event.listen(engine, name, lambda *args, _name=name: seen.append(_name))

    killed = _fill_idle(engine, 2)
    _kill_all(mariadb, killed, wait_close_wait=True)
    assert _core_query(engine) not in killed
    assert {"do_connect", "connect", "checkout", "checkin", "invalidate"} <= set(seen)
    assert stats(engine)["connects"] == 3  # two at first, one after the kill


# --- lifecycle ----------------------------------------------------------------------------


def test_disposed_and_collected_engine_leaves_no_socket_and_nothing_behind(
        mariadb: MariaDB) -> None:
    engine = sa.create_engine(mariadb.url() + "?plugin=connguard", pool_size=3)
    _fill_idle(engine, 3)
    assert socket_states(mariadb.port).get("estab", 0) >= 3
    guard = weakref.ref(sqlalchemy_plugin._guards[engine.dialect])
    engine.dispose()
    assert not socket_states(mariadb.port).get("estab", 0)
    del engine
    gc.collect()
    # The reaper lets go of the guard within a pass once its engine is collected.
    wait_until(lambda: guard() is None, 30, message="the engine's guard to be freed")


def test_forked_child_never_uses_the_parents_connections(
        mariadb: MariaDB, make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=2)
    parent_ids = _fill_idle(engine, 2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the id it gets, then leave without cleanup
        code = 1
        try:
            os.write(write_end, str(_core_query(engine)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    child_id = int(os.read(read_end, 64).decode() or 0)
    os.close(read_end)
    assert os.WEXITSTATUS(status) == 0
    assert child_id not in parent_ids
    # The parent's sessions survived the child's exit: reused, nothing found dead.
    assert _core_query(engine) in parent_ids
    assert stats(engine)["peer_closed"] == 0


# --- saturation ---------------------------------------------------------------------------


def test_saturation_pool_larger_than_the_server_allows(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=16)
    engine = sa.create_engine(server.url() + "?plugin=connguard", pool_size=32,
                              max_overflow=32, pool_timeout=120)
    failures: List[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT SLEEP(0.01)"))
            except Exception as exc:  # noqa: BLE001 - counted below
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        engine.dispose()
    assert not failures, f"{len(failures)} application errors, first: {failures[:1]}"
