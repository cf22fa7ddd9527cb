"""The harness itself: each failure mode it promises is reproduced against a real mariadbd."""

from __future__ import annotations

import errno
import gc
import socket
import warnings
from typing import Any, Dict, List

import pymysql
import pytest

from tests.mariadb import APP_PASSWORD, MariaDB, socket_states, wait_until
from tests.netns import run_in_netns


def _connect_errno(exc: pymysql.err.OperationalError) -> Any:
    original = getattr(exc, "original_exception", None)
    return getattr(original, "errno", None)


def test_server_options_are_visible(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=17, wait_timeout=33, max_connect_errors=5)
    assert server.variable("max_connections") == "17"
    assert server.variable("wait_timeout") == "33"
    assert server.variable("max_connect_errors") == "5"
    assert server.start_seconds is not None and server.start_seconds < 30


def test_app_user_connects_with_password(mariadb: MariaDB) -> None:
    conn = pymysql.connect(**mariadb.connect_kwargs())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), DATABASE()")
            user, database = cur.fetchone()
        assert user.startswith("app@")
        assert database == "app"
    finally:
        conn.close()
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(**mariadb.connect_kwargs(password=APP_PASSWORD + "x"))
    assert info.value.args[0] == 1045


def test_restart_keeps_port(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    port = server.port
    server.stop()
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(**server.connect_kwargs(connect_timeout=2))
    assert info.value.args[0] == 2003
    assert _connect_errno(info.value) == errno.ECONNREFUSED
    server.start()
    assert server.port == port
    pymysql.connect(**server.connect_kwargs()).close()


def test_kill_leaves_client_socket_in_close_wait(mariadb: MariaDB) -> None:
    conn = pymysql.connect(**mariadb.connect_kwargs())
    try:
        mariadb.kill(conn.thread_id())
        wait_until(lambda: socket_states(mariadb.port).get("close_wait") == 1, 30,
                   message="the killed connection's socket to reach CLOSE_WAIT")
    finally:
        conn.close()
    wait_until(lambda: not socket_states(mariadb.port).get("close_wait"), 30,
               message="CLOSE_WAIT to clear after close()")


def test_nproc_limit_gives_1135(mariadb_factory: Any) -> None:
    # Headroom for the server's own background threads plus a handful of connections;
    # each connection costs one thread with thread_handling=one-thread-per-connection.
    server = mariadb_factory(nproc_headroom=40)
    conns: List[pymysql.connections.Connection] = []
    failure = None
    try:
        for _ in range(100):
            try:
                conns.append(pymysql.connect(**server.connect_kwargs()))
            except pymysql.err.OperationalError as exc:
                failure = exc
                break
        assert failure is not None, "100 connections under a 40-thread headroom all succeeded"
        assert failure.args[0] == 1135, failure.args
        assert "Can't create a new thread" in failure.args[1]
        assert 0 < len(conns) < 40
    finally:
        for conn in conns:
            conn.close()


def test_frozen_server_fills_unix_backlog_with_errno_11(mariadb_factory: Any) -> None:
    server = mariadb_factory(back_log=2)
    pending: List[socket.socket] = []
    server.freeze()
    try:
        first_error = None
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            pending.append(sock)
            try:
                sock.connect(server.socket_path)
            except OSError as exc:
                first_error = exc
                break
        assert first_error is not None and first_error.errno == errno.EAGAIN
        assert len(pending) <= 10  # the backlog of 2 (+ kernel slack) filled, not 50
        assert _connect_errno(_failed_unix_connect(server)) == errno.EAGAIN
    finally:
        for sock in pending:
            sock.close()
        server.thaw()
    pymysql.connect(**server.connect_kwargs()).close()


def _failed_unix_connect(server: MariaDB) -> pymysql.err.OperationalError:
    """Connect through PyMySQL expecting failure; collect the unix socket PyMySQL leaks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # PyMySQL's leak, not ours
        try:
            pymysql.connect(unix_socket=server.socket_path, user="app",
                            password=APP_PASSWORD, connect_timeout=2)
        except pymysql.err.OperationalError as exc:
            failure = exc
        else:
            raise AssertionError("connect through a full backlog succeeded")
        for exc in (failure, failure.__context__, failure.__cause__,
                    getattr(failure, "original_exception", None)):
            if exc is not None:
                exc.__traceback__ = None  # the frames hold PyMySQL's unclosed socket
        gc.collect()
    return failure


def errno99_body(server: MariaDB, ports: int) -> Dict[str, Any]:
    """Inside the namespace: hold connections until the kernel runs out of local ports."""
    held = []
    result: Dict[str, Any] = {"opened": 0, "errno": None, "code": None}
    try:
        for _ in range(ports + 5):
            try:
                held.append(pymysql.connect(**server.connect_kwargs()))
            except pymysql.err.OperationalError as exc:
                result["code"] = exc.args[0]
                result["errno"] = _connect_errno(exc)
                break
        result["opened"] = len(held)
    finally:
        for conn in held:
            conn.close()
    return result


@pytest.mark.netns
def test_namespace_port_range_gives_errno_99(mariadb_template: Any) -> None:
    ports = 8
    result = run_in_netns("tests.test_harness:errno99_body", mariadb_template,
                          port_range=(40000, 40000 + ports - 1),
                          server_options={}, kwargs={"ports": ports})
    assert result == {"opened": ports, "errno": errno.EADDRNOTAVAIL, "code": 2003}


def test_root_is_not_open_to_other_local_users(mariadb: MariaDB) -> None:
    """The throwaway server (also what `connguard bench` starts) has no passwordless root:
    none over TCP at all, and the unix socket only with this run's random password."""
    with pytest.raises(pymysql.err.OperationalError) as tcp:
        pymysql.connect(host="127.0.0.1", port=mariadb.port, user="root", password="",
                        connect_timeout=10)
    assert tcp.value.args[0] in (1045, 1130)
    with pytest.raises(pymysql.err.OperationalError) as sock:
        pymysql.connect(unix_socket=mariadb.socket_path, user="root", password="",
                        connect_timeout=10)
    assert sock.value.args[0] == 1045
    with mariadb.admin() as cur:
        cur.execute("SELECT @@secure_file_priv")
        assert cur.fetchone()[0].rstrip("/") == mariadb.workdir.rstrip("/")
