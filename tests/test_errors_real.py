"""Every error connguard translates, reproduced for real: a MariaDB the suite starts, the
kernel's own limits, nothing simulated.

Each case goes through connguard the way users meet it (``connguard.Pool``,
``connguard.connect``, or ``connguard.translate`` on the raw PyMySQL error) and checks what
issue 5 promises: the class, that ``except pymysql.err.OperationalError`` still catches it,
``.transient``, the numbers in ``.diagnosis`` and in the first line of the message, and that
the password shows up nowhere.  Cases that need a process of their own (a lowered
``RLIMIT_NOFILE``, a client inside a network namespace) run a function of this module in a
child and get back a JSON report of the exception (:func:`report`).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import re
import resource
import socket
import sys
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pymysql
import pytest

import connguard
from connguard import errors
from tests import peers
from tests.mariadb import (
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    MariaDB,
    fd_count,
    free_port,
    socket_states,
    wait_until,
)
from tests.netns import run_in_netns
from tests.peers import Veth

OperationalError = pymysql.err.OperationalError
DEADLINE = 30.0  # seconds, for conditions on a loaded 2-core machine


# --- reports and checks ---------------------------------------------------------------------


def report(err: BaseException) -> Dict[str, Any]:
    """What a test checks about a translated error, as JSON (it may cross a process)."""
    last = getattr(err, "last_cause", None)
    data = {
        "classes": [f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__],
        "transient": getattr(err, "transient", None),
        "args": list(err.args),
        "str": str(err),
        "repr": repr(err),
        "diagnosis": getattr(err, "diagnosis", None),
        "remedies": getattr(err, "remedies", None),
        "last_cause": report(last) if isinstance(last, BaseException) else None,
    }
    result: Dict[str, Any] = json.loads(json.dumps(data, default=repr))
    return result


def check(rep: Dict[str, Any], cls: str, *, transient: bool, code: Any = None,
          first_has: Sequence[str] = (), diagnosis: Optional[Dict[str, Any]] = None) -> str:
    """Assert the promises of issue 5 on a report; return the message's first line."""
    classes = rep["classes"]
    assert f"connguard.errors.{cls}" in classes, classes
    assert "connguard.errors.ConnGuardError" in classes
    assert "pymysql.err.OperationalError" in classes  # existing except clauses keep working
    assert rep["transient"] is transient
    if code is not None:
        assert rep["args"][0] == code, rep["args"]
    first = rep["str"].split("\n", 1)[0]
    print(f"{cls}: {first}")  # shown with the failure, or with -rP
    for text in first_has:
        assert text in first, f"{text!r} not in the first line {first!r}"
    for key, want in (diagnosis or {}).items():
        assert rep["diagnosis"].get(key) == want, (key, rep["diagnosis"])
    for text in (rep["str"], rep["repr"], json.dumps(rep["diagnosis"]),
                 json.dumps(rep["remedies"]), json.dumps(rep["args"])):
        assert APP_PASSWORD not in text
    return first


def raised_by(call: Any) -> OperationalError:
    """Call ``call`` and return the OperationalError it must raise."""
    with pytest.raises(OperationalError) as info:
        call()
    return info.value


# --- server helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def admin_of(server: MariaDB) -> Iterator[pymysql.cursors.Cursor]:
    """A root session opened before the test fills the server, so it can always ask."""
    conn = server.admin_connection()
    try:
        yield conn.cursor()
    finally:
        conn.close()


def status(cur: pymysql.cursors.Cursor, name: str) -> int:
    cur.execute("SHOW GLOBAL STATUS LIKE %s", (name,))
    return int(cur.fetchone()[1])


def make_app_unprivileged(cur: pymysql.cursors.Cursor) -> None:
    """Give the application account what a production one has: its database, nothing global.

    The harness grants ALL ON *.*, which includes CONNECTION ADMIN: MariaDB then exempts the
    account from max_user_connections and lets it take the connection max_connections keeps
    for administrators, so neither limit would ever refuse it.
    """
    for host in ("%", "localhost"):
        cur.execute(f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM '{APP_USER}'@'{host}'")
        cur.execute(f"GRANT ALL ON {APP_DATABASE}.* TO '{APP_USER}'@'{host}'")


@contextlib.contextmanager
def pool_for(server: MariaDB, **options: Any) -> Iterator[connguard.Pool]:
    pool = connguard.Pool(**server.connect_kwargs(connect_timeout=DEADLINE), **options)
    try:
        yield pool
    finally:
        pool.close()


@contextlib.contextmanager
def raw_connections() -> Iterator[List[pymysql.connections.Connection]]:
    held: List[pymysql.connections.Connection] = []
    try:
        yield held
    finally:
        for conn in held:
            conn.close()


def fill(server: MariaDB, held: List[pymysql.connections.Connection],
         limit: int = 200) -> OperationalError:
    """Open plain PyMySQL connections until the server refuses one; return the refusal."""
    for _ in range(limit):
        try:
            held.append(pymysql.connect(**server.connect_kwargs()))
        except OperationalError as exc:
            return exc
    raise AssertionError(f"the server accepted {limit} connections")


def park_one(pool: connguard.Pool) -> None:
    """Leave one idle connection in ``pool``: the pool asks the server's numbers through it."""
    pool.connect().close()
    assert pool.stats()["idle"] == 1


def translated(exc: BaseException, server: MariaDB) -> BaseException:
    """``connguard.translate`` on a raw PyMySQL error, as user code would call it."""
    return connguard.translate(exc, host="127.0.0.1", port=server.port, password=APP_PASSWORD)


# --- child processes --------------------------------------------------------------------------

def run_child(function: str, prefix: Sequence[str] = (), **kwargs: Any) -> Any:
    """Run ``function(**kwargs)`` of this module in a child process (see tests.peers)."""
    return peers.run_child(__name__, function, prefix, **kwargs)


# --- 1040 too many connections ----------------------------------------------------------------


def test_1040_too_many_connections(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=10)
    with admin_of(server) as admin, pool_for(server, max_size=20) as pool, \
            raw_connections() as held:
        make_app_unprivileged(admin)
        park_one(pool)
        exc = fill(server, held)
        assert exc.args[0] == 1040 and len(held) == 8  # 10 with root and the pooled one
        # A refused session is counted until it is torn down, after its error is sent
        # (MariaDB lets it log in first, then refuses): wait until it is gone.
        connected = 10
        wait_until(lambda: status(admin, "Threads_connected") == connected, DEADLINE,
                   message=f"Threads_connected to settle at {connected}")

        # The raw error alone: class and remedies, no server numbers to show.
        check(report(translated(exc, server)), "TooManyConnections", transient=True, code=1040,
              first_has=[f"too many connections to 127.0.0.1:{server.port}: server at "
                         "max_connections"])
        # Through the pool: the numbers, asked over the idle pooled connection.
        check(report(pool.translate(exc)), "TooManyConnections", transient=True, code=1040,
              first_has=["server at max_connections (10 of 10 connected)"],
              diagnosis={"max_connections": 10, "threads_connected": connected})
        assert pool.stats()["idle"] == 1  # the connection it asked through went back


def test_1040_through_pool_connect_names_the_refusal(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_connections=10)
    with admin_of(server) as admin, pool_for(server, max_size=20, checkout_timeout=1) as pool, \
            raw_connections() as held:
        make_app_unprivileged(admin)
        assert fill(server, held).args[0] == 1040
        err = raised_by(pool.connect)
    rep = report(err)
    if rep["last_cause"] is not None:  # a PoolTimeout after waiting for the server
        assert "the server refused more: TooManyConnections" in rep["str"].split("\n")[0]
        rep = rep["last_cause"]
    check(rep, "TooManyConnections", transient=True, code=1040,
          first_has=["too many connections", "server at max_connections"])


# --- 1135 the server cannot create a thread ---------------------------------------------------


def test_1135_server_thread_limit(mariadb_factory: Any) -> None:
    # RLIMIT_NPROC counts every thread of the server's user, other test servers' too, so the
    # budget moves with them: generous headroom, and no assumption on how many fit.
    server = mariadb_factory(nproc_headroom=60)
    with admin_of(server) as admin, pool_for(server) as pool, raw_connections() as held:
        park_one(pool)
        exc = fill(server, held, limit=500)
        assert exc.args[0] == 1135, exc.args
        # The refused session is torn down after the error is sent: wait until it is gone.
        connected = 2 + len(held)  # root, the pooled one, the raw ones
        wait_until(lambda: status(admin, "Threads_connected") == connected, DEADLINE,
                   message=f"Threads_connected to settle at {connected}")

        check(report(translated(exc, server)), "ServerThreadLimit", transient=True, code=1135,
              first_has=["cannot create a thread", "server errno 11 EAGAIN"],
              diagnosis={"server_errno": errno.EAGAIN})
        check(report(pool.translate(exc)), "ServerThreadLimit", transient=True, code=1135,
              first_has=[f"{connected} connected, below max_connections 151"],
              diagnosis={"max_connections": 151, "threads_connected": connected,
                         "server_errno": errno.EAGAIN})


# --- 1203 max_user_connections ----------------------------------------------------------------


def test_1203_user_connection_limit(mariadb_factory: Any) -> None:
    server = mariadb_factory(max_user_connections=3)
    with admin_of(server) as admin, pool_for(server) as pool, raw_connections() as held:
        make_app_unprivileged(admin)
        park_one(pool)
        exc = fill(server, held)
        assert exc.args[0] == 1203 and len(held) == 2

        check(report(translated(exc, server)), "UserConnectionLimit", transient=True,
              code=1203, first_has=[f"connection limit is reached at 127.0.0.1:{server.port}",
                                    "max_user_connections"])
        check(report(pool.translate(exc)), "UserConnectionLimit", transient=True, code=1203,
              first_has=["(max_user_connections = 3)"],
              diagnosis={"max_user_connections": 3})


# --- 1129 host blocked, from a client behind a veth pair ---------------------------------------


def child_host_blocked(host: str, port: int, socket_path: str, aborts: int) -> Dict[str, Any]:
    """In the namespace: interrupt ``aborts`` handshakes, then connect through connguard."""
    from testsupport.servers import ROOT_PASSWORD  # the child inherits this run's password

    admin = pymysql.connect(unix_socket=socket_path, user="root", password=ROOT_PASSWORD,
                            autocommit=True)
    try:
        with admin.cursor() as cur:
            for _ in range(aborts):
                before = status(cur, "Aborted_connects")
                with socket.create_connection((host, port), timeout=DEADLINE) as probe:
                    assert probe.recv(4), "no greeting"  # the server waits for our login now
                wait_until(lambda cur=cur, before=before: status(cur, "Aborted_connects") > before,
                           DEADLINE, message="the server to count the interrupted handshake")
            connections = status(cur, "Connections")
            kwargs = dict(host=host, port=port, user=APP_USER, password=APP_PASSWORD,
                          database=APP_DATABASE, connect_timeout=DEADLINE)
            pool = connguard.Pool(**kwargs, checkout_timeout=5)
            try:
                pooled = report(raised_by(pool.connect))
            finally:
                pool.close()
            attempts = status(cur, "Connections") - connections
            raw = raised_by(lambda: pymysql.connect(**kwargs))
            plain = report(connguard.translate(raw, host=host, port=port, password=APP_PASSWORD))
    finally:
        admin.close()
    return {"pool": pooled, "raw": plain, "pool_attempts": attempts}


@pytest.mark.netns
def test_1129_host_blocked(veth: Veth, mariadb_factory: Any) -> None:
    server = mariadb_factory(skip_name_resolve=False, max_connect_errors=2,
                             bind_address=veth.server_ip)
    result = run_child("child_host_blocked", prefix=["ip", "netns", "exec", veth.namespace],
                       host=veth.server_ip, port=server.port, socket_path=server.socket_path,
                       aborts=2)
    for rep in (result["pool"], result["raw"]):
        check(rep, "HostBlocked", transient=False, code=1129,
              first_has=[f"at {veth.server_ip}:{server.port} blocked this client host "
                         f"{veth.client_ip}", "max_connect_errors"],
              diagnosis={"blocked_host": veth.client_ip, "host": veth.server_ip})
    assert result["pool_attempts"] == 1  # permanent: connguard did not retry


# --- 1045 access denied -----------------------------------------------------------------------


def test_1045_access_denied_after_exactly_one_attempt(mariadb: MariaDB) -> None:
    bad = mariadb.connect_kwargs(password="not-" + APP_PASSWORD)  # contains the real one
    pool = connguard.Pool(**bad, checkout_timeout=5)
    try:
        with admin_of(mariadb) as admin:
            for connect in (lambda: connguard.connect(**bad), pool.connect):
                before = status(admin, "Connections"), status(admin, "Aborted_connects")
                err = raised_by(connect)
                after = status(admin, "Connections"), status(admin, "Aborted_connects")
                assert (after[0] - before[0], after[1] - before[1]) == (1, 1)  # no retry
                first = check(report(err), "AccessDenied", transient=False, code=1045,
                              first_has=["Access denied for user 'app'@'127.0.0.1' (using "
                                         f"password: YES) on 127.0.0.1:{mariadb.port} — check "
                                         "the user name and the password"])
                assert first.startswith("Access denied")  # the server's words, said once
                assert "access denied" not in str(err)
                assert not re.search(r"\b(1044|1130|1698|1862|4151)\b", "\n".join(err.remedies))
                assert "not-" not in str(err)  # the wrong password is masked too
                assert str(err).endswith("\nsee: connguard explain access-denied")
    finally:
        pool.close()
        connguard.close_all()


def test_1045_without_a_password_says_none_was_sent(mariadb: MariaDB) -> None:
    err = raised_by(lambda: connguard.connect(**mariadb.connect_kwargs(password="")))
    first = check(report(err), "AccessDenied", transient=False, code=1045,
                  first_has=["(using password: NO)"])
    assert "no password was sent (using password: NO): give it (password=" in first
    connguard.close_all()


# --- 1049 unknown database --------------------------------------------------------------------


def test_1049_unknown_database_is_translated_and_not_retried(mariadb: MariaDB) -> None:
    # As root: the application account has no grant there, so it would get 1044 instead.
    kwargs = dict(unix_socket=mariadb.socket_path, user="root", password=mariadb.root_password,
                  database="no_such_db", connect_timeout=10)
    with admin_of(mariadb) as admin:
        before = status(admin, "Connections")
        err = raised_by(lambda: connguard.connect(**kwargs))
        assert status(admin, "Connections") - before == 1  # permanent: one attempt
    check(report(err), "UnknownDatabase", transient=False, code=1049,
          first_has=["Unknown database 'no_such_db' on ", " — check the database name"])
    assert isinstance(err, connguard.UnknownDatabase) and "do not retry" in str(err)
    assert str(err).endswith("\nsee: connguard explain unknown-database")
    connguard.close_all()


# --- 2003 with errno 111: nothing listens -----------------------------------------------------


def test_2003_111_nothing_listening() -> None:
    port = free_port()
    kwargs = dict(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
                  connect_timeout=DEADLINE)
    baseline = fd_count()
    pool = connguard.Pool(**kwargs, checkout_timeout=5)
    try:
        pooled = raised_by(pool.connect)
    finally:
        pool.close()
    raw = raised_by(lambda: pymysql.connect(**kwargs))
    for err in (pooled, connguard.translate(raw, host="127.0.0.1", port=port)):
        check(report(err), "ServerUnavailable", transient=True, code=2003,
              first_has=[f"at 127.0.0.1:{port} (errno 111 ECONNREFUSED: Connection refused)"],
              diagnosis={"errno": errno.ECONNREFUSED, "port": port})
    assert fd_count() == baseline


# --- 2003 with errno 99: no local port left (inside a namespace) ------------------------------

PORTS = (40000, 40007)


def netns_ports_body(server: MariaDB, ports: int) -> Dict[str, Any]:
    """In the namespace: hold pooled connections until the kernel has no local port left."""
    result: Dict[str, Any] = {}
    unguarded = connguard.Pool(**server.connect_kwargs(), max_size=ports + 4,
                               resource_guard=False, checkout_timeout=5)
    guarded = connguard.Pool(**server.connect_kwargs(), checkout_timeout=5)
    held = []
    try:
        for _ in range(ports):
            held.append(unguarded.connect())
        result["kernel"] = report(raised_by(unguarded.connect))
        result["guard"] = report(raised_by(guarded.connect))
        raw = raised_by(lambda: pymysql.connect(**server.connect_kwargs()))
        result["raw"] = report(connguard.translate(raw, host="127.0.0.1", port=3306))
        result["ss"] = socket_states(3306)
    finally:
        for conn in held:
            conn.close()
        unguarded.close()
        guarded.close()
    return result


@pytest.mark.netns
def test_2003_99_local_ports_exhausted(mariadb_template: Any) -> None:
    ports = PORTS[1] - PORTS[0] + 1
    result = run_in_netns("tests.test_errors_real:netns_ports_body", mariadb_template,
                          port_range=PORTS, tw_reuse=0, server_options={},
                          kwargs={"ports": ports})
    assert result["ss"] == {"estab": ports}
    for key in ("kernel", "raw"):
        check(result[key], "LocalPortsExhausted", transient=True, code=2003,
              first_has=[f"toward 127.0.0.1:3306: {ports} of {ports} in use (ESTABLISHED "
                         f"{ports})"],
              diagnosis={"errno": errno.EADDRNOTAVAIL, "port_range": list(PORTS),
                         "tcp_tw_reuse": 0})
        census = result[key]["diagnosis"]["census"]
        assert census["established"] == ports and census["time_wait"] == 0
        assert result[key]["remedies"][0].startswith(f"{ports} of them are open connections")
        assert "[Errno 99]" in result[key]["str"]
    # With the resource guard on (the default) the guard or the kernel refuses: same class.
    check(result["guard"], "LocalPortsExhausted", transient=True)


# --- 2003 with errno 11: the Unix socket's listen queue is full -------------------------------


def _forget_tracebacks(err: BaseException) -> None:
    """Drop the frames an error chain holds: they keep PyMySQL's leaked Unix socket alive."""
    seen = set()
    stack: List[Any] = [err]
    while stack:
        exc = stack.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        stack += [exc.__cause__, exc.__context__, getattr(exc, "original_exception", None),
                  getattr(exc, "original", None)]


@contextlib.contextmanager
def frozen_backlog(server: MariaDB) -> Iterator[int]:
    """Freeze the server and fill its Unix socket's listen queue; yield how many wait."""
    pending: List[socket.socket] = []
    server.freeze()
    try:
        for _ in range(64):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            pending.append(sock)
            sock.setblocking(False)
            try:
                sock.connect(server.socket_path)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the listen queue never filled")
        yield len(pending) - 1
    finally:
        for sock in pending:
            sock.close()
        server.thaw()


def test_2003_11_unix_socket_backlog_full(mariadb_factory: Any) -> None:
    server = mariadb_factory(back_log=2)
    pool = connguard.Pool(unix_socket=server.socket_path, user=APP_USER, password=APP_PASSWORD,
                          database=APP_DATABASE, connect_timeout=DEADLINE, checkout_timeout=5)
    baseline = fd_count()
    err: Optional[BaseException] = None
    try:
        with frozen_backlog(server) as waiting:
            err = raised_by(pool.connect)
            rep = report(err)
        check(rep, "ResourceTemporarilyUnavailable", transient=True, code=2003,
              first_has=[f"listen queue is full at {server.socket_path} (errno 11 EAGAIN): "
                         f"{waiting} waiting, backlog 2"],
              diagnosis={"errno": errno.EAGAIN, "listen_queue": waiting, "listen_backlog": 2})
        # Thawed: the same pool connects again, once the server has drained the queue it
        # froze with (a connect racing that drain may still meet EAGAIN).
        def connects() -> bool:
            try:
                with pool.connect() as conn:
                    return bool(conn.open)
            except connguard.ResourceTemporarilyUnavailable:
                return False
        wait_until(connects, 30, message="the thawed server to accept again")
    finally:
        pool.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # PyMySQL's socket, see below
            if err is not None:
                _forget_tracebacks(err)
            del err
            gc.collect()
    assert fd_count() == baseline


def test_failed_unix_connect_leaves_no_descriptor(mariadb_factory: Any) -> None:
    server = mariadb_factory(back_log=2)
    pool = connguard.Pool(unix_socket=server.socket_path, user=APP_USER, password=APP_PASSWORD,
                          connect_timeout=DEADLINE, checkout_timeout=5)
    baseline = fd_count()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)  # counted below instead
            with frozen_backlog(server):
                # Raised and dropped here: nothing of ours holds it afterwards.
                err = raised_by(pool.connect)
                assert isinstance(err, connguard.ResourceTemporarilyUnavailable)
                del err
            gc.collect()
            leaked = fd_count() - baseline
            unclosed = [str(w.message) for w in caught if w.category is ResourceWarning]
    finally:
        pool.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for gate in _gates():
                last = getattr(getattr(gate, "_breaker", None), "last_error", None)
                if isinstance(last, BaseException):
                    _forget_tracebacks(last)
            gc.collect()
    assert leaked == 0, f"{leaked} descriptor(s) left open by a failed connect"
    assert not unclosed, unclosed  # closed by the garbage collector, not by the code


def _gates() -> List[Any]:
    """connguard's connect gates, if the storm module exists (cleanup for the test above)."""
    storm = sys.modules.get("connguard.storm")
    return list(getattr(storm, "_gates", {}).values())


# --- 2003 with errno 24: the open-file limit (in a child, so the limit dies with it) ----------


def child_fd_limit(host: str, port: int, soft: int) -> Dict[str, Any]:
    """Lower RLIMIT_NOFILE, use every descriptor, then connect through connguard."""
    "127.0.0.1".encode("idna")  # load the codec now: at the limit its import would fail first
    kwargs = dict(host=host, port=port, user=APP_USER, password=APP_PASSWORD,
                  connect_timeout=DEADLINE)
    unguarded = connguard.Pool(**kwargs, resource_guard=False, checkout_timeout=5)
    guarded = connguard.Pool(**kwargs, checkout_timeout=5)
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
        try:
            while True:
                held.append(socket.socket())
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        result = {"kernel": report(raised_by(unguarded.connect)),
                  "guard": report(raised_by(guarded.connect)), "hard": old[1]}
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        unguarded.close()
        guarded.close()
    return result


def test_2003_24_fd_limit(mariadb: MariaDB) -> None:
    soft = 64
    result = run_child("child_fd_limit", host="127.0.0.1", port=mariadb.port, soft=soft)
    hard = result["hard"]
    check(result["kernel"], "FdLimitReached", transient=True, code=2003,
          first_has=[f"all {soft} descriptors the soft limit allows are open (hard limit "
                     f"{hard:,})"],
          diagnosis={"errno": errno.EMFILE, "fd_soft": soft, "fd_hard": hard})
    assert "[Errno 24] Too many open files)" in result["kernel"]["str"]
    check(result["guard"], "FdLimitReached", transient=True)


# --- 2013 and 2006: connections lost ----------------------------------------------------------


def test_2013_killed_mid_query(mariadb: MariaDB) -> None:
    with pool_for(mariadb) as pool:
        conn = pool.connect()
        thread_id = conn.thread_id()
        failures: List[BaseException] = []

        def sleep() -> None:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT SLEEP(60)")
            except BaseException as exc:  # noqa: BLE001 - checked below
                failures.append(exc)

        worker = threading.Thread(target=sleep)
        worker.start()
        wait_until(lambda: mariadb.query(
            "SELECT 1 FROM information_schema.processlist WHERE id = %s AND info LIKE "
            "'SELECT SLEEP%%'", (thread_id,)), DEADLINE, message="the query to run")
        mariadb.kill(thread_id)
        worker.join(DEADLINE)
        assert not worker.is_alive() and len(failures) == 1
        err = failures[0]
        assert isinstance(err, OperationalError)
        check(report(err), "ConnectionLost", transient=True, code=2013,
              first_has=[f"connection to 127.0.0.1:{mariadb.port} (server thread {thread_id}) "
                         "lost while waiting for the server's reply"],
              diagnosis={"mysql_code": 2013, "thread_id": thread_id})
        assert errors.is_disconnect(err)
        conn.close()
        assert pool.stats()["broken"] == 1  # discarded, not handed out again
        with pool.connect() as fresh:
            assert fresh.thread_id() != thread_id
    assert not socket_states(mariadb.port).get("close_wait")


def test_2006_and_2003_server_stopped(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    with pool_for(server, checkout_timeout=5) as pool:
        conn = pool.connect()
        thread_id = conn.thread_id()
        server.stop()
        wait_until(lambda: socket_states(server.port).get("close_wait") == 1, DEADLINE,
                   message="the server's FIN")
        # A statement larger than the socket buffer: the server's host answers the first
        # segment with a reset, and the rest cannot be sent.
        with conn.cursor() as cur:
            err = raised_by(lambda: cur.execute("SELECT %s", ("x" * (8 << 20),)))
        rep = report(err)
        check(rep, "ConnectionLost", transient=True, code=2006,
              first_has=[f"connection to 127.0.0.1:{server.port} (server thread {thread_id}) "
                         "lost: sending to the server failed (errno "])
        assert rep["diagnosis"]["errno_name"] in ("EPIPE", "ECONNRESET")
        conn.close()
        assert pool.stats()["broken"] == 1
        # A new connection finds nobody listening.
        check(report(raised_by(pool.connect)), "ServerUnavailable", transient=True, code=2003,
              first_has=[f"at 127.0.0.1:{server.port} (errno 111 ECONNREFUSED"])
