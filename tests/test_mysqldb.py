"""The SQLAlchemy plugin on ``mysql+mysqldb`` (mysqlclient) against a real MariaDB.

The same guarantees as for PyMySQL (tests/test_sqlalchemy_plugin.py): a KILLed idle
connection is replaced without a round trip, the reaper ends CLOSE_WAIT with no checkout,
1040/1135/99 come out translated (and still are mysqlclient's ``OperationalError``), an outage
is waited out through the storm gate, a forked child leaves the parent's sessions alone.

mysqlclient builds from Debian's ``libmariadb-dev`` and ``pkg-config``; ``.ci/run`` installs
them and sets ``CONNGUARD_REQUIRE_DRIVERS=1``, which turns a missing driver into a failure
rather than a skip.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import time
from typing import Any, Dict, Iterator, List

import pytest
import sqlalchemy as sa

from connguard.sqlalchemy_plugin import stats
from tests.forking import in_forked_child
from tests.mariadb import MariaDB, socket_states, wait_until
from tests.netns import run_in_netns
from tests.optional import optional
from tests.test_errors_real import DEADLINE, check, fill, raw_connections, report

MySQLdb = optional("MySQLdb", "pip install mysqlclient (needs libmariadb-dev, pkg-config)")

POOL_SIZE = 4


def engine_for(server: MariaDB, **kwargs: Any) -> sa.engine.Engine:
    kwargs.setdefault("pool_size", POOL_SIZE)
    return sa.create_engine(server.url("mysql+mysqldb") + "?plugin=connguard", **kwargs)


@contextlib.contextmanager
def engine_of(server: MariaDB, **kwargs: Any) -> Iterator[sa.engine.Engine]:
    engine = engine_for(server, **kwargs)
    try:
        yield engine
    finally:
        engine.dispose()
        gc.collect()  # the reaper holds engines weakly; cycles go with a gc pass


def fill_idle(engine: sa.engine.Engine, n: int) -> List[int]:
    conns = [engine.connect() for _ in range(n)]
    ids = [int(c.exec_driver_sql("SELECT CONNECTION_ID()").scalar()) for c in conns]
    for c in conns:
        c.close()
    return ids


def connection_id(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar())


def test_the_plugin_guards_mysqlclient_fully(mariadb: MariaDB) -> None:
    with engine_of(mariadb) as engine:
        assert connection_id(engine) > 0
        assert stats(engine)["support"] == "full" and stats(engine)["reaper"] is True


def test_killed_idle_connections_are_replaced_without_a_ping(mariadb: MariaDB) -> None:
    with engine_of(mariadb, connguard_reaper=False) as engine:
        killed = fill_idle(engine, POOL_SIZE)
        for tid in killed:
            mariadb.kill(tid)
        wait_until(lambda: socket_states(mariadb.port).get("close_wait", 0) >= POOL_SIZE,
                   DEADLINE, message=f"{POOL_SIZE} sockets in CLOSE_WAIT after KILL")
        pings_before = mariadb.status("Com_admin_commands")
        failures = []
        for _ in range(200):
            try:
                assert connection_id(engine) not in killed
            except Exception as exc:  # noqa: BLE001 - counted below
                failures.append(exc)
        assert not failures, failures[:3]
        assert mariadb.status("Com_admin_commands") == pings_before  # no COM_PING
        assert stats(engine)["peer_closed"] == POOL_SIZE


def test_the_reaper_ends_close_wait_without_a_checkout(mariadb: MariaDB) -> None:
    with engine_of(mariadb) as engine:
        killed = fill_idle(engine, POOL_SIZE)
        for tid in killed:
            mariadb.kill(tid)
        wait_until(lambda: stats(engine)["reaped"] == POOL_SIZE, DEADLINE,
                   message="the reaper to close the 4 killed connections")
        assert socket_states(mariadb.port).get("close_wait", 0) == 0
        assert stats(engine)["peer_closed"] == 0
        assert connection_id(engine) not in killed


def refusal_through(engine: sa.engine.Engine) -> BaseException:
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    assert isinstance(info.value.orig, MySQLdb.OperationalError)  # still mysqlclient's
    return info.value.orig


def check_mysqldb(rep: Dict[str, Any], cls: str, code: Any, first_has: List[str]) -> None:
    """tests.test_errors_real.check (class, transient, code, message, no password), and the
    error still is mysqlclient's."""
    if isinstance(code, tuple):
        assert rep["args"][0] in code, rep["args"]
        code = None
    check(rep, cls, transient=True, code=code, first_has=first_has)
    assert any(c.startswith("MySQLdb") and c.endswith(".OperationalError") for c in rep["classes"])


def test_1040_comes_out_translated(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=10)
    with raw_connections() as held, engine_of(server, pool_timeout=1) as engine:
        assert fill(server, held).args[0] == 1040
        err = refusal_through(engine)
    check_mysqldb(report(err), "TooManyConnections", 1040,
                  [f"too many connections to 127.0.0.1:{server.port}"])


def test_1135_comes_out_translated(mariadb_factory: Any) -> None:
    server = mariadb_factory(nproc_headroom=60)
    with raw_connections() as held, engine_of(server, pool_timeout=1) as engine:
        assert fill(server, held, limit=500).args[0] == 1135
        err = refusal_through(engine)
    check_mysqldb(report(err), "ServerThreadLimit", 1135,
                  ["cannot create a thread", "server errno 11 EAGAIN"])


PORTS = (40000, 40007)


def netns_ports_body(server: MariaDB, ports: int) -> Dict[str, Any]:
    """In the namespace: hold mysqlclient connections until no local port is left."""
    held = []
    engine = sa.create_engine(server.url("mysql+mysqldb") + "?plugin=connguard"
                              "&connguard_resource_guard=false", pool_size=1, pool_timeout=1)
    try:
        for _ in range(ports):
            held.append(MySQLdb.connect(**_mysqldb_kwargs(server)))
        return report(refusal_through(engine))
    finally:
        for conn in held:
            conn.close()
        engine.dispose()


def _mysqldb_kwargs(server: MariaDB) -> Dict[str, Any]:
    kwargs = server.connect_kwargs()
    return {"host": kwargs["host"], "port": kwargs["port"], "user": kwargs["user"],
            "passwd": kwargs["password"], "db": kwargs["database"]}


@pytest.mark.netns
def test_99_local_ports_exhausted_comes_out_translated(mariadb_template: Any) -> None:
    ports = PORTS[1] - PORTS[0] + 1
    rep = run_in_netns("tests.test_mysqldb:netns_ports_body", mariadb_template,
                       port_range=PORTS, tw_reuse=0, server_options={},
                       kwargs={"ports": ports})
    check_mysqldb(rep, "LocalPortsExhausted", (2002, 2003), [f"{ports} of {ports} in use"])
    assert rep["diagnosis"]["errno"] == errno.EADDRNOTAVAIL


def test_an_outage_is_waited_out_and_named(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    with engine_of(server, pool_timeout=1) as engine:
        assert connection_id(engine) > 0
        server.kill_app_connections()
        server.stop()
        rep = report(refusal_through(engine))
        check_mysqldb(rep, "ServerUnavailable", (2002, 2003),
                      [f"cannot reach the MySQL server at 127.0.0.1:{server.port}"])
        assert "EINPROGRESS" not in rep["str"]  # libmariadb's errno of a refusal: not shown
        assert stats(engine)["breaker"] == "open"
        server.start()
        wait_until(lambda: _serves(engine), DEADLINE, message="the engine to serve again")
        assert stats(engine)["breaker"] == "closed"


def _serves(engine: sa.engine.Engine) -> bool:
    try:
        return connection_id(engine) > 0
    except sa.exc.OperationalError:
        return False


def test_a_forked_child_leaves_the_parents_sessions_alone(mariadb: MariaDB) -> None:
    with engine_of(mariadb) as engine:
        parent_ids = fill_idle(engine, 2)

        def child() -> int:
            engine.dispose(close=False)  # SQLAlchemy's advice; connguard drops the rest
            gc.collect()  # mysqlclient's finalizer would send COM_QUIT on a shared socket
            return connection_id(engine)

        child_id = in_forked_child(child)
        assert child_id not in parent_ids
        wait_until(lambda: child_id not in mariadb.app_threads(), DEADLINE,
                   message="the child's own session to end")
        assert set(parent_ids) <= set(mariadb.app_threads())  # the parent's sessions live on
        with engine.connect() as conn:  # and answer
            assert int(conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()) in parent_ids


def test_a_reused_descriptor_number_is_never_polled_or_replaced(mariadb: MariaDB,
                                                                 tmp_path: Any) -> None:
    # libmysqlclient keeps a lost connection's descriptor number after the descriptor is
    # gone; the number may then name another file, which must be left alone.
    from connguard import dbapis

    with engine_of(mariadb) as engine:
        facts = dbapis.facts_for(engine.dialect)
        assert facts is not None
        conn = MySQLdb.connect(**_mysqldb_kwargs(mariadb))
        facts.connected(conn)
        assert facts.pollable(conn) is conn
        fd = conn.fileno()
        os.close(fd)  # as after a lost connection: the number is free
        other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)
        try:
            assert other == fd  # the lowest free number: the connection's old one
            assert facts.pollable(conn) is None  # dead, not "whatever that file says"
            facts.drop_inherited(conn)
            assert os.fstat(other).st_ino == os.stat(tmp_path / "other").st_ino  # untouched
        finally:
            os.close(other)
        conn.close()


def test_a_full_server_means_waits_not_errors(mariadb_factory: Any) -> None:
    """The guarded pool on mysqlclient: a pool larger than the server allows learns the
    ceiling from the refusal and callers wait for returns instead of getting 1040."""
    from tests.test_sqlalchemy_plugin import engine_load, run_for

    server = mariadb_factory(max_connections=10)
    with engine_of(server, pool_size=16, max_overflow=16, pool_timeout=30) as engine:
        load = engine_load(engine, threads=32, sql="SELECT SLEEP(0.005)").start()
        try:
            wait_until(lambda: stats(engine)["ceiling"] is not None, DEADLINE,
                       message="the server to refuse a connection")
            run_for(2)
        finally:
            load.stop()
        counts = stats(engine)
    assert not load.errors, f"{len(load.errors)} application errors: {load.errors[:1]}"
    assert counts["ceiling"] <= 10 and counts["capacity_waits"] >= 1
    assert load.ok_rate(0, time.monotonic()) > 0
