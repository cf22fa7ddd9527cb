"""The pool against a real MariaDB: dead sockets, CLOSE_WAIT, port churn, isolation, forks."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections import defaultdict
from typing import Any, Dict, Iterator, List

import pymysql
import pytest

import connguard
from connguard import reaper
from tests.forking import in_forked_child
from tests.mariadb import APP_PASSWORD, MariaDB, fd_count, socket_states, wait_until


@pytest.fixture
def pool(mariadb: MariaDB) -> Iterator[connguard.Pool]:
    p = connguard.Pool(**mariadb.connect_kwargs(), max_size=4)
    yield p
    p.close()


def _select_one(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        return int(cur.fetchone()[0])


def _fill_idle(pool: connguard.Pool, n: int) -> List[int]:
    """Check out n connections at once and return them: n idle, their thread ids."""
    conns = [pool.connect() for _ in range(n)]
    ids = [c.thread_id() for c in conns]
    for c in conns:
        c.close()
    return ids


def test_killed_idle_connections_are_replaced_silently(mariadb: MariaDB,
                                                       pool: connguard.Pool) -> None:
    killed = _fill_idle(pool, 4)
    for tid in killed:
        mariadb.kill(tid)
    errors = 0
    for _ in range(200):
        try:
            with pool.connect() as conn:
                assert _select_one(conn) == 1
                assert conn.thread_id() not in killed
        except pymysql.err.Error:
            errors += 1
    assert errors == 0
    assert pool.stats()["peer_closed"] >= 1


def test_reaper_clears_close_wait_without_any_checkout(mariadb: MariaDB,
                                                       pool: connguard.Pool) -> None:
    for tid in _fill_idle(pool, 4):
        mariadb.kill(tid)
    wait_until(lambda: pool.stats()["peer_closed"] == 4, 10, message="reaper to close 4 sockets")
    # The bound: no CLOSE_WAIT within 2 s of the kill. The reaper's period is 0.5 s;
    # the generous wait above absorbs a loaded machine, and this checks nothing lingers.
    assert socket_states(mariadb.port).get("close_wait", 0) == 0
    assert pool.stats()["idle"] == 0


def test_connect_per_request_reuses_connections(mariadb: MariaDB) -> None:
    kwargs = mariadb.connect_kwargs()
    connguard.configure(max_size=3)
    try:
        before_connections = mariadb.status("Connections")
        before_tw = socket_states(mariadb.port, pid=0).get("time_wait", 0)
        for _ in range(300):
            conn = connguard.connect(**kwargs)
            assert _select_one(conn) == 1
            conn.close()
        assert mariadb.status("Connections") - before_connections <= 3 + 1  # +1: status query
        assert socket_states(mariadb.port, pid=0).get("time_wait", 0) <= before_tw
    finally:
        connguard.close_all()
        connguard.configure(max_size=10)


def test_no_connection_is_shared_between_threads(mariadb: MariaDB) -> None:
    baseline_fds = fd_count()
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=8, checkout_timeout=120)
    holders: Dict[int, int] = defaultdict(int)
    overlaps: List[int] = []
    failures: List[BaseException] = []
    guard = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(40):
                with pool.connect() as conn:
                    cid = _select_one_id(conn)
                    with guard:
                        holders[cid] += 1
                        if holders[cid] > 1:
                            overlaps.append(cid)
                    assert _select_one_id(conn) == cid
                    with guard:
                        holders[cid] -= 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:3]
    assert not overlaps
    stats = pool.stats()
    assert stats["opened"] <= 8 and stats["in_use"] == 0
    pool.close()
    wait_until(lambda: fd_count() <= baseline_fds, 30, message="fds back to baseline")


def _select_one_id(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        return int(cur.fetchone()[0])


def test_open_transaction_is_rolled_back_on_return(mariadb: MariaDB) -> None:
    mariadb.query("CREATE TABLE IF NOT EXISTS app.t_txn (v INT) ENGINE=InnoDB")
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    try:
        conn = pool.connect()
        first = conn.thread_id()
        conn.begin()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO app.t_txn VALUES (42)")
        conn.close()  # forgot to commit
        with pool.connect() as conn:
            assert conn.thread_id() == first  # same server connection, clean session
            with conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM app.t_txn WHERE v = 42")
                assert cur.fetchone()[0] == 0
        # The forgotten INSERT, and the second borrower's SELECT: with autocommit off (PyMySQL's
        # default) a read of an InnoDB table opens a transaction too.
        assert pool.stats()["rollbacks"] == 2
    finally:
        pool.close()


def test_autocommit_is_restored_on_return(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(autocommit=True), max_size=1)
    try:
        with pool.connect() as conn:
            conn.autocommit(False)
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT @@autocommit")
            assert cur.fetchone()[0] == 1
    finally:
        pool.close()


def test_full_reset_clears_session_state(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, reset="full")
    try:
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SET @secret = 'left behind'")
        with pool.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT @secret")
            assert cur.fetchone()[0] is None
    finally:
        pool.close()


def test_credentials_never_share_a_connection(mariadb: MariaDB) -> None:
    mariadb.query("CREATE USER IF NOT EXISTS 'other'@'%' IDENTIFIED BY 'other-pw'")
    mariadb.query("GRANT SELECT ON app.* TO 'other'@'%'")
    try:
        a = connguard.connect(**mariadb.connect_kwargs())
        a_id = a.thread_id()
        a.close()
        b = connguard.connect(**mariadb.connect_kwargs(user="other", password="other-pw"))
        with b.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0].startswith("other@")
        assert b.thread_id() != a_id
        b.close()
    finally:
        connguard.close_all()


def test_pool_timeout_names_the_numbers(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2, checkout_timeout=0.2)
    held = [pool.connect(), pool.connect()]
    try:
        with pytest.raises(connguard.PoolTimeout) as info:
            pool.connect()
        text = str(info.value)
        assert "2" in text and isinstance(info.value, pymysql.err.OperationalError)
        assert APP_PASSWORD not in text + repr(info.value)
        assert pool.stats()["timeouts"] == 1
    finally:
        for conn in held:
            conn.close()
        pool.close()


def test_repr_tells_state_not_password(mariadb: MariaDB, pool: connguard.Pool) -> None:
    conn = pool.connect()
    text = repr(pool)
    assert "1 in use" in text and "0 idle" in text and APP_PASSWORD not in text
    conn.close()
    assert "0 in use, 1 idle" in repr(pool)
    assert APP_PASSWORD not in repr(conn)


def test_closed_handle_cannot_be_used(pool: connguard.Pool) -> None:
    conn = pool.connect()
    conn.close()
    with pytest.raises(pymysql.err.InterfaceError):
        conn.cursor().execute("SELECT 1")  # PyMySQL hands out the cursor, which then fails
    with pytest.raises(pymysql.err.Error):
        conn.close()


def test_handle_behaves_like_pymysql_connection(pool: connguard.Pool) -> None:
    with pool.connect() as conn:
        assert isinstance(conn, pymysql.connections.Connection)
        assert conn.open
        conn.ping(reconnect=False)
        assert conn.get_server_info()
        conn.commit()
        conn.rollback()
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}


def test_query_error_is_translated_and_connection_discarded(mariadb: MariaDB,
                                                            pool: connguard.Pool) -> None:
    conn = pool.connect()
    tid = conn.thread_id()
    with conn.cursor() as cur:
        mariadb.kill(tid)
        wait_until(lambda: socket_states(mariadb.port).get("close_wait"), 30,
                   message="the killed connection to reach CLOSE_WAIT")
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("SELECT 1")
    assert isinstance(info.value, connguard.ConnectionLost)
    conn.close()
    with pool.connect() as again:
        assert again.thread_id() != tid
    assert pool.stats()["broken"] == 1


def test_idle_connections_retire_before_wait_timeout(mariadb_factory: Any) -> None:
    server = mariadb_factory(wait_timeout=3)
    pool = connguard.Pool(**server.connect_kwargs(), max_size=2)
    try:
        first = _fill_idle(pool, 1)[0]
        assert pool.stats()["wait_timeout"] == 3
        assert pool.stats()["idle_timeout"] < 3
        wait_until(lambda: pool.stats()["idle_timeout"] and pool.stats()["closed"] >= 1, 30,
                   message="the idle connection to retire")
        with pool.connect() as conn:
            assert conn.thread_id() != first and _select_one(conn) == 1
    finally:
        pool.close()


def test_leaked_checkout_is_logged_with_stack(pool: connguard.Pool, mariadb: MariaDB,
                                              caplog: pytest.LogCaptureFixture) -> None:
    leaky = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, leak_threshold=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="connguard.pool"):
            conn = leaky.connect()  # the line the warning must point at
            wait_until(lambda: leaky.stats()["leaks"] == 1, 30, message="a leak report")
        conn.close()
        assert "test_leaked_checkout_is_logged_with_stack" in caplog.text
        assert APP_PASSWORD not in caplog.text
    finally:
        leaky.close()


def test_forgotten_handle_is_reclaimed(pool: connguard.Pool) -> None:
    conn = pool.connect()
    del conn  # never closed
    wait_until(lambda: pool.stats()["lost"] == 1, 30, message="the lost handle to be reclaimed")
    assert pool.stats()["in_use"] == 0


def test_fork_child_never_uses_parent_sockets(mariadb: MariaDB, pool: connguard.Pool) -> None:
    parent_ids = _fill_idle(pool, 2)
    held = pool.connect()
    held_id = held.thread_id()
    def child() -> int:  # the id the child gets from the pool it inherited
        with pool.connect() as conn:
            return int(conn.thread_id())

    child_id = in_forked_child(child)
    assert child_id not in parent_ids + [held_id]
    # The parent's connections survived the child's exit.
    assert _select_one(held) == 1 and held.thread_id() == held_id
    held.close()
    with pool.connect() as conn:
        assert conn.thread_id() in parent_ids + [held_id]


def test_install_patches_pymysql_connect(mariadb: MariaDB) -> None:
    original = pymysql.connect
    connguard.install()
    connguard.install()  # idempotent
    try:
        conn = pymysql.connect(**mariadb.connect_kwargs())
        assert isinstance(conn, connguard.PooledConnection)
        first = conn.thread_id()
        conn.close()
        again = pymysql.connect(**mariadb.connect_kwargs())
        assert again.thread_id() == first
        again.close()
    finally:
        connguard.uninstall()
        connguard.uninstall()
        connguard.close_all()
    assert pymysql.connect is original


@pytest.mark.parametrize("kwargs, word", [
    ({"max_size": 0}, "max_size"),
    ({"max_size": "10"}, "max_size"),
    ({"checkout_timeout": -1}, "checkout_timeout"),
    ({"reset": "sometimes"}, "reset"),
    ({"lifetime_jitter": 1.5}, "lifetime_jitter"),
    ({"max_sise": 3}, "max_sise"),
])
def test_bad_options_are_named(mariadb: MariaDB, kwargs: Dict[str, Any], word: str) -> None:
    threads_before = threading.active_count()
    with pytest.raises((ValueError, TypeError)) as info:
        connguard.Pool(**mariadb.connect_kwargs(), **kwargs)
    assert word in str(info.value)
    assert APP_PASSWORD not in str(info.value)
    assert threading.active_count() <= threads_before


def test_ssl_context_is_shared_and_tls_mode_unchanged(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2)
    try:
        a, b = pool.connect(), pool.connect()
        plain = pymysql.connect(**mariadb.connect_kwargs())
        try:
            assert a.ctx is b.ctx  # one context for one configuration
            assert (a.ssl, a._ssl_required) == (plain.ssl, plain._ssl_required)
            assert a.ctx.verify_mode == plain.ctx.verify_mode
            assert a.ctx.check_hostname == plain.ctx.check_hostname
        finally:
            a.close()
            b.close()
            plain.close()
    finally:
        pool.close()


def test_reaper_thread_stops_with_last_pool(mariadb: MariaDB) -> None:
    connguard.close_all()
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    assert reaper.running()
    pool.close()
    # Every other test closed its pools; engines of earlier tests (SQLAlchemy engines hold
    # reference cycles) go with the garbage collector's next pass: run it now.
    gc.collect()
    assert not list(reaper._pools)
    wait_until(lambda: not reaper.running(), 30, message="the reaper thread to exit")


def test_installed_connect_says_so_and_returns_pymysql_connections(mariadb: MariaDB) -> None:
    connguard.install()
    try:
        assert "pooled by connguard" in repr(pymysql.connect)
        conn = pymysql.connect(**mariadb.connect_kwargs())
        try:
            assert isinstance(conn, pymysql.connections.Connection)
            assert isinstance(conn, connguard.PooledConnection)
        finally:
            conn.close()
    finally:
        connguard.uninstall()
        connguard.close_all()
    assert "pooled by connguard" not in repr(pymysql.connect)


def test_an_interrupt_inside_close_still_gives_the_connection_back(mariadb: MariaDB) -> None:
    class InterruptedLease:
        """A lease whose first end is interrupted (Ctrl-C landing inside close())."""

        ends = 0
        value = False

        @property
        def returned(self) -> bool:
            return self.value

        @returned.setter
        def returned(self, value: bool) -> None:
            self.ends += 1
            if self.ends == 1:
                raise KeyboardInterrupt
            self.value = value

    with contextlib.closing(connguard.Pool(**mariadb.connect_kwargs(), max_size=1,
                                           checkout_timeout=5)) as pool:
        conn = pool.connect()
        lease = conn._self_entry.lease = InterruptedLease()
        with pytest.raises(KeyboardInterrupt):
            conn.close()
        assert pool.stats()["in_use"] == 0
        assert lease.returned is True  # ended on the way back: its cursors are done
        with pool.connect() as again:  # the one slot is free: no PoolTimeout
            assert _select_one(again) == 1


# --- the signature ------------------------------------------------------------------------


def test_the_signature_names_every_option_keyword_only() -> None:
    import inspect

    from connguard.arguments import POOL_OPTIONS

    for call, extra in ((connguard.Pool, {"clock"}), (connguard.connect, set())):
        params = inspect.signature(call).parameters
        named = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert named == POOL_OPTIONS | extra, call
        assert params["connect_args"].kind is inspect.Parameter.VAR_KEYWORD
        assert "max_size" in str(params["max_size"]) and "int" in str(params["max_size"])


def test_options_not_passed_are_left_to_their_defaults(mariadb: MariaDB) -> None:
    p = connguard.Pool(**mariadb.connect_kwargs(), max_size=3, leak_threshold=None)
    try:
        assert p._options == {"max_size": 3, "leak_threshold": None}  # as given, no more
        assert (p._settings.max_size, p._settings.checkout_timeout) == (3, 30.0)
        with p.connect() as conn:
            assert _select_one(conn) == 1
    finally:
        p.close()
    with pytest.raises(TypeError, match="'max_sise'"):
        connguard.Pool(**mariadb.connect_kwargs(), max_sise=3)
