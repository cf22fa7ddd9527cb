"""The drop-in is transparent: nothing of one borrower reaches the next, nothing waits forever.

Every check compares against what plain PyMySQL does on a fresh connection (the referee), on
a real MariaDB the suite starts. See docs/pool.md, "What a borrower can rely on".
"""

from __future__ import annotations

import ctypes
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import pymysql
import pytest

import connguard
from connguard import dropin
from tests.forking import in_forked_child
from tests.mariadb import APP_DATABASE, APP_PASSWORD, APP_USER, MariaDB, wait_until
from tests.netns import REPO_ROOT
from tests.peers import Veth

DEADLINE = 30.0  # seconds, for conditions on a loaded 2-core machine

# Everything a session carries that a borrower can change, read in one statement.
STATE_SQL = ("SELECT DATABASE(), @@character_set_client, @@character_set_results, "
             "@@collation_connection, @v, @init, @@sql_mode, @@time_zone, @@autocommit, "
             "IS_USED_LOCK('cg_lock') IS NOT NULL, @@session.lock_wait_timeout")


def state(conn: Any) -> Tuple[Any, ...]:
    last = conn.affected_rows(), conn.insert_id()  # before this function's own statements
    with conn.cursor() as cur:
        cur.execute(STATE_SQL)
        row = cur.fetchone()
        try:
            cur.execute("SELECT COUNT(*) FROM cg_temp")  # temporary tables: ask by name
            temp = True
        except pymysql.err.ProgrammingError:
            temp = False
    return (*row, temp, conn.encoding, *last)


def fresh_state(mariadb: MariaDB, **connect: Any) -> Tuple[Any, ...]:
    conn = pymysql.connect(**mariadb.connect_kwargs(**connect))
    try:
        return state(conn)
    finally:
        conn.close()


@pytest.fixture
def table(mariadb: MariaDB) -> Iterator[str]:
    mariadb.query("DROP TABLE IF EXISTS app.t_seen")
    mariadb.query("CREATE TABLE app.t_seen (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB")
    yield "app.t_seen"
    mariadb.query("DROP TABLE IF EXISTS app.t_seen")


@pytest.fixture
def other_database(mariadb: MariaDB) -> str:
    mariadb.query("CREATE DATABASE IF NOT EXISTS cg_other")
    for (host,) in mariadb.query("SELECT host FROM mysql.user WHERE user = %s", (APP_USER,)):
        mariadb.query(f"GRANT ALL ON cg_other.* TO '{APP_USER}'@'{host}'")
    return "cg_other"


def trx_of(mariadb: MariaDB, thread_id: int) -> int:
    rows = mariadb.query("SELECT COUNT(*) FROM information_schema.innodb_trx "
                         "WHERE trx_mysql_thread_id = %s", (thread_id,))
    return int(rows[0][0])


def wait_trx(mariadb: MariaDB, thread_id: int, count: int) -> None:
    """InnoDB refreshes innodb_trx only when it was not read for 0.1 s: poll slower than that
    (a faster poll reads the same stale cache for ever)."""
    wait_until(lambda: trx_of(mariadb, thread_id) == count, DEADLINE, interval=0.25,
               message=f"{count} transaction(s) of thread {thread_id} in innodb_trx")


# --- transactions ---------------------------------------------------------------------------


def test_a_select_leaves_no_transaction_behind(mariadb: MariaDB, table: str) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        with pool.connect() as conn:  # autocommit off: PyMySQL's default
            tid = conn.thread_id()
            with conn.cursor() as cur:
                cur.execute(f"SELECT COUNT(*) FROM {table}")
                assert cur.fetchone()[0] == 0
            wait_trx(mariadb, tid, 1)  # the SELECT opened one: the server says so
        wait_trx(mariadb, tid, 0)
        mariadb.query(f"INSERT INTO {table} VALUES ()")
        with pool.connect() as conn:
            assert conn.thread_id() == tid
            with conn.cursor() as cur:  # no stale REPEATABLE READ snapshot
                cur.execute(f"SELECT COUNT(*) FROM {table}")
                assert cur.fetchone()[0] == 1
        # An idle pooled connection holds no metadata lock: DDL from anyone goes through.
        with mariadb.admin() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 5")
            cur.execute(f"ALTER TABLE {table} ADD COLUMN note INT")
        assert pool.stats()["rollbacks"] == 2


COUNTERS = ("Com_select", "Com_rollback", "Com_admin_commands", "Com_change_db")


def test_nothing_to_undo_costs_no_round_trip(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        pool.connect().close()
        before = {name: mariadb.status(name) for name in COUNTERS}
        for _ in range(50):
            with pool.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")  # no table: no transaction to end
        after = {name: mariadb.status(name) for name in COUNTERS}
        # The 50 SELECTs and nothing else (the admin's status reads count elsewhere).
        assert {name: after[name] - before[name] for name in COUNTERS} == {
            "Com_select": 50, "Com_rollback": 0, "Com_admin_commands": 0, "Com_change_db": 0}


def test_a_failed_statement_with_autocommit_off_is_rolled_back(mariadb: MariaDB,
                                                                table: str) -> None:
    mariadb.query(f"INSERT INTO {table} VALUES (1)")
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        with pool.connect() as conn:
            tid = conn.thread_id()
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (2)")  # the transaction starts here
                with pytest.raises(pymysql.err.IntegrityError):
                    cur.execute(f"INSERT INTO {table} VALUES (1)")  # ERR packet: no status
        wait_trx(mariadb, tid, 0)
        assert mariadb.query(f"SELECT COUNT(*) FROM {table}")[0][0] == 1


# --- session state --------------------------------------------------------------------------

CHANGES = {
    "select_db": lambda conn, cur: conn.select_db("cg_other"),
    "USE": lambda conn, cur: cur.execute("USE cg_other"),
    "set_character_set": lambda conn, cur: conn.set_character_set("latin1"),
    "SET NAMES": lambda conn, cur: cur.execute("SET NAMES latin1"),
    "user variable": lambda conn, cur: cur.execute("SET @v = 1"),
    "user variable by SELECT": lambda conn, cur: cur.execute("SELECT @v := 2"),
    "sql_mode": lambda conn, cur: cur.execute("SET SESSION sql_mode = 'ANSI'"),
    "time_zone": lambda conn, cur: cur.execute("SET time_zone = '+05:00'"),
    "lock_wait_timeout": lambda conn, cur: cur.execute(
        "/* a comment first */ SET SESSION lock_wait_timeout = 7"),
    "GET_LOCK": lambda conn, cur: cur.execute("SELECT GET_LOCK('cg_lock', 0)"),
    "temporary table": lambda conn, cur: cur.execute("CREATE TEMPORARY TABLE cg_temp (x INT)"),
    "autocommit": lambda conn, cur: conn.autocommit(True),
    "affected rows": lambda conn, cur: cur.execute("SELECT 1 UNION SELECT 2"),
}


@pytest.mark.parametrize("reset", ["rollback", "full"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_session_state_never_reaches_the_next_borrower(mariadb: MariaDB, other_database: str,
                                                       change: str, reset: str) -> None:
    expected = fresh_state(mariadb)
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1, reset=reset) as pool:
        with pool.connect() as conn:
            tid = conn.thread_id()
            with conn.cursor() as cur:
                CHANGES[change](conn, cur)
            assert state(conn) != expected
        with pool.connect() as conn:
            assert conn.thread_id() == tid or change in ("USE", "select_db")
            assert state(conn) == expected


@pytest.mark.parametrize("reset", ["rollback", "full"])
def test_connect_settings_survive_a_session_reset(mariadb: MariaDB, reset: str) -> None:
    connect = dict(charset="latin1", sql_mode="ANSI_QUOTES", init_command="SET @init = 7",
                   autocommit=True)
    expected = fresh_state(mariadb, **connect)
    assert expected[5] == 7 and "ANSI_QUOTES" in expected[6] and expected[1] == "latin1"
    with connguard.Pool(**mariadb.connect_kwargs(**connect), max_size=1, reset=reset) as pool:
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SET @init = 0, @v = 3, NAMES utf8mb4, SESSION sql_mode = ''")
        with pool.connect() as conn:
            assert state(conn) == expected  # client encoding included
            assert pool.stats()["resets"] == 1


def test_a_used_database_where_none_was_chosen_discards_the_connection(
        mariadb: MariaDB, other_database: str) -> None:
    kwargs = mariadb.connect_kwargs()
    del kwargs["database"]
    with connguard.Pool(**kwargs, max_size=1) as pool:
        with pool.connect() as conn, conn.cursor() as cur:
            tid = conn.thread_id()
            cur.execute("USE cg_other")  # no statement selects "no database" again
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone()[0] is None
            assert conn.thread_id() != tid


def test_unread_results_are_drained_on_return(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        conn = pool.connect()
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute("SELECT seq FROM seq_1_to_5000")
        assert cur.fetchone() == (1,)
        conn.close()  # cursor not exhausted, not closed
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 42")
            assert cur.fetchone() == (42,)


# --- handles and cursors after close ------------------------------------------------------


@pytest.mark.parametrize("make", ["pymysql", "connguard"])
def test_a_cursor_is_dead_after_its_connection_closed(mariadb: MariaDB, make: str) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    try:
        conn = (pymysql.connect(**mariadb.connect_kwargs()) if make == "pymysql"
                else pool.connect())
        cur = conn.cursor()
        cur.execute("SELECT 1 UNION SELECT 2")
        assert cur.fetchone() == (1,)
        conn.close()
        assert cur.fetchone() == (2,)  # rows already read stay readable, as in PyMySQL
        with pytest.raises(pymysql.err.InterfaceError):
            cur.execute("SELECT 1")
        with pytest.raises(pymysql.err.InterfaceError):
            conn.cursor().execute("SELECT 1")  # a cursor of a closed connection, as PyMySQL's
        cur.close()
    finally:
        pool.close()


def test_a_closed_handle_reconnects_like_pymysql(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        conn = pool.connect()
        conn.close()
        with pytest.raises(pymysql.err.Error):
            conn.ping()
        with pytest.warns(DeprecationWarning):
            conn.ping(reconnect=True)  # PyMySQL reopens a closed connection; so do we
        assert conn.open and pool.stats()["in_use"] == 1
        conn.close()
        conn.connect()
        assert conn.open
        conn.close()
        assert pool.stats()["in_use"] == 0 and pool.stats()["opened"] == 1


def test_ping_reconnect_goes_through_the_pool(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        with pool.connect() as conn:
            old = conn.thread_id()
            mariadb.kill(old)
            with pytest.raises(connguard.ConnectionLost):
                conn.ping()
        with pool.connect() as conn:  # a dead one was replaced, as ever
            old = conn.thread_id()
            mariadb.kill(old)
            attempts = pool.stats()["connect_attempts"]
            with pytest.warns(DeprecationWarning):
                conn.ping(reconnect=True)
            assert conn.thread_id() != old
            assert pool.stats()["connect_attempts"] == attempts + 1  # the storm gate saw it
            assert pool.stats()["opened"] == 3


# --- waits are bounded ----------------------------------------------------------------------


def test_a_frozen_server_cannot_hang_connect_or_checkout(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    pool = connguard.Pool(**server.connect_kwargs(connect_timeout=2), max_size=2,
                          checkout_timeout=30)
    short = connguard.Pool(**server.connect_kwargs(connect_timeout=20), max_size=2,
                           checkout_timeout=1)
    server.freeze()  # SIGSTOP: the kernel still accepts TCP, the greeting never comes
    try:
        for p, bound in ((pool, 2), (short, 1)):
            started = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as info:
                p.connect()
            elapsed = time.monotonic() - started
            assert bound * 0.9 <= elapsed < bound + 5, (p, elapsed)
            assert getattr(info.value, "transient", None) is True
    finally:
        server.thaw()
        pool.close()
        short.close()


def test_doctor_does_not_hang_on_a_frozen_server(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    server.freeze()
    try:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "connguard.cli", "doctor", "--json",
                               "--dsn", f"mysql://{APP_USER}@127.0.0.1:{server.port}/app"],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                              env={"MYSQL_PWD": APP_PASSWORD, "PATH": "/usr/bin:/bin"})
        assert time.monotonic() - started < 60
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert APP_PASSWORD not in proc.stdout + proc.stderr
    finally:
        server.thaw()


def test_min_idle_top_up_never_blocks_the_reaper(mariadb_factory: Any, mariadb: MariaDB) -> None:
    frozen = mariadb_factory()
    stuck = connguard.Pool(**frozen.connect_kwargs(connect_timeout=30), max_size=2, min_idle=1,
                           checkout_timeout=30)
    frozen.freeze()
    try:
        healthy = connguard.Pool(**mariadb.connect_kwargs(), max_size=2)
        try:
            with healthy.connect() as conn:
                tid = conn.thread_id()
            mariadb.kill(tid)
            # The reaper closes the killed idle socket within its period, even though
            # another pool's top-up waits on a frozen server.
            wait_until(lambda: healthy.stats()["peer_closed"] == 1, 10,
                       message="the reaper to close the killed idle connection")
        finally:
            healthy.close()
    finally:
        frozen.thaw()
        stuck.close()


def child_partition(host: str, port: int) -> Dict[str, Any]:
    """In the namespace: start a long query, report how the partition ended it."""
    pool = connguard.Pool(host=host, port=port, user=APP_USER, password=APP_PASSWORD,
                          database=APP_DATABASE, max_size=1, keepalive=(2, 1, 2))
    conn = pool.connect()
    print("QUERYING", flush=True)
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(120)")
        outcome: Dict[str, Any] = {"error": None}
    except pymysql.err.Error as exc:
        outcome = {"error": type(exc).__name__, "transient": getattr(exc, "transient", None)}
    outcome["elapsed"] = time.monotonic() - started
    return outcome


@pytest.mark.netns
def test_a_silent_partition_ends_a_query_within_the_keepalive_bound(
        veth: Veth, mariadb_factory: Any) -> None:
    server = mariadb_factory(bind_address=veth.server_ip)
    code = ("import json, sys; import tests.test_transparency as m; "
            "print('@@' + json.dumps(m.child_partition(sys.argv[1], int(sys.argv[2]))))")
    child = subprocess.Popen(["ip", "netns", "exec", veth.namespace, sys.executable, "-c", code,
                              veth.server_ip, str(server.port)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "QUERYING"
        wait_until(lambda: server.query("SELECT COUNT(*) FROM information_schema.processlist "
                                        "WHERE info LIKE 'SELECT SLEEP%'")[0][0] == 1,
                   DEADLINE, message="the query to run")
        cut = time.monotonic()
        subprocess.run(["ip", "link", "set", veth.link, "down"], check=True, timeout=30)
        out, err = child.communicate(timeout=60)
        waited = time.monotonic() - cut
    finally:
        child.kill()
        child.wait()
    result = next(line for line in out.splitlines() if line.startswith("@@"))
    outcome = json.loads(result[2:])
    assert outcome["error"] == "ConnectionLost", (outcome, err[-2000:])
    assert outcome["transient"] is True
    assert waited < 4 + 6  # keepalive bound (2 + 1 x 2 s) plus slack for a loaded machine


# --- fork, interrupts, fairness -------------------------------------------------------------


def test_fork_while_another_thread_waits_for_a_reply(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=4)
    busy = pool.connect()
    running = threading.Thread(target=lambda: busy.query("SELECT SLEEP(3)"), daemon=True)
    running.start()
    try:
        wait_until(lambda: mariadb.query("SELECT COUNT(*) FROM information_schema.processlist "
                                         "WHERE info = 'SELECT SLEEP(3)'")[0][0] == 1,
                   DEADLINE, message="the query to be in flight")

        def child() -> int:
            with pool.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT 7")
                return int(cur.fetchone()[0])

        assert in_forked_child(child, deadline=60) == 7
    finally:
        running.join(DEADLINE)
        busy.close()
        pool.close()


def test_thirty_two_threads_on_eight_connections_all_get_turns(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=8, checkout_timeout=15)
    counts = [0] * 32
    longest = [0.0] * 32
    failures: List[BaseException] = []
    stop = threading.Event()
    start = threading.Barrier(33)  # all at once: thread start-up skew is not unfairness

    def worker(i: int) -> None:
        try:
            start.wait(DEADLINE)
            while not stop.is_set():
                asked = time.monotonic()
                with pool.connect() as conn:
                    longest[i] = max(longest[i], time.monotonic() - asked)
                    conn.query("SELECT 1")
                counts[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    try:
        start.wait(DEADLINE)
        wait_until(lambda: sum(counts) >= 32 * 100 or failures, 120, interval=0.05,
                   message="3,200 checkouts")
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
        pool.close()
    assert not failures, failures[:3]
    # FIFO: every thread gets its turns, and nobody waits long (barging starved threads
    # until checkout_timeout). Counts differ by when the OS ran each thread, not by the pool.
    assert min(counts) >= 10, sorted(counts)
    assert max(longest) < 7.5, sorted(longest)[-3:]
    assert pool.stats()["timeouts"] == 0


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt/SystemExit/an async exception."""


def test_an_interrupt_during_the_reset_keeps_the_accounting_exact(mariadb: MariaDB,
                                                                  table: str) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=2, checkout_timeout=5) as pool:
        conn = pool.connect()
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES ()")

        def interrupted() -> None:
            raise Interrupt()

        conn.__wrapped__.rollback = interrupted
        with pytest.raises(Interrupt):
            conn.close()
        assert pool.stats()["in_use"] == 0
        held = [pool.connect(), pool.connect()]  # max_size connections still usable
        for c in held:
            c.query("SELECT 1")
            c.close()


def test_an_interrupt_while_waiting_passes_the_turn_on(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1, checkout_timeout=30) as pool:
        holder = pool.connect()
        caught: List[BaseException] = []

        def wait_for_one() -> None:
            try:
                pool.connect()
            except BaseException as exc:  # noqa: BLE001 - what the test looks at
                caught.append(exc)

        waiter = threading.Thread(target=wait_for_one)
        waiter.start()
        wait_until(lambda: pool.stats()["waiting"] == 1, DEADLINE, message="a waiter")
        # An async exception, as a thread-killing framework sends: it lands when the waiter
        # wakes, whether it was served the connection or not.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(waiter.ident),
                                                   ctypes.py_object(Interrupt))
        holder.close()
        waiter.join(DEADLINE)
        assert caught and isinstance(caught[0], Interrupt)
        assert pool.stats()["in_use"] == 0 and pool.stats()["waiting"] == 0
        with pool.connect() as conn:  # the turn was passed on, not lost
            conn.query("SELECT 1")


def test_ctrl_c_during_a_handshake_frees_the_slot(mariadb_factory: Any) -> None:
    server = mariadb_factory()
    with connguard.Pool(**server.connect_kwargs(connect_timeout=20), max_size=1) as pool:
        server.freeze()
        timer = threading.Timer(0.5, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGINT))
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                pool.connect()
        finally:
            timer.cancel()
            server.thaw()
        assert pool.stats()["opening"] == 0
        with pool.connect() as conn:
            conn.query("SELECT 1")


# --- drop-in identity -----------------------------------------------------------------------


def test_unchanged_code_holding_many_connections_never_waits(mariadb: MariaDB) -> None:
    connguard.install()
    try:
        held = [pymysql.connect(**mariadb.connect_kwargs()) for _ in range(15)]  # > max_size
        pool = dropin.pool_for(**mariadb.connect_kwargs())
        assert pool.stats()["in_use"] == 15 and pool.stats()["waits"] == 0
        held[0].cursorclass = pymysql.cursors.DictCursor  # Python-side, given back too
        for conn in held:
            conn.close()
        stats = pool.stats()
        assert (stats["idle"], stats["overflow_closed"]) == (10, 5)  # max_size kept
        with pymysql.connect(**mariadb.connect_kwargs()) as conn, conn.cursor() as cur:
            assert not isinstance(cur, pymysql.cursors.DictCursor)
    finally:
        connguard.uninstall()
        dropin.close_all()



def test_conflicting_pool_options_are_an_error(mariadb: MariaDB) -> None:
    try:
        first = dropin.pool_for(**mariadb.connect_kwargs(), max_size=3)
        assert dropin.pool_for(**mariadb.connect_kwargs()) is first
        assert dropin.pool_for(**mariadb.connect_kwargs(), max_size=3) is first
        with pytest.raises(ValueError, match="max_size=3.*max_size=5"):
            dropin.pool_for(**mariadb.connect_kwargs(), max_size=5)
    finally:
        dropin.close_all()


def test_ssl_contexts_with_the_same_settings_share_a_pool(mariadb: MariaDB) -> None:
    def context(verify: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    try:
        one = dropin.pool_for(**mariadb.connect_kwargs(ssl=context(True)))
        assert dropin.pool_for(**mariadb.connect_kwargs(ssl=context(True))) is one
        assert dropin.pool_for(**mariadb.connect_kwargs(ssl=context(False))) is not one
    finally:
        dropin.close_all()


def test_callers_beyond_the_handshake_cap_are_served_as_connects_finish(
        mariadb: MariaDB) -> None:
    # 12 callers each keep a connection; 4 handshakes may run at once. Each finished
    # handshake must let the next waiter open (not wait for a return that never comes).
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=12, max_handshakes=4,
                          checkout_timeout=20)
    held: List[Any] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def take() -> None:
        try:
            conn = pool.connect()
            with lock:
                held.append(conn)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(12)]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert not errors, errors[:3]
        assert len(held) == 12 and time.monotonic() - started < 15
    finally:
        for conn in held:
            conn.close()
        pool.close()


def test_ctrl_c_during_a_query_never_hands_the_session_on(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        conn = pool.connect()
        tid = conn.thread_id()
        def interrupt_when_running() -> None:
            wait_until(lambda: mariadb.query(
                "SELECT COUNT(*) FROM information_schema.processlist "
                "WHERE info = 'SELECT SLEEP(20)'")[0][0] == 1, DEADLINE,
                message="the query to run")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        wait_for_query = threading.Thread(target=interrupt_when_running)
        wait_for_query.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                conn.query("SELECT SLEEP(20)")
        finally:
            wait_for_query.join(DEADLINE)
        assert not conn.open  # the reply would have been read by the next command
        conn.close()
        with pool.connect() as conn:  # a new session, which answers its own query
            assert conn.thread_id() != tid
            with conn.cursor() as cur:
                cur.execute("SELECT 5")
                assert cur.fetchone() == (5,)


def test_a_probe_in_flight_at_fork_does_not_stick_the_childs_breaker() -> None:
    from connguard import storm

    gate = storm.gate_for("127.0.0.1", 1, storm.StormPolicy())
    with gate._lock:
        gate._breaker.state, gate._breaker.probing = "half_open", True
    storm._after_fork_in_child()  # what os.fork runs in the child
    assert gate._breaker.probing is False
    assert gate.admit(time.monotonic() + 1) is True  # the child probes for itself


def test_a_cursor_follows_its_handle_when_reconnected(mariadb: MariaDB) -> None:
    with connguard.Pool(**mariadb.connect_kwargs(), max_size=1) as pool:
        conn = pool.connect()
        cur = conn.cursor()
        conn.close()
        with pytest.warns(DeprecationWarning):
            conn.ping(reconnect=True)  # PyMySQL's own suite does this (test_issue_114)
        cur.execute("SELECT 3")  # and a PyMySQL cursor follows its reconnected connection
        assert cur.fetchone() == (3,)
        mariadb.kill(conn.thread_id())
        with pytest.warns(DeprecationWarning):
            conn.ping(reconnect=True)  # dead: replaced through the pool
        cur.execute("SELECT 4")
        assert cur.fetchone() == (4,)
        conn.close()
        assert pool.stats()["broken"] == 0
