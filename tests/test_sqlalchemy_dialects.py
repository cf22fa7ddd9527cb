"""The plugin with third-party dialects: one that names no driver, and an entry point that
serves a sync and an async MySQL dialect under one name (the way SQLAlchemy lets a dialect
package do it, with ``get_dialect_cls`` / ``get_async_dialect_cls``)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import warnings
from typing import Any, List

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.mysql.base import MySQLDialect
from sqlalchemy.dialects.mysql.pymysql import MySQLDialect_pymysql
from sqlalchemy.engine.default import DefaultDialect

from connguard.sqlalchemy_plugin import ConnGuardPluginWarning, stats
from connguard.sqlalchemy_pool import GuardedQueuePool
from tests.mariadb import MariaDB

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:sqlalchemy")


class NoDriverDialect(DefaultDialect):
    """Not MySQL, and no ``driver`` attribute (SQLAlchemy's DefaultDialect has none)."""

    name = "cgnodriver"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return sqlite3


class NoDriverMySQLDialect(MySQLDialect):
    """MySQL, on PyMySQL, but naming no driver (MySQLDialect has none). Enough to build an
    engine, not to connect (its connect arguments are not PyMySQL's)."""

    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return __import__("pymysql")


class SyncDual(MySQLDialect_pymysql):
    supports_statement_cache = True


#: Which dialect classes the entry point handed out (each call).
CALLS: List[str] = []


class DualEntryPoint:
    """The entry point of ``mysql+cgdual``: PyMySQL for create_engine, aiomysql for
    create_async_engine."""

    @classmethod
    def get_dialect_cls(cls, url: Any) -> Any:
        CALLS.append("sync")
        return SyncDual

    @classmethod
    def get_async_dialect_cls(cls, url: Any) -> Any:
        CALLS.append("async")
        return _async_dual()

    @classmethod
    def engine_created(cls, engine: Any) -> None:
        pass


def _async_dual() -> Any:
    from sqlalchemy.dialects.mysql.aiomysql import MySQLDialect_aiomysql

    class AsyncDual(MySQLDialect_aiomysql):
        supports_statement_cache = True
    return AsyncDual


registry.register("cgnodriver", __name__, "NoDriverDialect")
registry.register("mysql.cgnodriver", __name__, "NoDriverMySQLDialect")
registry.register("mysql.cgdual", __name__, "DualEntryPoint")


def test_a_dialect_without_a_driver_name_gets_the_not_mysql_warning(tmp_path: Any) -> None:
    with pytest.warns(ConnGuardPluginWarning, match="not MySQL/MariaDB"):
        engine = sa.create_engine(f"cgnodriver:///{tmp_path}/x.db?plugin=connguard")
    assert stats(engine)["support"] == "none"
    engine.dispose()


def test_a_mysql_dialect_without_a_driver_name_is_partly_guarded(mariadb: MariaDB) -> None:
    with pytest.warns(ConnGuardPluginWarning, match="driver None is not one connguard"):
        engine = sa.create_engine(mariadb.url("mysql+cgnodriver") + "?plugin=connguard")
    assert stats(engine)["support"] == "partial"
    assert isinstance(engine.pool, GuardedQueuePool)
    engine.dispose()


def test_one_entry_point_for_sync_and_async_gets_each_its_guarded_pool(
        mariadb: MariaDB) -> None:
    pytest.importorskip("greenlet")
    pytest.importorskip("aiomysql")
    from sqlalchemy.ext.asyncio import create_async_engine

    from connguard.sqlalchemy_async_pool import GuardedAsyncQueuePool

    url = mariadb.url("mysql+cgdual") + "?plugin=connguard"
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConnGuardPluginWarning)  # no "used as it is"
        engine = sa.create_engine(url)
        async_engine = create_async_engine(url)
    # One dialect class each, asked for once: by create_engine, none by the plugin.
    assert CALLS == ["sync", "async"]
    try:
        assert type(engine.pool) is GuardedQueuePool
        assert isinstance(async_engine.sync_engine.pool, GuardedAsyncQueuePool)
        assert stats(engine)["support"] == stats(async_engine.sync_engine)["support"] == "full"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1

        async def query() -> Any:
            try:
                async with async_engine.connect() as conn:
                    return (await conn.execute(sa.text("SELECT 1"))).scalar()
            finally:
                await async_engine.dispose()  # on the loop its connections live on
        assert asyncio.run(query()) == 1
    finally:
        engine.dispose()
        gc.collect()
