"""SQLAlchemy engine plugin: ``create_engine(url + "?plugin=connguard")``.

What it does to an engine on the ``mysql+pymysql`` or ``mysql+mysqldb`` (mysqlclient)
dialect (or ``mariadb+...``), and to async engines on ``mysql+aiomysql`` and ``mysql+asyncmy``
(their waits yield to the event loop, their dead idle connections are closed by their loop,
their pool stays SQLAlchemy's):

* every new DBAPI connection is opened by the dialect's own ``connect`` (so the engine's
  DBAPI module, ``module=`` or a patched ``pymysql.connect``, does the connecting) inside
  connguard's connect path: OS resource guard, reconnect-storm gate, translated errors, and
  the TLS context PyMySQL built for the engine's first connection reused when PyMySQL would
  only build the same one again; hooked in through the dialect's ``do_connect`` event;
* on checkout, :func:`connguard.liveness.peer_closed` replaces ``pool_pre_ping``'s round trip: a
  connection whose server end is gone raises ``DisconnectionError`` from the ``checkout`` event,
  which is SQLAlchemy's documented way to have the pool invalidate it and connect again;
* connguard's reaper thread closes idle pooled connections whose peer closed (no CLOSE_WAIT)
  and, unless ``pool_recycle`` was given, those idle longer than the server's ``wait_timeout``
  allows (read once, on the first connect);
* ``handle_error`` puts connguard's translated exception in ``.orig`` and decides
  ``is_disconnect`` with :func:`connguard.errors.is_disconnect`;
* the engine's ``QueuePool`` becomes a :class:`connguard.sqlalchemy_pool.GuardedQueuePool`:
  when the server is full it holds what it has and makes callers wait (adaptive ceiling), and
  it opens at most ``max_handshakes`` connections at once.

Other MySQL drivers get the parts that do not depend on the driver (recycling below
``wait_timeout``, the guarded pool) and a warning; other databases get a warning only.
What differs between drivers is in :mod:`connguard.dbapis`.
``docs/sqlalchemy.md`` is the guide.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pymysql
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CreateEnginePlugin
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from connguard import coordination, dbapis, driver, errors, events, metrics, reaper, storm
from connguard.liveness import Probe
from connguard.metrics import empty_distribution
from connguard.sqlalchemy_async_pool import GuardedAsyncQueuePool
from connguard.sqlalchemy_connect import EngineConnect
from connguard.sqlalchemy_options import (  # noqa: F401 - re-exported: the plugin's options
    COORDINATION_OPTIONS,
    OPTION_NAMES,
    PREFIX,
    STORM_OPTIONS,
    ConnGuardPluginWarning,
    PluginOptions,
    check_connect_args,
    check_coordinator,
    coordinator_of,
    parse_options,
    single_value,
    warn,
)
from connguard.sqlalchemy_pool import GuardedQueuePool
from connguard.sqlalchemy_reaper import IdleReaper, _Reaped  # noqa: F401 - _Reaped: its home

__all__ = ["ConnGuardPlugin", "ConnGuardPluginWarning", "PluginOptions", "stats"]

log = logging.getLogger("connguard.sqlalchemy")

_PYMYSQL_CONNECTION = pymysql.connections.Connection


class ConnGuardPlugin(CreateEnginePlugin):
    """Registered as the ``connguard`` entry point of ``sqlalchemy.plugins``.

    SQLAlchemy makes one per ``create_engine`` call: ``__init__`` consumes the options,
    ``handle_pool_kwargs`` notes what the user set on the pool, ``engine_created`` installs
    the listeners.
    """

    def __init__(self, url: Any, kwargs: Dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        check_connect_args(kwargs.get("connect_args"))
        self.options = parse_options(url.query, kwargs)
        check_coordinator(self.options)  # made now, as connguard.Pool makes it
        self._password = url.password  # only to mask it in translated errors
        self._custom_creator = "creator" in kwargs
        self._guard: Optional[EngineGuard] = None
        self._user_recycle = False
        self._destination = _url_destination(url)
        # create_engine's own kwargs (its copy, made for the plugins): where the pool class
        # is chosen, in handle_dialect_kwargs.
        self._engine_kwargs = kwargs

    def update_url(self, url: Any) -> Any:
        return url.difference_update_query([k for k in url.query if k.startswith(PREFIX)])

    def handle_dialect_kwargs(self, dialect_cls: Any, dialect_args: Dict[str, Any]) -> None:
        # The pool class is chosen here, from the dialect class create_engine itself chose
        # (sync or async, from the same entry point): handle_pool_kwargs sees the pool class
        # but cannot change it (create_engine keeps it in a local variable), while the
        # poolclass create_engine reads after this call is in this dict.
        _choose_pool_class(dialect_cls, self.url, self._engine_kwargs)

    def handle_pool_kwargs(self, pool_cls: Any, pool_args: Dict[str, Any]) -> None:
        # create_engine copies only what the user passed: presence means "set by the user".
        self._user_recycle = "recycle" in pool_args
        if isinstance(pool_cls, type) and issubclass(pool_cls, GuardedQueuePool):
            pool_args["connguard_policy"] = (
                storm.policy_from_options(dict(self.options.storm_settings))
                if self.options.storm_control else None)
            # No global budget for async engines: its lease calls are blocking Redis I/O
            # (the coordinator is not used for them at all, see docs/sqlalchemy.md).
            pool_args["connguard_budget"] = (
                None if issubclass(pool_cls, GuardedAsyncQueuePool)
                else _budget_factory(self.options, *self._destination))
            pool_args["connguard_gate"] = self._gate

    def engine_created(self, engine: Any) -> None:
        guard = EngineGuard(engine, self.options, user_recycle=self._user_recycle,
                            password=self._password)
        guard.install(custom_creator=self._custom_creator)
        self._guard = guard

    def _gate(self) -> Optional[storm.ConnectGate]:
        """The connect gate the engine's connects go through (None before the first one,
        or with storm control off): the guarded pool asks it whether the server is down."""
        guard = self._guard
        return guard.connect_path.gate() if guard is not None else None


def _url_destination(url: Any) -> Tuple[str, int]:
    """(host, port) the engine's URL names, as :func:`connguard.driver.destination` has it
    (the pool's Budget is made before the first connect shows the connect arguments)."""
    socket_path = url.query.get("unix_socket")
    return driver.destination({"host": url.host, "port": url.port,
                               "unix_socket": single_value("unix_socket", socket_path)})


def _budget_factory(options: PluginOptions, host: str,
                    port: int) -> Optional[Callable[[int], coordination.Budget]]:
    """What makes the guarded pool's Budget (one per pool), or None without global_max."""
    settings = options.coordination_settings
    if settings.coordinator is None or settings.global_max is None:
        return None
    destination = coordination.destination_key(host, port, settings.key)
    cap, ttl, fail = settings.global_max, settings.lease_ttl, settings.fail

    def make(max_size: int) -> coordination.Budget:
        coordinator = coordinator_of(options)
        assert coordinator is not None
        return coordination.Budget(coordinator, destination, cap=cap, ttl=ttl, fail=fail,
                                   max_size=max_size)
    return make


def _choose_pool_class(dialect_cls: Any, url: Any, kwargs: Dict[str, Any]) -> None:
    """Put GuardedQueuePool in place of QueuePool (exactly that class, chosen by the user or
    the dialect's default) for a MySQL engine; leave any other pool alone, with a warning.
    ``dialect_cls``: the one create_engine chose (its async one for create_async_engine)."""
    if _support(dialect_cls) == NONE:
        return  # nothing to guard
    is_async = getattr(dialect_cls, "is_async", False) is True
    default, guarded = ((AsyncAdaptedQueuePool, GuardedAsyncQueuePool) if is_async
                        else (QueuePool, GuardedQueuePool))
    if kwargs.get("pool") is not None:
        chosen = type(kwargs["pool"])
    else:
        chosen = kwargs.get("poolclass") or dialect_cls.get_pool_class(url)
        if chosen is default:
            kwargs["poolclass"] = guarded
            return
    if not (isinstance(chosen, type) and issubclass(chosen, GuardedQueuePool)):
        name = getattr(chosen, "__name__", repr(chosen))
        warn(f"connguard: the engine's pool ({name}) is used as it is; the adaptive ceiling "
              "and the handshake cap apply to SQLAlchemy's QueuePool and AsyncAdaptedQueuePool "
              "only, so a server at "
              "max_connections reaches callers as TooManyConnections")


# --- per-engine state and listeners -------------------------------------------------------

def guarded_engines() -> List[Any]:
    """Every live engine made with the plugin."""
    return metrics.guarded_engines()


def guard_of(engine: Any) -> Optional[EngineGuard]:
    """The plugin's state for ``engine`` (None if it was not made with the plugin)."""
    return metrics.engine_guard(engine)


def _engine_name(url: Any) -> str:
    """``user@host:port/db`` of an engine's URL: its name in stats (never the password)."""
    where = url.host or "localhost"
    if url.port or not url.query.get("unix_socket"):  # named like a Pool: the port always
        where = f"{where}:{url.port or 3306}"
    return f"{url.username or ''}@{where}" + (f"/{url.database}" if url.database else "")


FULL, PARTIAL, NONE = "full", "partial", "none"


def _support(dialect: Any) -> str:
    if dialect.name not in ("mysql", "mariadb"):
        return NONE
    # A third-party dialect need not have a driver name: one connguard does not know.
    return FULL if getattr(dialect, "driver", None) in dbapis.GUARDED else PARTIAL


class EngineGuard:
    """What the plugin keeps per engine: its options and counters, and the listeners that
    check connections out, see them invalidated and translate errors. Its connect path
    (:class:`connguard.sqlalchemy_connect.EngineConnect`) and its idle connections
    (:class:`connguard.sqlalchemy_reaper.IdleReaper`) are parts of their own.

    Holds the engine weakly (the reaper must not keep an engine alive); the engine's pool and
    dialect hold this object through their listeners, so it lives as long as the engine.
    """

    def __init__(self, engine: Any, options: PluginOptions, user_recycle: bool,
                 password: Any) -> None:
        self._engine = weakref.ref(engine)
        self.options = options
        facts = dbapis.facts_for(engine.dialect)  # the module the dialect really loaded
        support = _support(engine.dialect)
        self.support = PARTIAL if support == FULL and facts is None else support
        # How to watch this driver's connections (PyMySQL's when it has none: a do_connect
        # listener may still return PyMySQL connections, which are then watched).
        self.facts = facts or dbapis.PYMYSQL
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        # Checkouts are counted apart, lock-free: ``+= 1`` on an int attribute has no call
        # inside, so CPython never switches threads in the middle of it.
        self._checkouts = 0
        self._foreign_warned = False
        self._pid = os.getpid()  # the process whose connections and locks these are
        self.name = metrics.claim_name(_engine_name(engine.url), self)
        self._listeners = events.Listeners()
        self.connect_path = EngineConnect(self._engine, options, self.facts, self.name,
                                          self._listeners, password)
        self.idle = IdleReaper(self._engine, options, self.facts,
                               closes_idle=options.reaper and self.support == FULL,
                               user_recycle=user_recycle, password=password)

    @property
    def wait_timeout(self) -> Optional[int]:
        """The server's wait_timeout, read on the first connect (None before)."""
        return self.idle.wait_timeout

    @property
    def idle_timeout(self) -> Optional[float]:
        """How long a connection may stay idle (derived from wait_timeout unless given)."""
        return self.idle.idle_timeout

    # -- installation ----------------------------------------------------------------------
    def install(self, custom_creator: bool) -> None:
        engine = self._engine()
        assert engine is not None
        metrics.register_engine(engine.dialect, self)
        if self.support == NONE:
            warn(f"connguard: the {engine.dialect.name} dialect is not MySQL/MariaDB; the "
                 "plugin does nothing for this engine")
            return
        event.listen(engine.pool, "connect", self._on_connect)
        if self.support == PARTIAL:
            driver_name = getattr(engine.dialect, "driver", None)
            warn(f"connguard: driver {driver_name!r} is not one connguard "
                 "guards (pymysql, mysqldb, aiomysql, asyncmy); only "
                 "recycling below the server's wait_timeout and the guarded pool (adaptive "
                 "ceiling, handshake cap) apply. Not applied: guarded connects (resource "
                 "guard, storm gate), the peer-closed check on checkout, the reaper, error "
                 "translation. Use mysql+pymysql, mysql+mysqldb, mysql+aiomysql or mysql+asyncmy "
                 "for all of it.")
            if self._budget() is not None:
                reaper.register(self)  # refreshes the leases (the rest is for PyMySQL only)
            return
        if custom_creator:
            warn("connguard: create_engine(creator=...) bypasses do_connect, so new "
                 "connections do not go through connguard's connect path (resource guard, "
                 "storm gate, cached TLS context); the other protections apply")
        self._install_full(engine)

    def _install_full(self, engine: Any) -> None:
        event.listen(engine, "do_connect", self.connect_path.listener())
        event.listen(engine.pool, "checkout", self._on_checkout)
        # The guarded pool stamps the idle time itself; async engines also need the loop
        # each idle connection lives on (for the reaper), which only the listener records.
        if not isinstance(engine.pool, GuardedQueuePool) or self.facts.is_async:
            event.listen(engine.pool, "checkin", self._on_checkin)
        event.listen(engine.pool, "invalidate", self._on_invalidate)
        event.listen(engine, "handle_error", self._handle_error, retval=True)
        if self.options.reaper or self._budget() is not None:
            reaper.register(self)  # with a global budget, also to refresh the leases

    def _budget(self) -> Optional[coordination.Budget]:
        engine = self._engine()
        pool = None if engine is None else engine.pool
        return pool._budget if isinstance(pool, GuardedQueuePool) else None

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # -- new connections -------------------------------------------------------------------
    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        if not dbapis.watchable(dbapi_conn, self.facts):
            if self.support == FULL:
                self._warn_foreign(dbapi_conn)
            return  # not a connection to ask anything of (a listener's own, a test double)
        dbapis.facts_of(dbapi_conn, self.facts).connected(dbapi_conn)
        if self.idle.wait_timeout is None:
            self.idle.learn_wait_timeout(dbapi_conn, partial=self.support == PARTIAL)

    def _warn_foreign(self, dbapi_conn: Any) -> None:
        """Once per engine: a do_connect listener returned a connection connguard cannot
        watch (not PyMySQL's, or a proxy that hides its socket)."""
        with self._lock:
            if self._foreign_warned:
                return
            self._foreign_warned = True
        kind = type(dbapi_conn)
        log.warning("connguard: a do_connect listener returned a %s.%s, not a %s "
                    "connection; such connections are used as they are, without the "
                    "peer-closed check on checkout and without reaping when their server end "
                    "closes (said once per engine)", kind.__module__, kind.__qualname__,
                    self.facts.name)

    # -- checkout / checkin ----------------------------------------------------------------
    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        """Refuse a connection whose server end is gone; SQLAlchemy then invalidates it and
        connects again (at most once more per checkout), and the caller never sees it."""
        self._checkouts += 1
        # PyMySQL's socket and _probe, inlined: every checkout passes here (the socket read
        # directly, no getattr call). The probe (a cached poll object; it follows the fd when
        # the record reconnects) is an attribute of the record, not a key of record.info:
        # that dict is the user's, and must stay empty, JSON-serialisable and copyable.
        try:
            probe = record._connguard_probe
        except AttributeError:
            probe = record._connguard_probe = Probe()
        if isinstance(dbapi_conn, _PYMYSQL_CONNECTION):
            try:
                sock = dbapi_conn._sock
            except AttributeError:  # a proxy that passes for one but hides it (warned once)
                return
            if sock is not None and not probe.dead(sock):
                return
        elif not self.facts.watches(dbapi_conn):
            return  # a do_connect listener's own connection: nothing to check (warned once)
        else:
            if self.facts.is_async:
                self.idle.checked_out(record)
            if not self._other_driver_dead(dbapi_conn, probe):
                return
        self._count("peer_closed")
        raise sa_exc.DisconnectionError(
            f"connguard: connection "
            f"{dbapis.facts_of(dbapi_conn, self.facts).thread_id(dbapi_conn)} was "
            "closed by the server while idle in the pool (peer closed)")

    def _other_driver_dead(self, conn: Any, probe: Probe) -> bool:
        """The peer-closed check for a driver other than PyMySQL (see connguard.dbapis)."""
        try:
            pollable = self.facts.pollable(conn)
            return pollable is None or probe.dead(pollable)
        except self.facts.error_class:  # closed under us: fileno() refuses
            return True

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        record._connguard_idle_since = time.monotonic()
        if self.facts.is_async and self.options.reaper and dbapi_conn is not None \
                and self.facts.watches(dbapi_conn):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # returned outside its loop (a finalizer): not watched
                return
            self.idle.idle_on(record, dbapi_conn, loop)

    def _on_invalidate(self, dbapi_conn: Any, record: Any, exception: Any) -> None:
        self._count("invalidated")
        if exception is not None:  # lost to an error (not a recycle, not dispose): its
            self.connect_path.lost()  # replacement is paced by the gate as a reconnect

    # -- errors ----------------------------------------------------------------------------
    def _handle_error(self, ctx: Any) -> Any:
        """Decide is_disconnect with connguard's table and put the translated error in
        ``.orig``; returning the new exception is SQLAlchemy's chaining protocol."""
        original = ctx.original_exception
        if not (errors.is_driver_error(original) or isinstance(original, OSError)):
            # KeyboardInterrupt and friends: SQLAlchemy's own rules apply (it invalidates
            # the connection). An Exception raised inside the driver's code (by a signal
            # handler: Celery's soft time limit) left the connection's protocol state unknown
            # (a command half sent, a reply half read): a disconnect too, or the close would
            # send a rollback on it and raise that error in place of the caller's.
            if not ctx.is_disconnect and (_raised_in_driver(ctx, original)
                                          or _closed_under_statement(ctx)):
                ctx.is_disconnect = True
                ctx.invalidate_pool_on_disconnect = False  # only this connection
            return None
        if ctx.is_disconnect and _trigger_4031(original):
            ctx.is_disconnect = False  # the one verdict of SQLAlchemy's that is wrong (MariaDB)
        disconnect = ctx.is_disconnect  # otherwise SQLAlchemy's (and its listeners') verdict
        if disconnect:
            self._count("disconnects")
            if not self.options.invalidate_pool:
                ctx.invalidate_pool_on_disconnect = False
        translated = self.connect_path.translate(original)
        if translated is original or ctx.sqlalchemy_exception is None:
            return None
        self._count("translated")
        return _rewrapped(ctx, translated)

    # -- connguard's reaper thread ---------------------------------------------------------
    def reap(self) -> None:
        """The reaper's pass (about every half second): the global budget's upkeep, then
        the engine's idle connections (:meth:`IdleReaper.reap`)."""
        engine = self._engine()
        if engine is None:
            reaper.unregister(self)  # engine collected: done
            return
        pool = engine.pool
        if isinstance(pool, GuardedQueuePool):
            pool.connguard_refresh()  # the global budget: surplus, leases kept alive
        self.idle.reap(pool)

    def _after_fork_in_child(self) -> None:
        """A forked child's fresh start, once per process: new locks (another thread may
        have held one at the fork), the inherited idle connections dropped without a word,
        a new pool. Run by the reaper's fork handler for the engines it watches, first,
        and by this module's for every engine, the reaper on or off."""
        if self._pid == os.getpid():
            return  # done already in this process
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.connect_path.after_fork_in_child()
        self.idle.after_fork_in_child()
        engine = self._engine()
        if engine is not None:
            self.idle.drop_inherited(engine)

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        with self._lock:
            counts = dict(self._counts, checkouts=self._checkouts)
        connects, failures, connect_s = self.connect_path.snapshot()
        counts.update(connects)
        counts.update(self.idle.counts())
        result: Dict[str, Any] = {key: counts.get(key, 0) for key in _COUNTERS}
        result.update(support=self.support, wait_timeout=self.idle.wait_timeout,
                      idle_timeout=self.idle.idle_timeout, reaper=self.idle.closes_idle)
        engine = self._engine()
        if engine is not None and isinstance(engine.pool, QueuePool):
            pool = engine.pool
            result.update(pool_size=pool.size(), checked_in=pool.checkedin(),
                          checked_out=pool.checkedout(), overflow=pool.overflow())
        if engine is not None and isinstance(engine.pool, GuardedQueuePool):
            result.update(engine.pool.guard_stats())
        gate = self.connect_path.gate()
        if gate is not None:
            result.update(gate.stats())  # the process-wide gate toward this server
        result["host_gate"] = bool(self.options.host_gate)
        result.update(_schema(self.name, engine, counts, failures, connect_s, result))
        coordinator = coordinator_of(self.options)
        if coordinator is not None and "coordinator_state" not in result:
            health = coordinator.health  # a shared gate without a global budget
            fail = self.options.coordination_settings.fail
            result.update(coordinator=coordinator.address,
                          coordinator_state="ok" if health.up else (
                              "fallback" if fail == "open" else "refusing"),
                          coordinator_outages=health.outages)
        return result

    def __repr__(self) -> str:
        engine = self._engine()
        url = "(gone)" if engine is None else repr(engine.url)  # SQLAlchemy masks the password
        return f"<connguard EngineGuard {url} support={self.support}>"


def _schema(name: str, engine: Any, counts: Dict[str, int], failures: Dict[str, int],
            connect_s: Dict[str, Any], flat: Dict[str, Any]) -> Dict[str, Any]:
    """The part of an engine's stats every pool kind shares (connguard.metrics,
    docs/metrics.md). Hold times and resets are not measured for engines: SQLAlchemy resets
    every return itself, and timing each checkout would cost every checkout."""
    pool: Any = None if engine is None else engine.pool
    guarded = isinstance(pool, GuardedQueuePool)
    queue = isinstance(pool, QueuePool)
    # Every invalidation counts in "invalidated", the reaper's too: those are peer_closed
    # here, not twice.
    closed = {reason: n for reason, n in (
        ("peer_closed", counts.get("reaped", 0)),
        ("idle_timeout", counts.get("idle_evicted", 0)),
        ("invalidated", counts.get("invalidated", 0) - counts.get("reaped", 0))) if n > 0}
    size = pool.size() + pool._max_overflow if queue and pool._max_overflow >= 0 else None
    return {"name": name, "kind": "engine",
            "sizes": {"idle": pool.checkedin() if queue else None,
                      "in_use": pool.checkedout() if queue else None,
                      "opening": flat.get("opening", 0), "max": size,
                      "ceiling": flat.get("ceiling")},
            "counters": {"checkouts": counts.get("checkouts", 0),
                         "opened": counts.get("connects", 0), "closed": closed,
                         "peer_closed": counts.get("peer_closed", 0),
                         "reaped": counts.get("reaped", 0),
                         "timeouts": flat.get("timeouts") if guarded else None,
                         "waits": flat.get("waits") if guarded else None,
                         "connect_failures": failures,
                         "rollbacks": None, "resets": None,
                         "breaker_opens": flat.get("breaker_opens", 0)},
            "distributions": {
                "checkout_wait_s": pool.waited(counts.get("checkouts", 0)) if guarded
                else empty_distribution(),
                "connect_s": connect_s, "hold_s": None}}


_COUNTERS = ("checkouts", "peer_closed", "reaped", "idle_evicted", "connects",
             "connect_errors", "invalidated", "disconnects", "translated")


#: The drivers' functions that talk to the server (PyMySQL's and aiomysql's connection and
#: cursor, mysqlclient's cursor around its C calls): an Exception raised while one of them
#: ran left a command half sent or a reply half read. One raised elsewhere in the driver
#: (a TypeError of ``query % args`` in PyMySQL's mogrify, before anything is sent) did not.
_IO_FRAMES = frozenset({
    "_execute_command", "_read_packet", "_read_bytes", "_write_bytes", "_read_query_result",
    "_read_ok_packet", "_read_result_packet", "_read_rowdata_packet", "_get_descriptions",
    "_read_load_local_packet", "init_unbuffered_query", "_finish_unbuffered_query",
    "read", "query", "_query", "_do_query", "_do_get_result", "_fetch_row", "_post_get_result",
    "_get_result", "next_result", "nextset", "_nextset", "fetchone", "fetchmany", "fetchall",
})


def _raised_in_driver(ctx: Any, exc: BaseException) -> bool:
    """Whether ``exc`` was raised while the DBAPI module's code talked to the server."""
    dialect = ctx.dialect
    dbapi = getattr(dialect, "loaded_dbapi", None) or getattr(dialect, "dbapi", None)
    package = getattr(dbapi, "__name__", "").partition(".")[0]
    if not package:
        return False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name = frame.f_globals.get("__name__", "")
        if (name == package or name.startswith(package + ".")) and (
                frame.f_code.co_name in _IO_FRAMES):
            return True
        tb = tb.tb_next
    return False


def _closed_under_statement(ctx: Any) -> bool:
    """Whether the statement's DBAPI connection is closed now (the driver closed it)."""
    conn = ctx.connection
    if conn is None or conn.invalidated or conn.closed:
        return False
    fairy = conn.connection
    dbapi_conn = getattr(fairy, "dbapi_connection", None) or getattr(fairy, "connection", None)
    return dbapi_conn is not None and not getattr(dbapi_conn, "open", True)


def _trigger_4031(exc: BaseException) -> bool:
    """MariaDB's 4031 ("referenced trigger ... does not exist"), which SQLAlchemy's MySQL
    dialect takes for MySQL 8's 4031 inactivity disconnect and drops the connection for."""
    args: Tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    return bool(args) and args[0] == 4031 and not errors.is_disconnect(exc)


def _rewrapped(ctx: Any, translated: BaseException) -> Any:
    """SQLAlchemy's exception for ``translated``, like the one it built for the original."""
    old = ctx.sqlalchemy_exception
    dialect = getattr(ctx, "dialect", None) or ctx.engine.dialect
    dbapi = getattr(dialect, "loaded_dbapi", None) or dialect.dbapi
    return sa_exc.DBAPIError.instance(
        ctx.statement, ctx.parameters, translated, dbapi.Error,
        hide_parameters=getattr(old, "hide_parameters", False),
        connection_invalidated=ctx.is_disconnect, dialect=dialect,
        ismulti=getattr(old, "ismulti", None))


def stats(engine: Any) -> Dict[str, Any]:
    """Counters and gauges of an engine created with the plugin.

    ``checkouts``, ``peer_closed`` (dead connections refused on checkout), ``reaped`` (dead
    idle ones the reaper closed), ``idle_evicted``, ``connects``, ``connect_errors``,
    ``invalidated`` (every invalidation, SQLAlchemy's included), ``disconnects``,
    ``translated``, ``wait_timeout``, ``idle_timeout``, ``support`` (full / partial / none),
    for a QueuePool ``pool_size``, ``checked_in``, ``checked_out``, ``overflow``, and for the
    guarded pool ``ceiling``, ``opening``, ``waiting``, ``waits``, ``capacity_waits``,
    ``timeouts``, ``dropped_empty`` (:meth:`GuardedQueuePool.guard_stats`); once a connection
    went through the storm gate, the gate's ``breaker``, ``consecutive_failures``,
    ``connect_attempts``, ``connect_failures``, ``fast_failures`` (one gate per server and
    process: shared with other engines and pools that have the same settings).
    """
    guard = metrics.engine_guard(engine)
    if guard is None:
        raise ValueError(f"{engine!r} was not created with the connguard plugin: add "
                         "?plugin=connguard to the URL or plugins=['connguard']")
    return guard.stats()


def _after_fork_in_child() -> None:
    # After the reaper's handler (registered first: this module imports it), which has done
    # the engines it watches before its thread starts again; these are the others.
    for guard in metrics.engine_guards():
        try:
            guard._after_fork_in_child()
        except Exception:  # noqa: BLE001 - one engine's failure must not spare the others
            log.exception("connguard: an engine could not drop its inherited connections")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

