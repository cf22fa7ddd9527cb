"""Observability against a real MariaDB: one stats schema for pools and engines, exact
counters and distributions, events (a listener cannot break the pool), stats() of all."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Any, Dict, List

import pytest
import sqlalchemy as sa

import connguard
from connguard import events
from tests.mariadb import MariaDB, wait_until
from tests.optional import optional

SECTIONS = {"name", "kind", "sizes", "counters", "distributions"}
SIZES = {"idle", "in_use", "opening", "max", "ceiling"}
COUNTERS = {"checkouts", "opened", "closed", "peer_closed", "reaped", "timeouts", "waits",
            "connect_failures", "rollbacks", "resets", "breaker_opens"}
DISTRIBUTIONS = {"checkout_wait_s", "connect_s", "hold_s"}


@pytest.fixture
def recorded() -> Any:
    """Every event of every pool, as (pool name, event, details)."""
    seen: List[Any] = []

    def make(name: str) -> Any:
        return lambda pool, **details: seen.append((pool, name, details))

    listeners = {name: make(name) for name in events.EVENTS}
    for name, fn in listeners.items():
        events.listen(None, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners.items():
            events.remove(None, name, fn)
    assert events.active == 0


def _select_one(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchall()


def _shape(stats: Dict[str, Any]) -> None:
    assert set(stats) >= SECTIONS
    assert set(stats["sizes"]) == SIZES and set(stats["counters"]) == COUNTERS
    assert set(stats["distributions"]) == DISTRIBUTIONS


def test_pool_counters_distributions_and_events_are_exact(mariadb: MariaDB,
                                                           recorded: Any) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2, name="orders")
    try:
        first, second = pool.connect(), pool.connect()
        _select_one(first)
        first.close()
        second.close()
        for _ in range(3):
            with pool.connect() as conn:
                _select_one(conn)
        # The server kills one idle connection: the reaper finds it closed.
        mariadb.kill(mariadb.app_threads()[0])
        wait_until(lambda: any(e == "reaped" for _, e, _ in recorded), 30,
                   message="the reaper to close the killed connection (and say so)")
        stats = pool.stats()
    finally:
        pool.close()
    _shape(stats)
    counters, dist = stats["counters"], stats["distributions"]
    assert stats["name"] == "orders" and stats["kind"] == "pool"
    assert counters["checkouts"] == 5 and counters["opened"] == 2
    assert counters["peer_closed"] == 1 and counters["reaped"] == 1
    assert counters["closed"] == {"peer_closed": 1}
    assert dist["checkout_wait_s"]["count"] == 5 and dist["connect_s"]["count"] == 2
    assert dist["hold_s"]["count"] == 5
    assert dist["connect_s"]["buckets"][-1] == [None, 2]  # cumulative, +Inf last
    mine = Counter(event for name, event, _ in recorded if name == "orders")
    assert mine == {"connect": 2, "checkout": 5, "checkin": 5, "peer_closed": 1, "reaped": 1}
    assert all(details["held"] >= 0 for name, event, details in recorded
               if event == "checkin")


def test_timeouts_and_waits_are_counted(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, checkout_timeout=0.2)
    try:
        held = pool.connect()
        with pytest.raises(connguard.PoolTimeout):
            pool.connect()
        held.close()
        counters = pool.stats()["counters"]
    finally:
        pool.close()
    assert counters["timeouts"] == 1 and counters["waits"] == 1
    assert counters["checkouts"] == 1


def test_the_idle_timeout_count_is_not_the_setting(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2, idle_timeout=0.2)
    try:
        pool.connect().close()
        wait_until(lambda: pool.stats()["counters"]["closed"].get("idle_timeout") == 1, 30,
                   message="the reaper to retire the idle connection")
        stats = pool.stats()
    finally:
        pool.close()
    assert stats["idle_timeout"] == 0.2  # the setting, as before
    assert stats["counters"]["closed"] == {"idle_timeout": 1}


def test_a_listener_that_raises_cannot_break_the_pool(mariadb: MariaDB, caplog: Any) -> None:
    calls: List[str] = []

    def broken(pool: str, **details: Any) -> None:
        calls.append(pool)
        raise RuntimeError("listener bug")

    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    events.listen(pool, "checkout", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="connguard.events"):
            for _ in range(3):
                with pool.connect() as conn:
                    _select_one(conn)
    finally:
        events.remove(pool, "checkout", broken)
        pool.close()
    assert len(calls) == 3
    assert len([r for r in caplog.records if "listener" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="unknown connguard event"):
        events.listen(None, "chekout", broken)


def test_breaker_transitions_are_events_and_counted(recorded: Any) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # refuses every connect
    port = listener.getsockname()[1]
    pool = connguard.Pool(host="127.0.0.1", port=port, user="u", password="p",
                          checkout_timeout=0.05)
    try:
        for _ in range(4):
            with pytest.raises(connguard.ServerUnavailable):
                pool.connect()
            time.sleep(0.3)  # past the backoff: each call makes an attempt
        stats = pool.stats()
    finally:
        pool.close()
        listener.close()
    opened = [d for name, event, d in recorded if event == "breaker_open"
              and name == f"127.0.0.1:{port}"]
    assert len(opened) == 1 and opened[0]["failures"] >= 3 and "ECONNREFUSED" in \
        opened[0]["cause"]
    assert stats["counters"]["breaker_opens"] == 1
    assert stats["counters"]["connect_failures"].get("ServerUnavailable", 0) >= 3


def test_engines_have_the_same_schema_and_stats_lists_everything(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, name="jobs")
    engine = sa.create_engine(mariadb.url() + "?plugin=connguard", pool_size=2)
    try:
        pool.connect().close()
        for _ in range(3):
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        everything = connguard.stats()
        one = connguard.stats(engine)
    finally:
        engine.dispose()
        pool.close()
    _shape(one)
    assert one["kind"] == "engine" and one["name"] == f"app@127.0.0.1:{mariadb.port}/app"
    assert one["counters"]["checkouts"] == 3 and one["counters"]["opened"] == 1
    assert one["distributions"]["checkout_wait_s"]["count"] == 3
    assert one["distributions"]["connect_s"]["count"] == 1
    assert everything["jobs"]["counters"]["checkouts"] == 1
    assert everything[one["name"]]["kind"] == "engine"
    _shape(everything["jobs"])


def _sample_stats(mariadb: MariaDB) -> Any:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=2, name="exported")
    for _ in range(4):
        with pool.connect() as conn:
            _select_one(conn)
    return pool


def test_a_prometheus_scrape_parses_and_matches_stats(mariadb: MariaDB) -> None:
    prometheus_client = optional("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from connguard.prometheus import register

    pool = _sample_stats(mariadb)
    registry = prometheus_client.CollectorRegistry()
    register(registry)
    try:
        text = prometheus_client.generate_latest(registry).decode()
    finally:
        pool.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    mine = (("kind", "pool"), ("pool", "exported"))
    assert samples[("connguard_checkouts_total", mine)] == 4
    assert samples[("connguard_opened_total", mine)] == 1
    assert samples[("connguard_checkout_wait_seconds_count", mine)] == 4
    assert samples[("connguard_hold_seconds_bucket", (*mine[:1], ("le", "+Inf"),
                                                     *mine[1:]))] == 4
    assert samples[("connguard_max", mine)] == 2
    assert "# TYPE connguard_connect_seconds histogram" in text
    assert mariadb.connect_kwargs()["password"] not in text


def test_opentelemetry_metrics_read_the_same_numbers(mariadb: MariaDB) -> None:
    optional("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from connguard.otel import instrument

    pool = _sample_stats(mariadb)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        instrument(provider)
        data = reader.get_metrics_data()
    finally:
        pool.close()
        provider.shutdown()
    points = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if point.attributes.get("db.client.connection.pool.name") == "exported":
                        state = point.attributes.get("db.client.connection.state")
                        points[metric.name + (f"/{state}" if state else "")] = point.value
    assert points["connguard.pool.checkouts"] == 4
    assert points["connguard.pool.opened"] == 1
    assert points["connguard.pool.wait_time.count"] == 4
    assert points["db.client.connection.max"] == 2
    assert points["db.client.connection.count/idle"] == 1
    assert points["db.client.connection.count/used"] == 0


def test_checkouts_never_go_down_and_top_ups_are_not_checkouts(mariadb: MariaDB) -> None:
    seen: List[int] = []
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=3, min_idle=2)
    events.listen(pool, "checkin",
                  lambda name, held: seen.append(pool.stats()["counters"]["checkouts"]))
    try:
        wait_until(lambda: pool.stats()["idle"] >= 2, 30, message="min_idle top-ups")
        assert pool.stats()["counters"]["checkouts"] == 0  # the pool's own, not callers'
        assert pool.stats()["distributions"]["hold_s"]["count"] == 0
        for i in range(6):
            with pool.connect() as conn:
                _select_one(conn)
            if i == 2:  # connections that served checkouts die and are discarded
                mariadb.kill_app_connections()
        stats = pool.stats()
    finally:
        pool.close()
    assert seen == sorted(seen) and seen[-1] == 6, seen
    assert stats["counters"]["checkouts"] == 6
    assert stats["distributions"]["hold_s"]["count"] == 6


def test_pools_that_share_a_name_are_all_listed(mariadb: MariaDB) -> None:
    first = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    second = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    try:
        names = [n for n in connguard.stats() if n.startswith("app@")]
    finally:
        first.close()
        second.close()
    base = f"app@127.0.0.1:{mariadb.port}/app"
    assert base in names and f"{base}#2" in names


def test_names_stay_with_their_pools(mariadb: MariaDB) -> None:
    a = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, name="orders")
    b = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, name="orders")
    try:
        assert (a.name, b.name) == ("orders", "orders#2")
        a.close()
        c = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, name="orders")
        assert b.name == "orders#2" and c.name == "orders"  # b keeps its series
        assert connguard.stats()["orders#2"]["name"] == "orders#2"
        c.close()
    finally:
        b.close()


def test_a_wait_under_the_longest_timeout_is_timed(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1,
                          checkout_timeout=86400)  # the longest allowed
    try:
        held = pool.connect()
        waiter = threading.Thread(target=lambda: pool.connect().close())
        waiter.start()
        wait_until(lambda: pool.stats()["waiting"] == 1, 30, message="a waiter")
        held.close()
        waiter.join(30)
        waited = pool.stats()["distributions"]["checkout_wait_s"]
    finally:
        pool.close()
    assert waited["count"] == 2 and 0 <= waited["sum"] < 30  # not nan, not inf


def test_removing_a_bound_method_listener_counts_it_off() -> None:
    class Watcher:
        def on_connect(self, pool: str, seconds: float) -> None:
            pass

    watcher = Watcher()
    before = events.active
    events.listen(None, "connect", watcher.on_connect)
    assert events.active == before + 1 and "connect" in events.wanted
    events.remove(None, "connect", watcher.on_connect)  # a new bound method object: ==
    assert events.active == before and "connect" not in events.wanted


def test_a_listener_raising_systemexit_leaves_no_connection_behind(mariadb: MariaDB) -> None:
    def leave(pool: str, waited: float) -> None:
        raise SystemExit(3)

    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1)
    try:
        pool.connect().close()
        events.listen(pool, "checkout", leave)
        with pytest.raises(SystemExit):
            pool.connect()
        events.remove(pool, "checkout", leave)
        assert pool.stats()["in_use"] == 0
        with pool.connect() as conn:  # the one connection came back: usable at once
            _select_one(conn)
        counters = pool.stats()["counters"]
        # Taken back once: closed (its session is not known to be clean), never twice.
        assert sum(counters["closed"].values()) <= 1
    finally:
        pool.close()


def test_registering_the_collector_twice_exports_every_series_once(mariadb: MariaDB) -> None:
    prometheus_client = optional("prometheus_client")
    from connguard.prometheus import register

    registry = prometheus_client.CollectorRegistry()
    assert register(registry) is register(registry)
    pool = connguard.Pool(**mariadb.connect_kwargs(), max_size=1, name="twice")
    try:
        text = prometheus_client.generate_latest(registry).decode()
    finally:
        pool.close()
    assert text.count('connguard_max{kind="pool",pool="twice"}') == 1
