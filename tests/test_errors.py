"""connguard.errors: identity, table, messages, diagnosis and secrets, without a database.

PyMySQL errors are built the way PyMySQL builds them (``connections.py``: an OSError at
connect becomes ``OperationalError(2003, ...)`` with ``.original_exception``; a failed read
becomes 2013 raised inside ``except OSError``), and a few are produced by PyMySQL itself
against loopback sockets that are not MySQL servers.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator, List, Tuple, Type

import pymysql
import pytest

from connguard import errors, messages
from connguard import explain as err_explain
from connguard.census import unix_listen_queue
from connguard.errors import (
    AccessDenied,
    CircuitOpen,
    CommandsOutOfSync,
    ConnectionLost,
    ConnGuardError,
    Deadlock,
    FdLimitReached,
    HandshakeLost,
    HostBlocked,
    LocalPortsExhausted,
    LockWaitTimeout,
    PoolClosed,
    PoolTimeout,
    QueryInterrupted,
    ResourceTemporarilyUnavailable,
    ServerShuttingDown,
    ServerThreadLimit,
    ServerUnavailable,
    StatementTimeout,
    TooManyConnections,
    UserConnectionLimit,
    classify,
    is_disconnect,
    is_transient,
    redact,
    redact_exception,
    translate,
)

OperationalError = pymysql.err.OperationalError
DOCS = Path(__file__).resolve().parent.parent / "docs"
PASSWORD = "s3cret-Pa55-word"
LIBMYSQL_HANDSHAKE_MSG = (
    "Lost connection to MySQL server at 'reading initial communication packet', system error: 0"
)
THREAD_MSG = (
    "Can't create a new thread (errno 11); if you are not out of available memory, you can "
    "consult the manual for a possible OS-dependent bug"
)


# --- building errors the way PyMySQL does ---------------------------------------------------



@pytest.fixture(autouse=True)
def _docs_without_a_published_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages as a checkout shows them, whatever distribution metadata is installed."""
    from connguard import messages

    monkeypatch.setattr(messages, "_docs_base", "")

def connect_error(os_error: OSError, host: str = "127.0.0.1") -> pymysql.err.OperationalError:
    """What Connection.connect() raises for an OSError (PyMySQL 1.x)."""
    exc = OperationalError(2003, f"Can't connect to MySQL server on {host!r} ({os_error})")
    exc.original_exception = os_error
    return exc


def lost_during_read(os_error: OSError) -> pymysql.err.OperationalError:
    """What _read_bytes() raises: 2013 raised inside ``except OSError`` (so ``__context__``)."""
    try:
        try:
            raise os_error
        except OSError as e:
            # PyMySQL raises without "from": the OSError is only the __context__.
            raise OperationalError(2013, f"Lost connection to MySQL server during query ({e})")  # noqa: B904
    except OperationalError as exc:
        return exc
    raise AssertionError("unreachable")


def server_error(code: int, message: str) -> pymysql.err.MySQLError:
    """What an error packet from the server turns into (err.raise_mysql_exception)."""
    body = b"\xff" + struct.pack("<h", code) + b"#HY000" + message.encode()
    try:
        pymysql.err.raise_mysql_exception(body)
    except pymysql.err.MySQLError as exc:
        return exc
    raise AssertionError("raise_mysql_exception did not raise")


def oserror(number: int) -> OSError:
    """A real OSError subclass for ``number``, as the socket module raises it."""
    return OSError(number, os.strerror(number))


# --- the table --------------------------------------------------------------------------------

PUBLIC_CLASSES = [
    getattr(errors, name)
    for name in errors.__all__
    if isinstance(getattr(errors, name), type)
    and issubclass(getattr(errors, name), ConnGuardError)
    and getattr(errors, name) is not ConnGuardError
]


@pytest.mark.parametrize("row", errors.TABLE, ids=lambda r: f"{r.cls.__name__}-{r.codes}")
def test_every_template_renders_without_facts(row: errors.Row) -> None:
    assert messages.render(row.cause, {})
    for template in (row.cause, *row.remedies):
        text = messages.render(template, {})
        for leftover in ("{", "}", "[", "]", "None"):
            assert leftover not in text, (template, text)


def test_every_class_has_a_docs_page_listed_in_the_index() -> None:
    index = (DOCS / "errors" / "index.md").read_text()
    for cls in PUBLIC_CLASSES:
        assert (DOCS / "errors" / f"{cls.docs}.md").is_file(), cls.docs
        assert cls.__name__ in index
        assert f"{cls.docs}.md" in index
        assert cls.__name__ in err_explain.page(cls.docs).split("\n", 1)[0]


def test_rows_are_ordered_specific_first() -> None:
    """A general row must not shadow a later, more specific one with the same codes."""
    for i, general in enumerate(errors.TABLE):
        if general.errnos or general.timed_out is not None or general.during_connect is not None:
            continue
        for later in errors.TABLE[i + 1 :]:
            assert not set(later.codes) & set(general.codes), (general, later)


# --- identity -> class ------------------------------------------------------------------------

# (id, error, expected class, expected transient)
CASES: List[Tuple[str, BaseException, Type[ConnGuardError], bool]] = [
    ("2003/99", connect_error(oserror(errno.EADDRNOTAVAIL)), LocalPortsExhausted, True),
    ("2003/24", connect_error(oserror(errno.EMFILE)), FdLimitReached, True),
    ("2003/23", connect_error(oserror(errno.ENFILE)), FdLimitReached, True),
    ("2003/11", connect_error(oserror(errno.EAGAIN)), ResourceTemporarilyUnavailable, True),
    ("2003/111", connect_error(oserror(errno.ECONNREFUSED)), ServerUnavailable, True),
    ("2003/113", connect_error(oserror(errno.EHOSTUNREACH)), ServerUnavailable, True),
    ("2003/101", connect_error(oserror(errno.ENETUNREACH)), ServerUnavailable, True),
    ("2003/110", connect_error(oserror(errno.ETIMEDOUT)), ServerUnavailable, True),
    ("2003/timeout", connect_error(socket.timeout("timed out")), ServerUnavailable, True),
    ("2003/104", connect_error(oserror(errno.ECONNRESET)), ServerUnavailable, True),
    (
        "2003/gai",
        connect_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
        ServerUnavailable,
        False,
    ),
    ("2005", OperationalError(2005, "Unknown MySQL server host 'db'"), ServerUnavailable, False),
    ("1040", server_error(1040, "Too many connections"), TooManyConnections, True),
    ("1135", server_error(1135, THREAD_MSG), ServerThreadLimit, True),
    (
        "1129",
        server_error(1129, "Host '10.0.0.7' is blocked because of many connection errors"),
        HostBlocked,
        False,
    ),
    (
        "1203",
        server_error(1203, "User app already has more than 'max_user_connections' active"),
        UserConnectionLimit,
        True,
    ),
    (
        "1226",
        server_error(1226, "User 'app' has exceeded the 'max_user_connections' resource"),
        UserConnectionLimit,
        True,
    ),
    (
        "1045",
        server_error(1045, "Access denied for user 'app'@'localhost' (using password: YES)"),
        AccessDenied,
        False,
    ),
    ("1044", server_error(1044, "Access denied for user 'a' to database 'x'"), AccessDenied, False),
    ("1130", server_error(1130, "Host '10.0.0.7' is not allowed to connect"), AccessDenied, False),
    ("1862", server_error(1862, "Your password has expired."), AccessDenied, False),
    ("4150", server_error(4150, "blocked: too many credential errors"), AccessDenied, False),
    ("1053", server_error(1053, "Server shutdown in progress"), ServerShuttingDown, True),
    ("1927", server_error(1927, "Connection was killed"), ConnectionLost, True),
    ("4031", server_error(4031, "The client was disconnected by the server"), ConnectionLost, True),
    ("2006", OperationalError(2006, "MySQL server has gone away"), ConnectionLost, True),
    ("2013", lost_during_read(oserror(errno.ECONNRESET)), ConnectionLost, True),
    ("2013/timeout", lost_during_read(socket.timeout("timed out")), ConnectionLost, True),
    ("2055", OperationalError(2055, "Lost connection, system error: 32"), ConnectionLost, True),
    ("2014", OperationalError(2014, "Command Out of Sync"), CommandsOutOfSync, False),
    (
        "2013/handshake",
        OperationalError(2013, LIBMYSQL_HANDSHAKE_MSG),
        HandshakeLost,
        True,
    ),
    ("0/closed", pymysql.err.InterfaceError(0, ""), ConnectionLost, True),
    ("raw/99", oserror(errno.EADDRNOTAVAIL), LocalPortsExhausted, True),
    ("raw/24", oserror(errno.EMFILE), FdLimitReached, True),
    ("raw/111", oserror(errno.ECONNREFUSED), ServerUnavailable, True),
    ("raw/104", oserror(errno.ECONNRESET), ConnectionLost, True),
    ("raw/32", oserror(errno.EPIPE), ConnectionLost, True),
    ("raw/timeout", socket.timeout("timed out"), ServerUnavailable, True),
    # Statement errors: the connection stays usable.
    ("1317", server_error(1317, "Query execution was interrupted"), QueryInterrupted, True),
    ("1028", server_error(1028, "Sort aborted"), QueryInterrupted, True),
    (
        "1969",
        server_error(1969, "Query execution was interrupted (max_statement_time exceeded)"),
        StatementTimeout,
        True,
    ),
    (
        "3024",
        server_error(3024, "Query execution was interrupted, maximum statement execution "
                           "time exceeded"),
        StatementTimeout,
        True,
    ),
    (
        "1205",
        server_error(1205, "Lock wait timeout exceeded; try restarting transaction"),
        LockWaitTimeout,
        True,
    ),
    (
        "1213",
        server_error(1213, "Deadlock found when trying to get lock; try restarting transaction"),
        Deadlock,
        True,
    ),
]

STATEMENT_CASES = [c for c in CASES if c[2] in (QueryInterrupted, StatementTimeout,
                                                 LockWaitTimeout, Deadlock)]


@pytest.mark.parametrize(
    ("exc", "cls", "transient"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_translate_picks_class_and_keeps_the_original(
    exc: BaseException, cls: Type[ConnGuardError], transient: bool
) -> None:
    new = translate(exc, host="127.0.0.1", port=3306)
    assert isinstance(new, cls)
    assert isinstance(new, ConnGuardError)
    assert isinstance(new, pymysql.err.OperationalError)
    assert isinstance(new, type(exc)), "existing except clauses must keep catching it"
    assert new.transient is transient
    assert is_transient(new) is transient and is_transient(exc) is transient
    assert new.args == exc.args
    assert new.original is exc and new.__cause__ is exc
    assert new.docs == cls.docs
    assert new.remedies and all(r.strip() for r in new.remedies)
    assert classify(exc) is classify(new) is not None


@pytest.mark.parametrize(
    "exc", [c[1] for c in STATEMENT_CASES], ids=[c[0] for c in STATEMENT_CASES]
)
def test_statement_errors_are_not_disconnects(exc: BaseException) -> None:
    new = translate(exc, host="127.0.0.1", port=3306, extra={"thread_id": 42})
    assert not is_disconnect(exc) and not is_disconnect(new)
    assert not isinstance(new, ConnectionLost)
    assert "the connection is still usable" in new.cause
    assert "127.0.0.1:3306" in new.cause and "server thread 42" in new.cause
    # Not about this host: no descriptor or port reads for them.
    assert "fd_soft" not in new.diagnosis and "census" not in new.diagnosis


def test_statement_timeout_is_an_interruption() -> None:
    new = translate(server_error(1969, "Query execution was interrupted "
                                       "(max_statement_time exceeded)"))
    assert isinstance(new, QueryInterrupted) and new.docs == "statement-timeout"


def test_handshake_lost_needs_the_connect_phase() -> None:
    exc = OperationalError(2013, "Lost connection to MySQL server during query")
    assert type(translate(exc)).__name__ == "ConnectionLost"
    assert isinstance(translate(exc, during_connect=True), HandshakeLost)


def test_errno_from_message_when_nothing_is_wrapped() -> None:
    """libmysqlclient style: no original exception, only "(99)" in the text."""
    exc = OperationalError(2003, "Can't connect to MySQL server on '127.0.0.1' (99)")
    new = translate(exc)
    assert isinstance(new, LocalPortsExhausted)
    assert new.diagnosis["errno"] == 99 and new.diagnosis["errno_name"] == "EADDRNOTAVAIL"
    assert new.diagnosis["host"] == "127.0.0.1"


def test_errno_from_cause_and_context() -> None:
    by_cause = OperationalError(2003, "Can't connect to MySQL server on 'h'")
    by_cause.__cause__ = oserror(errno.EMFILE)
    by_context = OperationalError(2003, "Can't connect to MySQL server on 'h'")
    by_context.__context__ = oserror(errno.EADDRNOTAVAIL)
    assert isinstance(translate(by_cause), FdLimitReached)
    assert isinstance(translate(by_context), LocalPortsExhausted)


def test_read_timeout_is_not_blamed_on_the_server() -> None:
    new = translate(lost_during_read(socket.timeout("timed out")), extra={"read_timeout": 30})
    assert "within read_timeout (30 s)" in new.cause


def test_other_classes_are_combined_and_cached() -> None:
    first = translate(pymysql.err.InternalError(1040, "Too many connections"))
    second = translate(pymysql.err.InternalError(1040, "Too many connections"))
    assert isinstance(first, pymysql.err.InternalError)
    assert isinstance(first, TooManyConnections)
    assert type(first) is type(second)
    assert type(first).__name__ == "TooManyConnections"
    plain = translate(server_error(1040, "Too many connections"))
    assert type(plain) is TooManyConnections  # already an OperationalError: no new class


def test_raw_oserror_stays_an_oserror() -> None:
    new = translate(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert isinstance(new, ConnectionResetError) and isinstance(new, ConnectionLost)
    assert new.errno == errno.ECONNRESET


@pytest.mark.parametrize(
    "exc",
    [
        server_error(1064, "You have an error in your SQL syntax"),
        server_error(1062, "Duplicate entry '1' for key 'PRIMARY'"),
        OperationalError("received unknown auth switch request"),
        ValueError(2003),
        KeyError(1040),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_unknown_errors_come_back_unchanged(exc: BaseException) -> None:
    assert translate(exc) is exc
    assert classify(exc) is None
    assert is_transient(exc) is None


class _Unprintable(OSError):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def _weird_inputs() -> Iterator[Any]:
    yield Exception()
    yield OperationalError()
    yield OperationalError(None)
    yield OperationalError(None, None)
    yield OperationalError("2003", "text code")
    yield OperationalError(True, "bool code")
    yield OperationalError(2003)
    yield OperationalError(2003, None)
    yield OperationalError(2003, b"bytes message")
    yield OperationalError(2003, "Can't connect to MySQL server on '", "extra", 1)
    exc = OperationalError(2003, "x")
    exc.original_exception = "not an exception"
    yield exc
    yield _Unprintable(errno.ECONNRESET, "reset")
    yield OSError()
    yield OSError("no errno")
    yield socket.gaierror()
    yield None


@pytest.mark.parametrize("exc", list(_weird_inputs()), ids=lambda e: type(e).__name__)
def test_translate_never_raises(exc: Any) -> None:
    new = translate(exc, host="127.0.0.1", port=3306)
    assert new is exc or isinstance(new, ConnGuardError)
    if isinstance(new, ConnGuardError):
        assert "None" not in str(new).split("\n", 1)[0]
        repr(new)
    classify(exc)
    is_transient(exc)
    is_disconnect(exc)


def test_translate_survives_a_failing_census_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("netlink exploded")

    monkeypatch.setattr(errors, "sockets_toward", fail)
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)), host="127.0.0.1", port=3306)
    assert isinstance(new, LocalPortsExhausted)
    assert new.diagnosis["census"] is None
    assert new.diagnosis["fd_in_use"] > 0  # the limits still read
    monkeypatch.setattr(errors, "local_limits", fail)
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)), host="127.0.0.1", port=3306)
    assert isinstance(new, LocalPortsExhausted) and new.diagnosis["fd_in_use"] is None


def test_translate_is_idempotent() -> None:
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)))
    assert translate(new) is new
    assert translate(new, host="10.0.0.5", port=3306, password=PASSWORD) is new


# --- diagnosis --------------------------------------------------------------------------------


def test_diagnosis_reports_real_local_numbers() -> None:
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)), host="127.0.0.1", port=3306)
    d = new.diagnosis
    for key in ("errno_name", "errno", "mysql_code", "host", "port", "fd_in_use", "fd_soft",
                "fd_hard", "port_range", "census"):
        assert key in d, key
    assert (d["errno"], d["errno_name"], d["mysql_code"]) == (99, "EADDRNOTAVAIL", 2003)
    assert (d["host"], d["port"]) == ("127.0.0.1", 3306)
    assert d["fd_in_use"] > 0
    assert (d["fd_soft"], d["fd_hard"]) == resource.getrlimit(resource.RLIMIT_NOFILE)
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert d["port_range"] == (int(low), int(high))
    assert isinstance(d["census"], dict) and "time_wait" in d["census"]


def test_diagnose_false_skips_local_reads() -> None:
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)), diagnose=False)
    assert "fd_in_use" not in new.diagnosis and "census" not in new.diagnosis
    first = str(new).split("\n", 1)[0]
    assert first.startswith("local ephemeral ports exhausted toward 127.0.0.1 — reuse")
    assert "None" not in str(new)


def test_no_census_for_names_that_need_dns() -> None:
    new = translate(connect_error(oserror(errno.EADDRNOTAVAIL)), host="db.example", port=3306)
    assert new.diagnosis["census"] is None


# --- messages ---------------------------------------------------------------------------------


def test_first_line_names_the_numbers() -> None:
    new = translate(
        connect_error(oserror(errno.EADDRNOTAVAIL), host="10.0.0.5"),
        host="10.0.0.5",
        port=3306,
        extra={
            "census": {"time_wait": 27_904, "established": 286, "close_wait": 0},
            "port_range": (32768, 60999),
            "tcp_tw_reuse": 2,
        },
    )
    lines = str(new).split("\n")
    assert lines[0] == (
        "local ephemeral ports exhausted toward 10.0.0.5:3306: 28,190 of 28,232 in use "
        "(TIME_WAIT 27,904, ESTABLISHED 286) — reuse connections instead of opening one per "
        "query (connguard pool)"
    )
    assert "CLOSE_WAIT" not in str(new)  # a zero count is not a fact worth a line
    assert any("470 new connections/s" in line for line in lines)
    assert any("ip_local_port_range (now 32768-60999)" in line for line in lines)
    assert any("tcp_tw_reuse=1 (now 2)" in line for line in lines)
    assert lines[-2].startswith("original: (2003, \"Can't connect to MySQL server on '10.0.0.5'")
    assert lines[-1] == "see: connguard explain local-ports-exhausted"
    assert new.cause == lines[0].split(" — ")[0]


def test_too_many_connections_uses_caller_facts() -> None:
    new = translate(
        server_error(1040, "Too many connections"),
        extra={"max_connections": 151, "threads_connected": 150},
    )
    assert str(new).startswith(
        "too many connections: server at max_connections (150 of 151 connected) — "
    )
    assert new.diagnosis["max_connections"] == 151


def test_ports_held_by_open_connections_are_named() -> None:
    """A narrow range filled by open connections: the advice is to close them, not TIME_WAIT."""
    new = translate(
        connect_error(oserror(errno.EADDRNOTAVAIL)),
        host="127.0.0.1",
        port=3306,
        extra={"census": {"established": 8, "time_wait": 0}, "port_range": (40000, 40007)},
    )
    assert new.cause.endswith(": 8 of 8 in use (ESTABLISHED 8)")
    assert new.remedies[0].startswith("8 of them are open connections (ESTABLISHED)")
    assert "about 0.13 new connections/s" in str(new)


def test_too_many_connections_with_the_admin_connection_taken() -> None:
    """MySQL and MariaDB let one more SUPER / CONNECTION ADMIN session in past the limit."""
    new = translate(
        server_error(1040, "Too many connections"),
        host="127.0.0.1",
        port=3306,
        extra={"max_connections": 10, "threads_connected": 11},
    )
    assert new.cause == (
        "too many connections to 127.0.0.1:3306: server at max_connections (11 connected, "
        "max_connections 10 + 1 kept for SUPER / CONNECTION ADMIN)"
    )
    assert any("give application accounts only the privileges" in r for r in new.remedies)
    plain = translate(server_error(1040, "Too many connections"), extra={
        "max_connections": 10, "threads_connected": 10})
    assert "(10 of 10 connected)" in plain.cause
    assert not any("privileges" in r for r in plain.remedies)


@pytest.mark.parametrize(
    "message",
    [
        THREAD_MSG,  # MySQL
        "Can't create a new thread (errno 11 \"Resource temporarily unavailable\"); if you "
        "are not out of available memory, you can consult the manual for a possible "
        "OS-dependent bug",  # MariaDB 10.11
    ],
)
def test_thread_limit_names_the_server_errno(message: str) -> None:
    new = translate(
        server_error(1135, message), extra={"max_connections": 151, "threads_connected": 24}
    )
    assert new.diagnosis["server_errno"] == errno.EAGAIN
    assert new.cause == (
        "the server cannot create a thread for a new connection (ER_CANT_CREATE_THREAD, server "
        "errno 11 EAGAIN): 24 connected, below max_connections 151, so an OS limit of the "
        "server stopped it"
    )


def test_host_blocked_names_the_host() -> None:
    new = translate(
        server_error(1129, "Host '10.0.0.7' is blocked because of many connection errors; "
                           "unblock with 'mariadb-admin flush-hosts'"),
        host="10.0.0.5",
        port=3306,
        extra={"max_connect_errors": 100},
    )
    assert new.diagnosis["blocked_host"] == "10.0.0.7"
    assert new.cause == (
        "the server at 10.0.0.5:3306 blocked this client host 10.0.0.7 after too many "
        "interrupted connection attempts (max_connect_errors = 100)"
    )


def test_user_connection_limit_names_the_limit() -> None:
    msg = "User app already has more than 'max_user_connections' active connections"
    new = translate(server_error(1203, msg), extra={"max_user_connections": 3})
    assert new.cause == (
        f"the account's connection limit is reached (max_user_connections = 3): {msg}"
    )
    unlimited = translate(server_error(1203, msg), extra={"max_user_connections": 0})
    assert "max_user_connections =" not in unlimited.cause  # 0: a per-account limit applies


def test_unix_listen_queue_is_read_from_the_kernel() -> None:
    """A listener that never accepts: the diagnosis has what `ss -xl` shows for it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mysqld.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(2)
            clients = []
            try:
                for _ in range(3):
                    client = socket.socket(socket.AF_UNIX)
                    clients.append(client)
                    client.setblocking(False)
                    client.connect(path)
                assert unix_listen_queue(path) == (3, 2)
                new = translate(connect_error(oserror(errno.EAGAIN), host="localhost"), host=path)
            finally:
                for client in clients:
                    client.close()
    assert (new.diagnosis["listen_queue"], new.diagnosis["listen_backlog"]) == (3, 2)
    assert new.cause == (
        f"the server's listen queue is full at {path} (errno 11 EAGAIN): 3 waiting, backlog 2: "
        "it is not accepting connections as fast as they arrive"
    )
    assert unix_listen_queue("/nonexistent/mysqld.sock") is None


def test_fd_limit_message() -> None:
    new = translate(
        connect_error(oserror(errno.EMFILE)),
        extra={"fd_in_use": 32_768, "fd_soft": 32_768, "fd_hard": 65_536},
    )
    first = str(new).split("\n", 1)[0]
    assert "32,768 of 32,768 descriptors open (soft limit; hard 65,536)" in first
    assert "toward the hard limit 65,536" in str(new)


def test_unlimited_hard_limit_reads_well() -> None:
    new = translate(
        connect_error(oserror(errno.EMFILE)),
        extra={"fd_in_use": None, "fd_soft": 1024, "fd_hard": resource.RLIM_INFINITY},
    )
    assert "all 1,024 descriptors the soft limit allows are open (hard limit unlimited)" in str(
        new
    )


def test_thread_limit_message_keeps_server_text_in_original() -> None:
    new = translate(server_error(1135, THREAD_MSG))
    assert "cannot create a thread" in new.cause
    assert "ulimit -u" in str(new) and "vm.max_map_count" in str(new)
    assert "errno 11" in str(new)  # in the "original:" line


def test_repr_is_short() -> None:
    new = translate(server_error(1040, "Too many connections"), diagnose=False)
    assert repr(new).startswith("TooManyConnections(1040, 'too many connections: server at")
    assert "\\n" not in repr(new)


def test_numbers_format() -> None:
    assert messages.number(28_232) == "28,232"
    assert messages.number(5.0) == "5"
    assert messages.number(0.25) == "0.25"
    assert messages.number(4.2) == "4.2"
    assert messages.number(470.53) == "470.5"


def test_optional_segments() -> None:
    template = "ports[: {a} of {b}|: {b} total][ ({c})]"
    assert messages.render(template, {"a": "1", "b": "2", "c": "3"}) == "ports: 1 of 2 (3)"
    assert messages.render(template, {"b": "2"}) == "ports: 2 total"
    assert messages.render(template, {}) == "ports"
    assert messages.render("{a}", {"a": "{b} [x]"}) == "{b} [x]"  # facts are not re-parsed


# --- secrets ----------------------------------------------------------------------------------


def test_password_never_shows() -> None:
    exc = server_error(1045, f"Access denied for user 'app'@'localhost' (password {PASSWORD})")
    exc.traceback = f'pymysql.connect(password="{PASSWORD}")'
    new = translate(exc, host="127.0.0.1", port=3306, password=PASSWORD)
    for text in (str(new), repr(new), str(new.args), new.cause, " ".join(new.remedies),
                 str(exc.args), exc.traceback, str(new.diagnosis)):
        assert PASSWORD not in text
    assert new.args[0] == 1045


def test_password_as_bytes() -> None:
    exc = server_error(1045, f"denied {PASSWORD}")
    new = translate(exc, password=PASSWORD.encode())
    assert PASSWORD not in str(new) and PASSWORD not in repr(new)


def _printed(exc: BaseException) -> str:
    """What a traceback of ``exc`` shows: every exception of its chain, str and repr."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _raised_from(new: BaseException, exc: BaseException) -> BaseException:
    """``new`` raised the way callers do (``raise translate(e) from e``), caught."""
    try:
        raise new from exc
    except BaseException as caught:  # noqa: BLE001 - handed to the test
        return caught


def _file_error(path: str) -> OSError:
    """The OSError Python raises for a missing file: its ``filename`` is the path."""
    try:
        open(path)  # noqa: SIM115 - only the error is wanted
    except OSError as exc:
        return exc
    raise AssertionError(f"{path} exists")


def test_password_in_a_chained_oserrors_filename_never_shows() -> None:
    # A password given where a path goes: the OSError's str() shows the path, and PyMySQL
    # keeps the OSError as original_exception and (raising in its except) as __context__.
    os_error = _file_error(f"/nonexistent/{PASSWORD}/mysqld.sock")
    assert PASSWORD in str(os_error)
    try:
        try:
            raise os_error
        except OSError as e:
            raise connect_error(e, host="localhost")  # noqa: B904 - as PyMySQL raises it
    except OperationalError as caught:
        exc = caught
    assert exc.__context__ is os_error
    new = translate(exc, host=f"/nonexistent/{PASSWORD}/mysqld.sock", password=PASSWORD)
    assert isinstance(new, ServerUnavailable)
    text = _printed(_raised_from(new, exc))
    assert PASSWORD not in text
    assert "No such file or directory: '/nonexistent/***/mysqld.sock'" in text  # kept, masked
    assert PASSWORD not in str(new.diagnosis)
    assert os_error.errno == errno.ENOENT and exc.args[0] == 2003  # identity is kept


def test_password_in_an_oserrors_strerror_never_shows() -> None:
    gai = socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {PASSWORD}")
    exc = connect_error(gai, host="db")
    new = translate(exc, password=PASSWORD)
    assert isinstance(new, ServerUnavailable) and not new.transient
    assert PASSWORD not in _printed(_raised_from(new, exc))


def test_password_in_an_unknown_error_never_shows() -> None:
    # The table does not know it (a missing ssl file): it comes back as it is, masked.
    exc = _file_error(f"/nonexistent/{PASSWORD}.pem")
    assert translate(exc, password=PASSWORD) is exc
    assert PASSWORD not in _printed(exc) and exc.errno == errno.ENOENT


def test_redact_exception_walks_the_whole_chain() -> None:
    inner = _file_error(f"/x/{PASSWORD}")
    middle = RuntimeError(f"while opening {PASSWORD}")
    middle.__cause__ = inner
    outer = ValueError("connect(password='hunter2')")
    outer.__context__ = middle
    outer.__notes__ = [f"note {PASSWORD}"]  # add_note() (3.11+) appends here
    inner.__context__ = outer  # a cycle: still ends
    redact_exception(outer, PASSWORD)
    text = _printed(outer)
    assert PASSWORD not in text and "hunter2" not in text
    assert "connect(password=***)" in text and outer.__notes__ == ["note ***"]
    redact_exception(outer)  # no password: credential-like text only; never raises


def test_redact() -> None:
    assert redact(f"x {PASSWORD} y", PASSWORD) == "x *** y"
    assert redact(f"x {PASSWORD}", PASSWORD.encode()) == "x ***"
    assert redact("connect(password='hunter2', user='a')") == "connect(password=***, user='a')"
    assert redact("passwd=hunter2 db=x") == "passwd=*** db=x"
    assert redact("mysql://app:hunter2@db:3306/x") == "mysql://app:***@db:3306/x"
    kept = "Access denied for user 'app'@'localhost' (using password: YES)"
    assert redact(kept) == kept
    assert redact("nothing", None) == redact("nothing", "") == "nothing"


# --- helpers for other modules ----------------------------------------------------------------


@pytest.mark.parametrize("code", [2006, 2013, 2014, 2045, 2055, 4031, 1927])
def test_is_disconnect_codes(code: int) -> None:
    exc = OperationalError(code, "x")
    assert is_disconnect(exc)
    assert is_disconnect(translate(exc))


def test_codes_mariadb_uses_for_something_else() -> None:
    """MariaDB's 4031 is ER_REFERENCED_TRG_DOES_NOT_EXIST, not MySQL's inactivity disconnect."""
    trigger = server_error(4031, "Referenced trigger 't1' for the given action time and event "
                                 "type does not exist")
    assert translate(trigger) is trigger and not is_disconnect(trigger)
    inactive = server_error(4031, "The client was disconnected by the server because of "
                                  "inactivity. See wait_timeout and interactive_timeout")
    assert isinstance(translate(inactive), ConnectionLost) and is_disconnect(inactive)


def test_is_disconnect_others() -> None:
    assert is_disconnect(oserror(errno.ECONNRESET))
    assert is_disconnect(socket.timeout("timed out"))
    assert is_disconnect(pymysql.err.InterfaceError(0, ""))
    assert is_disconnect(pymysql.err.Error("Already closed"))
    assert not is_disconnect(server_error(1040, "Too many connections"))
    assert not is_disconnect(server_error(1064, "syntax"))
    assert not is_disconnect(connect_error(oserror(errno.ECONNREFUSED)))
    assert not is_disconnect(ValueError())
    assert not is_disconnect(PoolTimeout(1, 1, 1.0))


# --- pickling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        connect_error(oserror(errno.EADDRNOTAVAIL)),
        oserror(errno.EADDRNOTAVAIL),
        pymysql.err.InterfaceError(0, ""),
    ],
    ids=repr,
)
def test_pickle_round_trip(exc: BaseException) -> None:
    new = translate(exc)
    back = pickle.loads(pickle.dumps(new))
    assert type(back) is type(new)
    assert back.args == new.args and str(back) == str(new)
    assert back.diagnosis == new.diagnosis and back.transient == new.transient
    if isinstance(new, OSError):
        assert back.errno == new.errno


def test_pickle_pool_errors() -> None:
    for err in (PoolTimeout(10, 10, 5.0), CircuitOpen(None, 2.5), PoolClosed("<pool>")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


# --- errors the pool and storm modules raise --------------------------------------------------


def test_pool_timeout() -> None:
    err = PoolTimeout(10, 10, 5.0, destination="app@10.0.0.5:3306/app")
    assert isinstance(err, pymysql.err.OperationalError) and err.transient
    assert str(err).startswith(
        "no free connection in the pool for app@10.0.0.5:3306/app after waiting 5 s: "
        "10 of 10 in use — "
    )
    assert (err.max_size, err.in_use, err.waited) == (10, 10, 5.0)
    assert repr(err).startswith("PoolTimeout('no free connection")
    assert "for db:3306 after waiting 0.25 s: 1,999 of 2,000" in str(
        PoolTimeout(2_000, 1_999, 0.25, host="db", port=3306)
    )


def test_pool_timeout_names_the_servers_refusal() -> None:
    refusal = translate(
        server_error(1040, "Too many connections"),
        host="10.0.0.5",
        port=3306,
        extra={"max_connections": 151, "threads_connected": 151},
    )
    err = PoolTimeout(10, 4, 5.0, host="10.0.0.5", port=3306, last_cause=refusal)
    first = str(err).split("\n", 1)[0]
    assert first.startswith(
        "no free connection in the pool for 10.0.0.5:3306 after waiting 5 s: 4 of 10 in use; "
        "the server refused more: TooManyConnections: too many connections to 10.0.0.5:3306: "
        "server at max_connections (151 of 151 connected) — the pool cannot grow because the "
        "server refuses new connections: fix that first (see `connguard explain "
        "too-many-connections`)"
    )
    assert err.last_cause is refusal and err.__cause__ is refusal
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and type(back.last_cause) is TooManyConnections


def test_circuit_open() -> None:
    last = translate(server_error(1040, "Too many connections"), diagnose=False)
    err = CircuitOpen(last, 4.2, host="10.0.0.5", port=3306, failures=5)
    assert isinstance(err, pymysql.err.OperationalError) and err.transient
    assert err.last_cause is last and err.__cause__ is last and err.retry_after == 4.2
    first = str(err).split("\n", 1)[0]
    assert first.startswith(
        "connecting to 10.0.0.5:3306 paused for 4.2 s after 5 failures in a row; "
        "last: TooManyConnections: too many connections: server at max_connections"
    )
    assert "(see `connguard explain too-many-connections`)" in first
    bare = str(CircuitOpen(None, 3))
    assert bare.startswith("connecting paused for 3 s — fix the last failure;")
    assert "None" not in bare


def test_pool_closed() -> None:
    err = PoolClosed("<connguard.Pool app@db:3306 closed>")
    assert isinstance(err, pymysql.err.InterfaceError) and not err.transient
    assert "the pool is closed: <connguard.Pool app@db:3306 closed>" in str(err)


# --- real errors from PyMySQL and the kernel, against loopback sockets (no database) ---------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect_error(**kwargs: Any) -> pymysql.err.OperationalError:
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(connect_timeout=2, **kwargs)
    return info.value


def test_real_refused_connect() -> None:
    port = _closed_port()
    new = translate(_connect_error(host="127.0.0.1", port=port), host="127.0.0.1", port=port)
    assert isinstance(new, ServerUnavailable)
    assert f"at 127.0.0.1:{port} (errno 111 ECONNREFUSED: Connection refused)" in new.cause


@pytest.mark.skipif(
    Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0",
    reason="binding a foreign address succeeds when ip_nonlocal_bind=1",
)
def test_real_errno_99_from_pymysql() -> None:
    """bind_address= a foreign address: the kernel's EADDRNOTAVAIL, wrapped by PyMySQL."""
    exc = _connect_error(host="127.0.0.1", port=_closed_port(), bind_address="203.0.113.7")
    assert exc.args[0] == 2003 and exc.original_exception.errno == errno.EADDRNOTAVAIL
    new = translate(exc)
    assert isinstance(new, LocalPortsExhausted) and new.args == exc.args


def _one_shot_server(payload: bytes) -> Tuple[int, threading.Thread]:
    """A TCP listener that accepts once, sends ``payload`` and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return int(listener.getsockname()[1]), thread


def test_real_handshake_lost() -> None:
    port, thread = _one_shot_server(b"")
    exc = _connect_error(host="127.0.0.1", port=port)
    thread.join(5)
    assert exc.args[0] == 2013
    new = translate(exc, host="127.0.0.1", port=port, during_connect=True)
    assert isinstance(new, HandshakeLost) and isinstance(new, ConnectionLost)
    assert is_disconnect(new)


def test_real_too_many_connections_greeting() -> None:
    """The server answers the connect with an error packet instead of its greeting."""
    body = b"\xff" + struct.pack("<H", 1040) + b"Too many connections"
    port, thread = _one_shot_server(struct.pack("<I", len(body))[:3] + b"\x00" + body)
    exc = _connect_error(host="127.0.0.1", port=port)
    thread.join(5)
    new = translate(exc, host="127.0.0.1", port=port, extra={"max_connections": 151})
    assert isinstance(new, TooManyConnections)
    assert "server at max_connections (151)" in new.cause


# PyMySQL 1.2 does not close its Unix socket when connect() fails; it is collected below.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_real_unix_backlog_full() -> None:
    """A listener that never accepts: once its backlog is full, connect() gives EAGAIN."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mysqld.sock")
        held: List[socket.socket] = []
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(0)
            try:
                for _ in range(64):
                    client = socket.socket(socket.AF_UNIX)
                    client.setblocking(False)
                    held.append(client)
                    client.connect(path)
            except BlockingIOError:
                pass
            exc = _connect_error(unix_socket=path)
            for client in held:
                client.close()
    assert exc.original_exception.errno == errno.EAGAIN
    assert isinstance(translate(exc), ResourceTemporarilyUnavailable)
    del exc
    gc.collect()  # while the filter above is active


_EMFILE_SCRIPT = """
import json, resource, socket
import pymysql
from connguard.errors import translate
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held = []
try:
    while True:
        held.append(socket.socket())
except OSError:
    pass
try:
    pymysql.connect(host="127.0.0.1", port=9, connect_timeout=1)
except pymysql.err.OperationalError as exc:
    new = translate(exc, host="127.0.0.1", port=9)
for s in held:
    s.close()
d = new.diagnosis
json.dump({"cls": type(new).__name__, "errno": d["errno"], "fd_soft": d["fd_soft"],
           "fd_in_use": d["fd_in_use"], "message": str(new)}, __import__("sys").stdout)
"""


def test_real_emfile_in_a_child_process() -> None:
    """At the limit even listing /proc/self/fd fails; the message must still read well."""
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["cls"] == "FdLimitReached"
    assert (result["errno"], result["fd_soft"]) == (errno.EMFILE, 64)
    first = result["message"].split("\n", 1)[0]
    assert "64" in first and "None" not in result["message"]


@pytest.mark.parametrize("base, page, expected", [
    ("", "local-ports-exhausted", "connguard explain local-ports-exhausted"),
    ("https://docs.example.org/connguard/", "local-ports-exhausted",
     "connguard explain local-ports-exhausted "
     "(or https://docs.example.org/connguard/errors/local-ports-exhausted/)"),
    ("https://docs.example.org/connguard/", "index",
     "connguard explain index (or https://docs.example.org/connguard/errors/)"),
])
def test_the_see_line_names_the_command_and_the_published_page_when_there_is_one(
        monkeypatch: pytest.MonkeyPatch, base: str, page: str, expected: str) -> None:
    monkeypatch.setattr(messages, "_docs_base", base)
    assert messages.see(page) == expected
    if page == "local-ports-exhausted":
        new = translate(pymysql.err.OperationalError(
            2003, "Can't connect to MySQL server on '10.0.0.5' ([Errno 99] Cannot assign "
                  "requested address)"))
        assert str(new).split("\n")[-1] == "see: " + expected
        assert new.docs == page and new.explain().startswith("# LocalPortsExhausted")
        assert "docs/" not in str(new)  # no repository path in a user-facing message


def test_the_docs_base_is_read_from_the_distribution_and_a_failure_is_not_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from connguard import errors as errors_module

    class Metadata:
        def get_all(self, name: str) -> list:
            assert name == "Project-URL"
            return ["Source, https://example.org/src",
                    "Documentation, https://docs.example.org/connguard"]

    def out_of_descriptors(_name: str) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(messages, "_docs_base", None)
    monkeypatch.setattr(importlib.metadata, "metadata", out_of_descriptors)
    assert errors_module.docs_base() == ""  # not kept: asked again next time
    monkeypatch.setattr(importlib.metadata, "metadata", lambda _name: Metadata())
    assert errors_module.docs_base() == "https://docs.example.org/connguard/"


def test_pickles_name_connguard_errors_whatever_module_holds_the_code() -> None:
    # Pickles made before the classes moved to connguard.exceptions name connguard.errors for
    # the class and for the function that rebuilds it: both must keep resolving there.
    import pickle

    err = translate(pymysql.err.OperationalError(1040, "Too many connections"))
    data = pickle.dumps(err)
    assert b"connguard.exceptions" not in data and b"connguard.errors" in data
    again = pickle.loads(data)
    assert type(again).__name__ == "TooManyConnections" and str(again) == str(err)
    assert errors.LeaseUnavailable.__module__ == "connguard.coordination"


def test_an_outage_of_a_server_never_reached_says_to_check_host_and_port() -> None:
    refused = translate(OperationalError(2003, "Can't connect to MySQL server on '10.0.0.5' "
                                               "([Errno 111] Connection refused)"),
                        host="10.0.0.5", port=3307, diagnose=False)
    never = str(errors.outage_error(refused, 1.0, 0.0, failures=2, host="10.0.0.5",
                                    port=3307, reached=False)).split("\n")[0]
    known = str(errors.outage_error(refused, 1.0, 0.0, failures=2, host="10.0.0.5",
                                    port=3307)).split("\n")[0]
    assert "this process has never connected to it: check the host and port" in never
    assert "never connected" not in known  # a server this process used: an outage
    assert "(see `connguard explain server-unavailable`)" in never


def test_1040_past_max_connections_from_this_host_names_the_admin_slot() -> None:
    """11 established beside max_connections 10: the server allows one more, for an account
    with SUPER / CONNECTION ADMIN, and the message says so instead of leaving 11 > 10 bare."""
    new = translate(OperationalError(1040, "Too many connections"), host="10.0.0.5", port=3306,
                    extra={"max_connections": 10, "census": {"established": 11}})
    first = str(new).split("\n", 1)[0]
    assert first.startswith(
        "too many connections to 10.0.0.5:3306: server at max_connections (11 established "
        "from this host alone: max_connections 10 + 1 kept for SUPER / CONNECTION ADMIN)")
    assert any(r.startswith("11 established is past max_connections: an account of this host "
                            "has SUPER or CONNECTION ADMIN") for r in new.remedies)
    within = translate(OperationalError(1040, "Too many connections"), host="10.0.0.5",
                       port=3306, extra={"max_connections": 10, "census": {"established": 4}})
    assert "CONNECTION ADMIN" not in str(within)  # 4 of 10: other hosts fill the server


def test_access_denied_lists_only_the_remedies_of_its_own_code() -> None:
    for code, own, text in [
        (1045, "check the user name and the password",
         "Access denied for user 'app'@'10.0.0.7' (using password: YES)"),
        (1044, "check the database name", "Access denied for user 'app'@'%' to "
         "database 'other'"),
        (1130, "create the account for this client host",
         "Host '10.0.0.7' is not allowed to connect to this MariaDB server"),
    ]:
        new = translate(OperationalError(code, text), host="10.0.0.5", port=3306)
        assert isinstance(new, AccessDenied)
        assert str(new).startswith(f"{text} on 10.0.0.5:3306 — {own}")
        others = {1044, 1045, 1130, 1698, 1862, 4151} - {code}
        assert not any(str(other) in " ".join(new.remedies) for other in others), new.remedies
