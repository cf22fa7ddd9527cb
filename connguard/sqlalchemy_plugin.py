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
import ipaddress
import logging
import socket
import ssl
import threading
import time
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pymysql
from pymysql.constants import CLIENT, CR
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CreateEnginePlugin
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from connguard import coordination, dbapis, driver, errors, events, metrics, reaper, storm
from connguard.connector import Connector
from connguard.guard import ResourceGuard
from connguard.hostgate import HostGate
from connguard.liveness import Probe, peer_closed
from connguard.metrics import Histogram, empty_distribution
from connguard.policies import LifetimePolicy
from connguard.sqlalchemy_options import (  # noqa: F401 - re-exported: the plugin's options
    COORDINATION_OPTIONS,
    OPTION_NAMES,
    PREFIX,
    STORM_OPTIONS,
    PluginOptions,
    parse_options,
    single_value,
)
from connguard.sqlalchemy_pool import IDLE_SINCE as _IDLE_SINCE
from connguard.sqlalchemy_pool import GuardedAsyncQueuePool, GuardedQueuePool

__all__ = ["ConnGuardPlugin", "ConnGuardPluginWarning", "PluginOptions", "stats"]

log = logging.getLogger("connguard.sqlalchemy")

# record.info key: monotonic time the connection was last checked in (idle since).
# record.info key: the connection's Probe (a cached poll object) for the checkout check.
_PROBE = "connguard_probe"


class ConnGuardPluginWarning(UserWarning):
    """The plugin cannot apply all of itself to this engine (another driver or database)."""


class ConnGuardPlugin(CreateEnginePlugin):
    """Registered as the ``connguard`` entry point of ``sqlalchemy.plugins``.

    SQLAlchemy makes one per ``create_engine`` call: ``__init__`` consumes the options,
    ``handle_pool_kwargs`` notes what the user set on the pool, ``engine_created`` installs
    the listeners.
    """

    def __init__(self, url: Any, kwargs: Dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self.options = parse_options(url.query, kwargs)
        self._password = url.password  # only to mask it in translated errors
        self._custom_creator = "creator" in kwargs
        self._guard: Optional[EngineGuard] = None
        self._user_recycle = False
        self._destination = _url_destination(url)
        # The pool class is chosen here: handle_pool_kwargs sees the class but cannot change
        # it (create_engine keeps it in a local variable), while the kwargs it reads next
        # are this dict.
        _choose_pool_class(url, kwargs)

    def update_url(self, url: Any) -> Any:
        return url.difference_update_query([k for k in url.query if k.startswith(PREFIX)])

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
        connector = guard._connector if guard is not None else None
        return connector.gate if connector is not None else None


def _url_destination(url: Any) -> Tuple[str, int]:
    """(host, port) the engine's URL names, as :func:`connguard.driver.destination` has it
    (the pool's Budget is made before the first connect shows the connect arguments)."""
    socket_path = url.query.get("unix_socket")
    return driver.destination({"host": url.host, "port": url.port,
                               "unix_socket": single_value("unix_socket", socket_path)})


def _coordinator(options: PluginOptions) -> Optional[coordination.Coordinator]:
    spec = options.coordination_settings.coordinator
    return None if spec is None else coordination.coordinator_for(spec)


def _budget_factory(options: PluginOptions, host: str,
                    port: int) -> Optional[Callable[[int], coordination.Budget]]:
    """What makes the guarded pool's Budget (one per pool), or None without global_max."""
    settings = options.coordination_settings
    if settings.coordinator is None or settings.global_max is None:
        return None
    destination = coordination.destination_key(host, port, settings.key)
    cap, ttl, fail = settings.global_max, settings.lease_ttl, settings.fail

    def make(max_size: int) -> coordination.Budget:
        coordinator = _coordinator(options)
        assert coordinator is not None
        return coordination.Budget(coordinator, destination, cap=cap, ttl=ttl, fail=fail,
                                   max_size=max_size)
    return make


def _choose_pool_class(url: Any, kwargs: Dict[str, Any]) -> None:
    """Put GuardedQueuePool in place of QueuePool (exactly that class, chosen by the user or
    the dialect's default) for a MySQL engine; leave any other pool alone, with a warning."""
    try:
        dialect_cls = url.get_dialect()
    except Exception:  # noqa: BLE001 - create_engine reports an unknown dialect itself
        return
    if _support(dialect_cls) == NONE:
        return  # nothing to guard
    is_async = bool(kwargs.get("_is_async") or getattr(dialect_cls, "is_async", False) is True)
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
        _warn(f"connguard: the engine's pool ({name}) is used as it is; the adaptive ceiling "
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

#: Seconds the storm gate may hold a connect for pools without a checkout timeout.
_DEFAULT_CONNECT_WAIT = 30.0


def _support(dialect: Any) -> str:
    if dialect.name not in ("mysql", "mariadb"):
        return NONE
    return FULL if dialect.driver in dbapis.GUARDED else PARTIAL


def _idle_queue(pool: Any) -> Any:
    """The locked queue of idle records of a QueuePool, or None for other pools.

    ``pool._pool`` is SQLAlchemy's ``util.queue.Queue`` (same shape in 1.4 and 2.x): a
    ``deque`` in ``.queue`` guarded by the ``RLock`` ``.mutex``. Async pools use another
    queue class and are skipped.
    """
    queue = getattr(pool, "_pool", None)
    if not isinstance(pool, QueuePool) or not hasattr(queue, "mutex") \
            or not hasattr(queue, "queue"):
        return None
    return queue


_PYMYSQL_CONNECTION = pymysql.connections.Connection


def _tls_left_to_pymysql(dialect: Any, cargs: List[Any], cparams: Dict[str, Any]) -> bool:
    """Whether PyMySQL decides the TLS mode itself: the engine's DBAPI module is PyMySQL and
    no connect argument speaks of TLS (``ssl``, ``ssl_*``, or an option file, which may)."""
    return dialect.dbapi is pymysql and not cargs and not any(
        name.startswith(("ssl", "read_default")) for name in cparams)


def _preferred_tls_context(conn: Any) -> Optional[ssl.SSLContext]:
    """The context PyMySQL built for ``conn`` in its "preferred" TLS mode, if the server
    offered TLS (so that the connection uses it); None otherwise, and with PyMySQL < 1.2,
    which has no such mode."""
    if not isinstance(conn, pymysql.connections.Connection):
        return None
    context = getattr(conn, "ctx", None)
    offered = (getattr(conn, "server_capabilities", 0) or 0) & CLIENT.SSL
    return context if offered and isinstance(context, ssl.SSLContext) else None


_PYMYSQL_CONNECT = pymysql.connections.Connection.connect.__code__


def _close_stranded_socket(exc: BaseException) -> None:
    """Close the unix socket PyMySQL's ``Connection.connect`` left behind when connecting it
    failed.

    PyMySQL creates that socket before ``connect()`` and closes only ``self._sock``, which
    is not set yet: each failed attempt (a missing socket file, a full backlog) keeps a
    descriptor until a garbage-collector pass, then warns (ResourceWarning). connguard's own
    connections avoid it (``driver.GuardedConnection.connect``); connects made through the
    dialect run PyMySQL's, so the socket is found in that call's frame, which the error's
    traceback keeps, and closed here. Does nothing when PyMySQL has no such frame or local.
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _PYMYSQL_CONNECT:
            sock = frame.f_locals.get("sock")
            owner = frame.f_locals.get("self")
            if isinstance(sock, socket.socket) and sock is not getattr(owner, "_sock", None):
                sock.close()
            return
        tb = tb.tb_next


def _probe(record: Any) -> Probe:
    """The record's cached poll object: only the thread that checks a record out uses it
    (Probe is not thread-safe; the reaper uses the stateless peer_closed). ``record.info``
    is cleared when the connection is replaced, and a Probe follows a new descriptor anyway."""
    probe = record.info.get(_PROBE)
    if probe is None:
        probe = record.info[_PROBE] = Probe()
    return probe


class _Reaped(sa_exc.DisconnectionError):
    """The reason given to ``invalidate`` listeners for a connection the reaper closed."""


class EngineGuard:
    """What the plugin keeps per engine: options, counters, the connector, the listeners.

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
        self._user_recycle = user_recycle
        self._password = password
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        # Checkouts are counted apart, lock-free: ``+= 1`` on an int attribute has no call
        # inside, so CPython never switches threads in the middle of it.
        self._checkouts = 0
        self._connector: Optional[Connector] = None
        self._resource_guard: Optional[ResourceGuard] = None
        # Per destination: the TLS context PyMySQL built for a connection in its "preferred"
        # mode, once the server was seen to offer TLS (see _connect_reusing_tls).
        self._tls_contexts: Dict[Tuple[str, int], ssl.SSLContext] = {}
        self._foreign_warned = False
        self.wait_timeout: Optional[int] = None
        self.idle_timeout: Optional[float] = options.idle_timeout or None
        self.name = metrics.claim_name(_engine_name(engine.url), self)
        self._listeners = events.Listeners()
        self._failures: Counter = Counter()  # connect failures by exception class
        self._connect_time = Histogram()
        # Async engines: idle connections and the loop each lives on, for the reaper, which
        # may only ask that loop to close a dead one (checkin adds, checkout removes).
        self._idle_on_loop: Dict[Any, Tuple[Any, asyncio.AbstractEventLoop]] = {}

    # -- installation ----------------------------------------------------------------------
    def install(self, custom_creator: bool) -> None:
        engine = self._engine()
        assert engine is not None
        metrics.register_engine(engine.dialect, self)
        if self.support == NONE:
            _warn(f"connguard: the {engine.dialect.name} dialect is not MySQL/MariaDB; the "
                  "plugin does nothing for this engine")
            return
        event.listen(engine.pool, "connect", self._on_connect)
        if self.support == PARTIAL:
            _warn(f"connguard: driver {engine.dialect.driver!r} is not one connguard "
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
            _warn("connguard: create_engine(creator=...) bypasses do_connect, so new "
                  "connections do not go through connguard's connect path (resource guard, "
                  "storm gate, cached TLS context); the other protections apply")
        self._install_full(engine)

    def _install_full(self, engine: Any) -> None:
        event.listen(engine, "do_connect", self._make_do_connect())
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

    # -- counters --------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # -- connect ---------------------------------------------------------------------------
    def _make_do_connect(self) -> Callable[..., Any]:
        # A plain function marked with its owner, so that _do_connect can find it among the
        # dialect's listeners (a bound method is a new object on every access). The guard
        # does not keep it: no cycle, so the guard goes with its engine without a gc pass.
        def connguard_do_connect(dialect: Any, record: Any, cargs: List[Any],
                                 cparams: Dict[str, Any]) -> Any:
            return self._do_connect(dialect, record, cargs, cparams)
        connguard_do_connect.connguard_owner = self  # type: ignore[attr-defined]
        return connguard_do_connect

    def _later_listeners(self, dialect: Any) -> List[Callable[..., Any]]:
        listeners = list(dialect.dispatch.do_connect)
        for position, fn in enumerate(listeners):
            if getattr(fn, "connguard_owner", None) is self:
                return listeners[position + 1:]
        return []

    def _do_connect(self, dialect: Any, record: Any, cargs: List[Any],
                    cparams: Dict[str, Any]) -> Any:
        """Open a new DBAPI connection through connguard's connect path (:meth:`_open`).

        Listeners registered after ours (users typically add theirs after create_engine,
        e.g. to put a fresh token in ``cparams["password"]``) run first, since returning a
        connection ends SQLAlchemy's loop over the listeners; one that returns a connection
        of its own wins, and that connection is used as it is.
        """
        for fn in self._later_listeners(dialect):
            conn = fn(dialect, record, cargs, cparams)
            if conn is not None:
                return conn
        began = time.monotonic()
        try:
            conn = self._open(dialect, cargs, cparams)
        except BaseException as exc:
            with self._lock:
                self._counts["connect_errors"] += 1
                if isinstance(exc, Exception):
                    self._failures[type(exc).__name__] += 1
            if events.active and isinstance(exc, Exception):
                events.dispatch(self._listeners, self.name, "connect_failed", error=exc)
            raise
        seconds = time.monotonic() - began
        with self._lock:
            self._counts["connects"] += 1
            self._connect_time.observe(seconds)
        if events.active:
            events.dispatch(self._listeners, self.name, "connect", seconds=seconds)
        return conn

    def _open(self, dialect: Any, cargs: List[Any], cparams: Dict[str, Any]) -> Any:
        """``dialect.connect(*cargs, **cparams)``, which calls the engine's DBAPI module, inside
        connguard's connect path: the resource guard refuses before the OS is asked for a port
        or a descriptor, the storm gate paces the attempt, and a failure leaves translated
        with the password masked in its whole chain."""
        def connect() -> Any:
            try:
                return self._connect_reusing_tls(dialect, cargs, cparams)
            except pymysql.err.Error as exc:
                _close_stranded_socket(exc)
                raise

        deadline = self._connect_deadline()
        engine = self._engine()
        timeout = engine.pool.timeout() if engine is not None and isinstance(
            engine.pool, QueuePool) else None
        started = deadline - timeout if timeout is not None and deadline != float(
            "inf") else None
        pause = _loop_pause if self.facts.is_async else None  # never block an event loop
        try:
            return self._connector_for(cparams).open(deadline, connect=connect,
                                                     started=started, pause=pause)
        except errors.ConnGuardError as exc:  # the gate's or the guard's own refusal
            own = self.facts.own_error(exc)
            if own is exc:
                raise
            raise own from exc.__cause__

    def _connect_reusing_tls(self, dialect: Any, cargs: List[Any],
                             cparams: Dict[str, Any]) -> Any:
        """The dialect's connect, given the TLS context of an earlier connection when PyMySQL
        would only build the same one again.

        With no TLS option, PyMySQL (>= 1.2) uses TLS when the server offers it ("preferred")
        and builds a new default context for every connection, loading the system CA store
        each time. Passing a context as ``ssl`` would make TLS *required*, which a server
        without TLS refuses, so a context is passed only once a connection showed that the
        server offers TLS, and it is the context PyMySQL built for that connection: same
        settings, same outcome. A server restarted without TLS answers 2026; the connect
        is then made again without the context (in clear, as "preferred" does) and the
        context is forgotten until the server offers TLS again.
        """
        if not _tls_left_to_pymysql(dialect, cargs, cparams):
            return dialect.connect(*cargs, **cparams)
        key = driver.destination(cparams)
        context = self._tls_contexts.get(key)
        if context is not None:
            try:
                return dialect.connect(*cargs, **{**cparams, "ssl": context})
            except pymysql.err.OperationalError as exc:
                if not exc.args or exc.args[0] != CR.CR_SSL_CONNECTION_ERROR:
                    raise
            self._tls_contexts.pop(key, None)
        conn = dialect.connect(*cargs, **cparams)
        learnt = _preferred_tls_context(conn)
        if learnt is not None:
            self._tls_contexts.setdefault(key, learnt)
        return conn

    def _connect_deadline(self) -> float:
        """How long the storm gate may hold this connect: what is left of the checkout's
        ``pool_timeout`` (the wait a caller of this engine already accepts), or the whole
        timeout for a connect the guarded pool did not start. Pools without a timeout
        (NullPool, StaticPool, ...) never wait: during an outage their connect fails at
        once, as it would without connguard."""
        engine = self._engine()
        pool = None if engine is None else engine.pool
        if isinstance(pool, GuardedQueuePool):
            deadline = pool.connect_deadline()
            if deadline is not None:
                return deadline
        if not isinstance(pool, QueuePool):
            return time.monotonic()
        timeout = pool.timeout()
        return time.monotonic() + (_DEFAULT_CONNECT_WAIT if timeout is None else timeout)

    def _connector_for(self, cparams: Dict[str, Any]) -> Connector:
        """One Connector per engine, kept while the connect arguments stay the same: the
        resource guard, the storm gate and the translation for :meth:`_open` (which connects
        through the dialect, not with ``Connector.open``).

        A do_connect listener that rotates a token changes them; the Connector is then
        replaced (the resource guard, per destination, is kept).
        """
        connector = self._connector
        if connector is None or connector.kwargs != cparams:
            kwargs = dict(cparams)
            connector = Connector(kwargs, guard=self._guard_for(kwargs),
                                  gate=self._gate_for(kwargs),
                                  fail_fast=bool(self.options.storm_settings.get("fail_fast")))
            self._connector = connector
        return connector

    def _guard_for(self, kwargs: Dict[str, Any]) -> Optional[ResourceGuard]:
        host, port = driver.destination(kwargs)
        if not self.options.resource_guard or not port:
            return None  # opted out, or a unix socket: no ephemeral port to run out of
        if self.facts.is_async and not _is_ip_literal(host):
            return None  # its census resolves the host: a DNS lookup would block the loop
        guard = self._resource_guard
        if guard is None or (guard.host, guard.port) != (host, port):
            reserves = {name: getattr(self.options, name)
                        for name in ("fd_reserve", "port_reserve")
                        if getattr(self.options, name) is not None}
            guard = self._resource_guard = ResourceGuard(host, port, **reserves)
        return guard

    def _gate_for(self, kwargs: Dict[str, Any]) -> Optional[storm.ConnectGate]:
        """The process-wide gate toward this destination (shared with connguard pools that
        have the same settings): one bucket and one breaker per server."""
        if not self.options.storm_control:
            return None
        host, port = driver.destination(kwargs)
        policy = storm.policy_from_options(dict(self.options.storm_settings))
        host_gate = None
        if self.options.host_gate and self.facts.is_async:
            # Its slots are held per thread, and a loop's coroutines share one thread.
            _warn("connguard: the host gate is not used by async engines (its slots are held "
                  "per thread); the process's own gate applies")
        elif self.options.host_gate:
            directory = self.options.host_gate if isinstance(self.options.host_gate, str) \
                else None
            host_gate = HostGate(host, port, policy.max_handshakes, directory)
        shared = []
        settings = self.options.coordination_settings
        coordinator = _coordinator(self.options)
        if coordinator is not None and self.facts.is_async:
            _warn("connguard: a shared coordinator (Redis) is not used by async engines: its "
                  "client would block the event loop; the process's own gate applies")
            coordinator = None
        if coordinator is not None:
            # The probe slot lapses a little after the longest a handshake may take.
            probe_timeout = float(kwargs.get("connect_timeout") or 10) + 1.0
            shared.append(coordination.CoordinatedGate(
                coordinator, coordination.destination_key(host, port, settings.key), policy,
                fail=settings.fail, probe_timeout=probe_timeout))
        return storm.gate_for(host, port, policy, host_gate, shared=shared)

    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        if not self._watches(dbapi_conn):
            if self.support == FULL:
                self._warn_foreign(dbapi_conn)
            return  # not a connection to ask anything of (a listener's own, a test double)
        self._facts_of(dbapi_conn).connected(dbapi_conn)
        if self.wait_timeout is None:
            self._learn_wait_timeout(dbapi_conn)

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

    def _watches(self, conn: Any) -> bool:
        """Whether the peer-closed check and the reaper can watch ``conn``."""
        return self.facts.watches(conn) or dbapis.PYMYSQL.watches(conn)

    def _facts_of(self, conn: Any) -> dbapis.DriverFacts:
        return dbapis.PYMYSQL if isinstance(conn, _PYMYSQL_CONNECTION) else self.facts

    def _learn_wait_timeout(self, dbapi_conn: Any) -> None:
        """Read the server's wait_timeout once and derive the idle limit from it.

        The session value: the server sets it from interactive_timeout for interactive
        clients. Left alone when the user set ``pool_recycle`` (they manage lifetimes) or
        ``connguard_idle_timeout``.
        """
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT @@SESSION.wait_timeout")
                row = cursor.fetchone()
            finally:
                cursor.close()
            wait_timeout = int(row[0])
        except Exception as exc:  # noqa: BLE001 - any driver's error: just do without
            log.debug("could not read wait_timeout: %s", errors.redact(str(exc), self._password))
            wait_timeout = 0
        derived = LifetimePolicy(max_lifetime=None, idle_timeout=None).for_server(wait_timeout)
        with self._lock:
            if self.wait_timeout is not None:
                return  # another thread's first connect won
            self.wait_timeout = wait_timeout
            if self.options.idle_timeout is None and not self._user_recycle:
                self.idle_timeout = derived.idle_timeout
        self._apply_recycle()

    def _apply_recycle(self) -> None:
        """Without the reaper (or another driver), SQLAlchemy's own age-based recycle keeps
        connections from outliving wait_timeout; ``pool.recreate()`` on dispose copies it."""
        engine = self._engine()
        limit = self.idle_timeout
        if engine is None or limit is None or self._user_recycle:
            return
        # The reaper closes idle connections of async engines only when dead (their
        # transports are the loop's): SQLAlchemy's recycle keeps them below wait_timeout.
        if self.support == PARTIAL or not self.options.reaper or self.facts.is_async:
            engine.pool._recycle = int(limit)

    # -- checkout / checkin ----------------------------------------------------------------
    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        """Refuse a connection whose server end is gone; SQLAlchemy then invalidates it and
        connects again (at most once more per checkout), and the caller never sees it."""
        self._checkouts += 1
        # PyMySQL's socket and _probe, inlined: every checkout passes here (a subscript, not
        # dict.get; the socket read directly, no getattr call).
        info = record.info
        try:
            probe = info[_PROBE]
        except KeyError:
            probe = info[_PROBE] = Probe()
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
                with self._lock:
                    self._idle_on_loop.pop(record, None)
            if not self._other_driver_dead(dbapi_conn, probe):
                return
        self._count("peer_closed")
        raise sa_exc.DisconnectionError(
            f"connguard: connection {self._facts_of(dbapi_conn).thread_id(dbapi_conn)} was "
            "closed by the server while idle in the pool (peer closed)")

    def _other_driver_dead(self, conn: Any, probe: Probe) -> bool:
        """The peer-closed check for a driver other than PyMySQL (see connguard.dbapis)."""
        try:
            pollable = self.facts.pollable(conn)
            return pollable is None or probe.dead(pollable)
        except self.facts.error_class:  # closed under us: fileno() refuses
            return True

    def _lost(self) -> None:
        """A connection lost to an error (the server closed it, a disconnect): its
        replacement is paced by the gate as a reconnect."""
        connector = self._connector
        if connector is not None and connector.gate is not None:
            connector.gate.connection_lost()

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()
        if self.facts.is_async and self.options.reaper and dbapi_conn is not None \
                and self.facts.watches(dbapi_conn):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # returned outside its loop (a finalizer): not watched
                return
            with self._lock:
                self._idle_on_loop[record] = (dbapi_conn, loop)

    def _on_invalidate(self, dbapi_conn: Any, record: Any, exception: Any) -> None:
        self._count("invalidated")
        if exception is not None:  # lost to an error (not a recycle, not dispose)
            self._lost()

    # -- errors ----------------------------------------------------------------------------
    def _handle_error(self, ctx: Any) -> Any:
        """Decide is_disconnect with connguard's table and put the translated error in
        ``.orig``; returning the new exception is SQLAlchemy's chaining protocol."""
        original = ctx.original_exception
        if not (errors.is_driver_error(original) or isinstance(original, OSError)):
            return None  # KeyboardInterrupt and friends: SQLAlchemy's own rules apply
        if ctx.is_disconnect and _trigger_4031(original):
            ctx.is_disconnect = False  # the one verdict of SQLAlchemy's that is wrong (MariaDB)
        disconnect = ctx.is_disconnect  # otherwise SQLAlchemy's (and its listeners') verdict
        if disconnect:
            self._count("disconnects")
            if not self.options.invalidate_pool:
                ctx.invalidate_pool_on_disconnect = False
        translated = self._translate(original)
        if translated is original or ctx.sqlalchemy_exception is None:
            return None
        self._count("translated")
        return _rewrapped(ctx, translated)

    def _translate(self, exc: BaseException) -> BaseException:
        connector = self._connector
        if connector is not None:
            return connector.translate(exc)
        return errors.translate(exc, password=self._password)

    # -- the reaper's pass -----------------------------------------------------------------
    def reap(self) -> None:
        """Close idle pooled connections that are dead or idle too long (reaper thread).

        Decide under the queue's lock, close outside it: records are taken out of the idle
        queue under the lock (so no checkout can have them), closed, and given back empty;
        an empty record connects again on its next checkout.
        """
        engine = self._engine()
        if engine is None:
            reaper.unregister(self)  # engine collected: done
            return
        pool = engine.pool
        if isinstance(pool, GuardedQueuePool):
            pool.connguard_refresh()  # the global budget: surplus, leases kept alive
        if self.facts.is_async:
            if self.options.reaper:
                self._reap_on_loops()
            return
        queue = _idle_queue(pool)
        if queue is None or not self.options.reaper or self.support != FULL:
            return
        now = time.monotonic()
        with queue.mutex:
            snapshot = [(rec, rec.dbapi_connection) for rec in queue.queue]
        doomed = [(rec, conn, reason) for rec, conn in snapshot
                  if (reason := self._retire_reason(rec, conn, now)) is not None]
        if doomed:
            self._close_idle(pool, queue, doomed, now)

    def _reap_on_loops(self) -> None:
        """Async engines: find idle connections whose server end closed and ask their event
        loop to close them (only the loop may touch a transport). The loop decides again:
        a connection checked out since this pass looked is not idle any more, and a reply
        it is waiting for would make its socket look dead here."""
        with self._lock:
            idle = list(self._idle_on_loop.items())
        for record, (conn, loop) in idle:
            if record.dbapi_connection is not conn or loop.is_closed():
                self._forget_idle(record, conn)  # replaced since, or its loop is gone
                continue
            sock = self.facts.pollable(conn)
            if sock is None or not peer_closed(sock):
                continue
            try:
                loop.call_soon_threadsafe(self._close_if_still_idle, record, conn)
            except RuntimeError:  # the loop closed meanwhile: its transports went with it
                self._forget_idle(record, conn)

    def _close_if_still_idle(self, record: Any, conn: Any) -> None:
        """On the connection's loop: close it if it still is idle and dead. Checkouts run on
        this same thread and take the record out of the idle map first, so this decision
        cannot race with one."""
        with self._lock:
            entry = self._idle_on_loop.get(record)
            if entry is None or entry[0] is not conn:
                return  # checked out (or replaced) since the reaper looked
        sock = self.facts.pollable(conn)
        if sock is None or not peer_closed(sock):
            return
        self._forget_idle(record, conn)
        _close_transport(conn)
        self._count("reaped")

    def _forget_idle(self, record: Any, conn: Any) -> None:
        with self._lock:
            if self._idle_on_loop.get(record, (None,))[0] is conn:
                del self._idle_on_loop[record]

    def _retire_reason(self, record: Any, conn: Any, now: float) -> Optional[str]:
        if conn is None:
            return None  # already invalidated: connects again on checkout
        if self._watches(conn):  # another kind (a do_connect listener's) has no socket to check
            facts = self._facts_of(conn)
            try:
                sock = facts.pollable(conn)
                dead = sock is None or peer_closed(sock)
            except facts.error_class:  # closed under us: fileno() refuses
                dead = True
            if dead:
                return "reaped"
        if self._idle_too_long(record, now):
            return "idle_evicted"
        return None

    def _idle_too_long(self, record: Any, now: float) -> bool:
        limit = self.idle_timeout
        since = record.info.get(_IDLE_SINCE)
        return limit is not None and since is not None and now - since >= limit

    def _close_idle(self, pool: Any, queue: Any, doomed: List[Tuple[Any, Any, str]],
                    now: float) -> None:
        taken = []
        with queue.mutex:
            for rec, conn, reason in doomed:
                # Checked out (and maybe back) since the snapshot? A dead socket stays dead,
                # but an idle one may have been used: check its idle time again.
                still = rec.dbapi_connection is conn and rec in queue.queue and (
                    reason == "reaped" or self._idle_too_long(rec, now))
                if still:
                    queue.queue.remove(rec)
                    taken.append((rec, reason))
        for rec, reason in taken:
            try:
                if reason == "reaped":
                    rec.invalidate(_Reaped("connguard: the server closed this idle "
                                           "connection (peer closed)"))
                else:
                    rec.close()  # healthy: a graceful COM_QUIT before wait_timeout
            finally:
                pool._do_return_conn(rec)  # back in the queue, or closed if it is full now
            self._count(reason)

    # -- fork safety -----------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """The child must not talk on the parent's sockets: drop the idle ones without a word
        (the parent's sessions survive) and give the engine a new pool."""
        self._lock = threading.Lock()
        self._idle_on_loop = {}  # the parent's loops: not this process's to wake
        engine = self._engine()
        if engine is None:
            return
        queue = _idle_queue(engine.pool)
        try:
            for rec in list(queue.queue) if queue is not None else []:
                conn = rec.dbapi_connection
                try:
                    if conn is not None and self._watches(conn):
                        self._facts_of(conn).drop_inherited(conn)
                except Exception:  # noqa: BLE001 - one connection must not spare the rest
                    log.exception("connguard: could not let go of an inherited connection")
            if isinstance(engine.pool, GuardedQueuePool):
                engine.pool.connguard_after_fork()  # the parent's leases stay the parent's
        finally:
            engine.dispose(close=False)  # whatever happened: the child gets its own pool

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        with self._lock:
            counts = dict(self._counts, checkouts=self._checkouts)
        result: Dict[str, Any] = {key: counts.get(key, 0) for key in _COUNTERS}
        result.update(support=self.support, wait_timeout=self.wait_timeout,
                      idle_timeout=self.idle_timeout, reaper=self.options.reaper and
                      self.support == FULL)
        engine = self._engine()
        if engine is not None and isinstance(engine.pool, QueuePool):
            pool = engine.pool
            result.update(pool_size=pool.size(), checked_in=pool.checkedin(),
                          checked_out=pool.checkedout(), overflow=pool.overflow())
        if engine is not None and isinstance(engine.pool, GuardedQueuePool):
            result.update(engine.pool.guard_stats())
        connector = self._connector
        if connector is not None and connector.gate is not None:
            result.update(connector.gate.stats())  # the process-wide gate toward this server
        result["host_gate"] = bool(self.options.host_gate)
        result.update(self._schema(engine, counts, result))
        coordinator = _coordinator(self.options)
        if coordinator is not None and "coordinator_state" not in result:
            health = coordinator.health  # a shared gate without a global budget
            fail = self.options.coordination_settings.fail
            result.update(coordinator=coordinator.address,
                          coordinator_state="ok" if health.up else (
                              "fallback" if fail == "open" else "refusing"),
                          coordinator_outages=health.outages)
        return result

    def _schema(self, engine: Any, counts: Dict[str, int], flat: Dict[str, Any]
                ) -> Dict[str, Any]:
        """The part every pool kind shares (connguard.metrics, docs/metrics.md). Hold times
        and resets are not measured for engines: SQLAlchemy resets every return itself, and
        timing each checkout would cost every checkout."""
        pool: Any = None if engine is None else engine.pool
        guarded = isinstance(pool, GuardedQueuePool)
        queue = isinstance(pool, QueuePool)
        with self._lock:
            failures = dict(self._failures)
            connect_s = self._connect_time.snapshot()
        # Every invalidation counts in "invalidated", the reaper's too: those are
        # peer_closed here, not twice.
        closed = {reason: n for reason, n in (
            ("peer_closed", counts.get("reaped", 0)),
            ("idle_timeout", counts.get("idle_evicted", 0)),
            ("invalidated", counts.get("invalidated", 0) - counts.get("reaped", 0))) if n > 0}
        size = (pool.size() + pool._max_overflow if queue and pool._max_overflow >= 0
                else None)
        return {"name": self.name, "kind": "engine",
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

    def __repr__(self) -> str:
        engine = self._engine()
        url = "(gone)" if engine is None else repr(engine.url)  # SQLAlchemy masks the password
        return f"<connguard EngineGuard {url} support={self.support}>"


_COUNTERS = ("checkouts", "peer_closed", "reaped", "idle_evicted", "connects",
             "connect_errors", "invalidated", "disconnects", "translated")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loop_pause(seconds: float) -> None:
    """Wait without blocking the event loop: inside SQLAlchemy's greenlet, hand the loop an
    ``asyncio.sleep`` and come back when it is done."""
    from sqlalchemy.util import await_only

    await_only(asyncio.sleep(seconds))


def _close_transport(conn: Any) -> None:
    """On the connection's event loop: close a dead idle connection the driver's own way
    without a word to the server (its ``close()``, which SQLAlchemy's terminate uses too):
    the socket leaves CLOSE_WAIT, and the driver knows it is closed, so SQLAlchemy's later
    invalidation finds nothing left to close."""
    try:
        conn._connection.close()
    except Exception:  # noqa: BLE001 - a dead connection may fail to close: it is gone
        transport = dbapis.transport_of(conn)
        if transport is not None:
            transport.close()


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


def _warn(message: str) -> None:
    # stacklevel: point past SQLAlchemy's create_engine at the caller's line, roughly.
    warnings.warn(message, ConnGuardPluginWarning, stacklevel=5)


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
