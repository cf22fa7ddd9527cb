"""The exceptions connguard raises, and how each is described.

Every one is a :class:`ConnGuardError` and also the driver's class it stands for (PyMySQL's
``OperationalError`` for most, combined at translation time with the original's class, see
:func:`combined_class`), so existing ``except`` clauses keep matching. :func:`describe` fills
in cause, remedies, diagnosis and the message from templates (:mod:`connguard.messages`),
secrets masked (:mod:`connguard.redaction`). Which error becomes which class is decided by
:mod:`connguard.errors` (its table); errors connguard raises itself (pool timeouts, an open
breaker, an outage, a shared gate's refusal, the coordinator's) are built here.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple, Type

import pymysql
from pymysql.constants import CR

from connguard import messages
from connguard.redaction import Password, redact

#: The public exception classes (documented as connguard.errors.X; the coordinator's two
#: as connguard.coordination.X).
__all__ = [
    "AccessDenied",
    "CircuitOpen",
    "CommandsOutOfSync",
    "ConnGuardError",
    "ConnectionLost",
    "Deadlock",
    "FdLimitReached",
    "GateTimeout",
    "HandshakeLost",
    "HostBlocked",
    "LocalPortsExhausted",
    "LockWaitTimeout",
    "PoolClosed",
    "PoolTimeout",
    "QueryInterrupted",
    "ResourceTemporarilyUnavailable",
    "ServerShuttingDown",
    "ServerThreadLimit",
    "ServerUnavailable",
    "StatementTimeout",
    "TooManyConnections",
    "UnknownDatabase",
    "UserConnectionLimit",
]

class ConnGuardError(Exception):
    """Base of every exception connguard raises.

    Attributes: ``transient`` (a later retry, with backoff, can succeed), ``diagnosis``
    (facts gathered when the error was translated), ``remedies`` (most useful first),
    ``cause`` (one-line explanation), ``docs`` (the name of its error page, e.g.
    ``"local-ports-exhausted"``: ``connguard explain local-ports-exhausted`` prints it,
    :meth:`explain` returns it) and ``original`` (the exception translated, or ``None``).
    ``str()`` gives the full multi-line message.
    """

    transient: bool = False
    docs: str = "index"
    # Set on the classes translate() combines with the original's class (see combined_class()).
    _static: Optional[Type[ConnGuardError]] = None
    _origin: Optional[Type[BaseException]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transient = type(self).transient
        self.diagnosis: Dict[str, Any] = {}
        self.remedies: List[str] = []
        self.cause = ""
        self.original: Optional[BaseException] = None
        self._message = ""

    def __str__(self) -> str:
        return self._message or super().__str__()

    def explain(self) -> str:
        """The text of this error's page (what ``connguard explain <docs>`` prints)."""
        from connguard import explain  # read only when asked for

        return explain.page(self.docs)

    def __repr__(self) -> str:
        first = str(self).split("\n", 1)[0]
        code = self.args[0] if self.args else None
        if isinstance(code, int) and not isinstance(code, bool):
            return f"{type(self).__name__}({code!r}, {first!r})"
        return f"{type(self).__name__}({first!r})"

    def __reduce__(self) -> Any:
        # Combined classes are made at run time and cannot be pickled by name, and the
        # constructors of PoolTimeout/CircuitOpen do not take ``args``; rebuild from parts.
        static = self._static or type(self)
        return (_restore, (static, self._origin, self.args, dict(self.__dict__)))


class LocalPortsExhausted(ConnGuardError, pymysql.err.OperationalError):
    """No free local port for a new connection (EADDRNOTAVAIL, errno 99)."""

    transient = True
    docs = "local-ports-exhausted"


class FdLimitReached(ConnGuardError, pymysql.err.OperationalError):
    """The open-file limit stopped a new socket (EMFILE 24 per process, ENFILE 23 system)."""

    transient = True
    docs = "fd-limit-reached"


class ResourceTemporarilyUnavailable(ConnGuardError, pymysql.err.OperationalError):
    """connect() returned EAGAIN (errno 11): typically a full Unix-socket listen backlog."""

    transient = True
    docs = "resource-temporarily-unavailable"


class ServerUnavailable(ConnGuardError, pymysql.err.OperationalError):
    """The server could not be reached: refused, unreachable, timed out or unknown host."""

    transient = True
    docs = "server-unavailable"


class TooManyConnections(ConnGuardError, pymysql.err.OperationalError):
    """The server is at ``max_connections`` (1040)."""

    transient = True
    docs = "too-many-connections"


class ServerThreadLimit(ConnGuardError, pymysql.err.OperationalError):
    """The server could not create a thread for the connection (1135, errno 11)."""

    transient = True
    docs = "server-thread-limit"


class HostBlocked(ConnGuardError, pymysql.err.OperationalError):
    """The server blocked this client host after ``max_connect_errors`` (1129). Permanent."""

    docs = "host-blocked"


class UserConnectionLimit(ConnGuardError, pymysql.err.OperationalError):
    """The account hit ``max_user_connections`` or a per-account resource limit (1203, 1226)."""

    transient = True
    docs = "user-connection-limit"


class AccessDenied(ConnGuardError, pymysql.err.OperationalError):
    """Wrong credentials, host or database grant (1044, 1045, 1130, 1698). Permanent."""

    docs = "access-denied"


class UnknownDatabase(ConnGuardError, pymysql.err.OperationalError):
    """The database named at connect (``database=``, ``db=``) does not exist (1049). Permanent."""

    docs = "unknown-database"


class ConnectionLost(ConnGuardError, pymysql.err.OperationalError):
    """An established connection died (2006, 2013, 2055, 4031, 1927, reset, broken pipe)."""

    transient = True
    docs = "connection-lost"


class HandshakeLost(ConnectionLost):
    """The connection died during login, before it was usable (2013/2006 while connecting)."""

    docs = "handshake-lost"


class CommandsOutOfSync(ConnectionLost):
    """PyMySQL's "Commands out of sync" (2014).

    A :class:`ConnectionLost` because the connection must be discarded, but not transient:
    it comes from the program (an unread result, or a connection shared between threads),
    so retrying the same code fails the same way.
    """

    docs = "commands-out-of-sync"


class ServerShuttingDown(ConnGuardError, pymysql.err.OperationalError):
    """The server is shutting down (1053)."""

    transient = True
    docs = "server-shutting-down"


class QueryInterrupted(ConnGuardError, pymysql.err.OperationalError):
    """The server stopped a statement: KILL QUERY, a shutdown (1317), an aborted sort (1028).

    Not a disconnect: the connection stays usable.  Transient: the statement can be retried.
    """

    transient = True
    docs = "query-interrupted"


class StatementTimeout(QueryInterrupted):
    """The statement ran past the server's limit (MariaDB 1969 ``max_statement_time``,
    MySQL 3024 ``max_execution_time``).  Not a disconnect; transient like
    :class:`QueryInterrupted`, but the same statement under the same load times out again."""

    docs = "statement-timeout"


class LockWaitTimeout(ConnGuardError, pymysql.err.OperationalError):
    """A row lock stayed taken past ``innodb_lock_wait_timeout`` (1205).

    Not a disconnect.  Transient: InnoDB rolled back the statement (not the transaction,
    unless ``innodb_rollback_on_timeout`` is on); retrying may succeed once the other
    transaction ends.
    """

    transient = True
    docs = "lock-wait-timeout"


class Deadlock(ConnGuardError, pymysql.err.OperationalError):
    """InnoDB found a deadlock and rolled this transaction back (1213).

    Not a disconnect.  Transient: retry the whole transaction.
    """

    transient = True
    docs = "deadlock"


class PoolTimeout(ConnGuardError, pymysql.err.OperationalError):
    """No pooled connection became free in time.

    ``destination`` (e.g. ``"app@10.0.0.5:3306/app"``) or ``host``/``port`` name the
    server in the message.  ``last_cause`` is the server's refusal that kept the pool from
    growing while the caller waited (a translated 1040, 1203, 1135, ...), if any: it is
    named in the first line, kept as ``.last_cause`` and chained as ``__cause__``.
    ``args`` is ``(first line of the message,)``: no MySQL code.
    """

    transient = True
    docs = "pool-timeout"

    def __init__(
        self,
        max_size: int,
        in_use: int,
        waited: float,
        *,
        destination: Optional[str] = None,
        host: Optional[str] = None,
        port: Optional[int] = None,
        last_cause: Optional[BaseException] = None,
    ) -> None:
        diagnosis: Dict[str, Any] = {
            "max_size": max_size,
            "in_use": in_use,
            "waited": waited,
            "destination": destination,
            "host": host,
            "port": port,
            "last_cause": summary(last_cause),
            "last_docs": _docs_of(last_cause),
        }
        cause = messages.render(_POOL_TIMEOUT_CAUSE, messages.facts(diagnosis))
        super().__init__(cause)
        self.max_size = max_size
        self.in_use = in_use
        self.waited = waited
        self.last_cause = last_cause
        describe(self, cause, _POOL_TIMEOUT_REMEDIES, diagnosis, None)
        if last_cause is not None:
            self.__cause__ = last_cause


class PoolClosed(ConnGuardError, pymysql.err.InterfaceError):
    """The pool was closed; no connection can be taken from it. Permanent.

    An ``InterfaceError`` like PyMySQL's for a closed connection: it is a use-after-close
    in the program, not a database condition.  ``args`` is ``(first line,)``.
    """

    docs = "pool-closed"

    def __init__(self, pool: str = "") -> None:
        diagnosis: Dict[str, Any] = {"pool": pool or None}
        cause = messages.render(_POOL_CLOSED_CAUSE, messages.facts(diagnosis))
        super().__init__(cause)
        describe(self, cause, _POOL_CLOSED_REMEDIES, diagnosis, None)


class CircuitOpen(ConnGuardError, pymysql.err.OperationalError):
    """Connecting is paused after repeated failures; fails fast until ``retry_after`` passes.

    ``last_cause`` is the last failure (usually a translated error, also chained as
    ``__cause__``); ``retry_after`` is in seconds.  ``args`` is ``(first line,)``.
    """

    transient = True
    docs = "circuit-open"

    def __init__(
        self,
        last_cause: Optional[BaseException],
        retry_after: float,
        *,
        host: Optional[str] = None,
        port: Optional[int] = None,
        failures: Optional[int] = None,
    ) -> None:
        diagnosis: Dict[str, Any] = {
            "retry_after": retry_after,
            "failures": failures,
            "host": host,
            "port": port,
            "last_cause": summary(last_cause),
            "last_docs": _docs_of(last_cause),
        }
        cause = messages.render(_CIRCUIT_CAUSE, messages.facts(diagnosis))
        super().__init__(cause)
        self.last_cause = last_cause
        self.retry_after = retry_after
        self.failures = failures
        describe(self, cause, _CIRCUIT_REMEDIES, diagnosis, None)
        self.__cause__ = last_cause


# --- shared state (connguard.coordination) --------------------------------------------------


class LeaseUnavailable(ConnGuardError, pymysql.err.OperationalError):
    """The destination's global connection budget is spent (``global_max`` leases held).

    ``census``: the coordinator's count (a :class:`connguard.backend.Census`), if it answered.

    The pool waits for one of its own connections (or, holding none, for a lease to free)
    rather than raise it; a caller sees it only as the ``last_cause`` of a ``PoolTimeout``.
    ``retry_after``: seconds until the pool asks again.
    """

    transient = True
    docs = "lease-unavailable"

    def __init__(self, destination: str, global_max: int, census: Optional[Any],
                 retry_after: float, fallback: bool = False) -> None:
        diagnosis: Dict[str, Any] = {"destination": destination, "global_max": global_max,
                                     "retry_after": retry_after}
        if census is not None:
            diagnosis.update(total=census.total, mine=census.mine, holders=census.holders,
                             share=census.share)
            cause = (f"the global connection budget for {destination} is spent: "
                     f"{census.total} of global_max {global_max} leases held by "
                     f"{census.holders} pools (this one {census.mine}, fair share "
                     f"{census.share})")
        else:
            cause = (f"the coordinator is unreachable and this pool is at its fallback budget "
                     f"for {destination} (its share of global_max {global_max})")
        super().__init__(cause)
        describe(self, cause, (
            "the pool waits for one of its own connections to come back; raise global_max "
            "if the server has room (max_connections minus a reserve for admins)",
            "or give each pool a smaller max_size so the cap is shared by more processes",
        ), diagnosis, None)
        self.retry_after = retry_after
        self.fallback = fallback


class CoordinatorUnavailable(ConnGuardError, pymysql.err.OperationalError):
    """The coordinator does not answer and the pool was told to refuse new connections then
    (``coordinator_fail="closed"``). Idle pooled connections are still handed out."""

    transient = True
    docs = "coordinator-unavailable"

    def __init__(self, address: str, last_error: str, retry_after: float) -> None:
        diagnosis = {"coordinator": address, "last_error": last_error,
                     "retry_after": retry_after}
        cause = (f"coordinator {address} is unreachable ({last_error or 'no answer'}) and "
                 "coordinator_fail='closed': no new server connection is opened until it "
                 "answers")
        super().__init__(cause)
        describe(self, cause, (
            "bring the coordinator back: pools pick it up again without a restart",
            "or use coordinator_fail='open' to fall back to each pool's local gate and "
            "budget while it is away",
        ), diagnosis, None)
        self.retry_after = retry_after



_OUTAGE_CAUSE = (
    "no new connection[ to {target}][ for {down_for} s][ ({failures} failures in a row)]"
    "[; this caller waited {waited} s][; last: {last_cause}][{never_reached}]"
)
#: Said when this process has never connected to the server: a wrong host or port, a
#: firewall, rather than an outage of a server it was using.
_NEVER_REACHED = "; this process has never connected to it: check the host and port"
_OUTAGE_REMEDIES = (
    "[fix the last failure (see {last_docs})|fix the last failure]: connguard tries again "
    "once per backoff interval, and callers are served as soon as an attempt succeeds",
    "callers given time to wait (checkout_timeout, SQLAlchemy's pool_timeout; "
    "connguard.configure(checkout_timeout=...) for drop-in pools, before their first "
    "connect) get their connection without an error when the server is back within it",
)


def _docs_of(err: Optional[BaseException]) -> Optional[str]:
    """How to read the page of ``err`` (a connguard error), as its own ``see:`` line says."""
    page = getattr(err, "docs", None)
    return f"`{messages.see(page)}`" if isinstance(page, str) and page else None


def note_deadline_cut(err: BaseException, left: float) -> None:
    """``err`` ended a handshake that had only ``left`` seconds of its caller's wait: say
    so first, since the rest of its advice is about a server that was slow."""
    if not isinstance(err, ConnGuardError):
        return
    err.remedies.insert(0, (
        f"this handshake had only {left:.2g} s of the caller's wait left (checkout_timeout, "
        "pool_timeout), less than connect_timeout: give callers more time, or keep "
        "connections idle (min_idle) so fewer of them need a new one"))
    err._message = messages.compose(err.cause, err.remedies, redact(original_text(err.original)),
                            err.docs)


def outage_error(
    last_cause: Optional[BaseException],
    down_for: float,
    waited: float,
    *,
    failures: Optional[int] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
    reached: bool = True,
) -> ServerUnavailable:
    """:class:`ServerUnavailable` for a caller whose wait ended while connects kept failing.

    ``down_for``: seconds since the first failure of the streak; ``waited``: how long this
    caller waited; ``reached``: whether this process ever connected to the server (if not,
    the message says to check the host and port). ``last_cause`` (the last failure,
    translated) is kept as ``.last_cause``
    and chained as ``__cause__``. ``args`` is ``(2003, first line)``, PyMySQL's code for a
    failed connect, so handlers that look at ``args[0]`` see a connect failure.
    """
    diagnosis: Dict[str, Any] = {
        "down_for": round(down_for, 2) if down_for >= 0.01 else None,
        "waited": round(waited, 2) if waited >= 0.01 else None,
        "failures": failures,
        "host": host,
        "port": port,
        "last_cause": summary(last_cause),
        "last_docs": _docs_of(last_cause),
        "never_reached": None if reached else _NEVER_REACHED,
    }
    text = messages.render(_OUTAGE_CAUSE, messages.facts(diagnosis))
    err = ServerUnavailable(CR.CR_CONN_HOST_ERROR, text)
    describe(err, text, _OUTAGE_REMEDIES, diagnosis, None)
    err.last_cause = last_cause
    err.down_for = down_for
    err.waited = waited
    if last_cause is not None:
        err.__cause__ = last_cause
    return err


class GateTimeout(ConnGuardError, pymysql.err.OperationalError):
    """A shared connect gate (host-wide or cluster-wide rate, opt-in) had no turn for this
    connect before the caller's deadline. Not a breaker: the server may be healthy.

    ``retry_after``: seconds until the gate's next turn. ``args`` is ``(first line,)``.
    """

    transient = True
    docs = "gate-timeout"

    def __init__(self, retry_after: float, *, scope: str = "cluster-wide",
                 host: Optional[str] = None, port: Optional[int] = None,
                 slots: Optional[int] = None) -> None:
        diagnosis: Dict[str, Any] = {"retry_after": round(retry_after, 3), "scope": scope,
                                     "host": host, "port": port, "slots": slots}
        if slots is not None:  # host-wide: slots come free when handshakes end, not on a clock
            cause = messages.render(_HOST_GATE_TIMEOUT_CAUSE, messages.facts(diagnosis))
            remedies = _HOST_GATE_TIMEOUT_REMEDIES
        else:
            cause = messages.render(_GATE_TIMEOUT_CAUSE, messages.facts(diagnosis))
            remedies = _GATE_TIMEOUT_REMEDIES
        super().__init__(cause)
        self.retry_after = retry_after
        describe(self, cause, remedies, diagnosis, None)


_GATE_TIMEOUT_CAUSE = (
    "no turn from the {scope} connect gate[ toward {target}] before the caller's deadline; "
    "the next in {retry_after} s"
)
_GATE_TIMEOUT_REMEDIES = (
    "the cluster-wide gate spreads the connects of the whole fleet (max_connect_rate per "
    "second together, connect_burst at once): raise them if the server can take more "
    "handshakes",
    "or give callers more time (checkout_timeout / pool_timeout), or keep more connections "
    "idle (min_idle) so fewer callers need a new one",
)
_HOST_GATE_TIMEOUT_CAUSE = (
    "all {slots} host-wide handshake slots[ toward {target}] stayed busy until the caller's "
    "deadline (this user's processes share max_handshakes)"
)
_HOST_GATE_TIMEOUT_REMEDIES = (
    "raise max_handshakes if the server can take more logins at once; slow logins (a busy "
    "server, TLS, init_command) hold the slots longer",
    "or give callers more time (checkout_timeout / pool_timeout), or keep more connections "
    "idle (min_idle) so fewer callers need a new one",
)


_POOL_TIMEOUT_CAUSE = (
    "no free connection in the pool[ for {destination}| for {target}] after waiting "
    "{waited} s: {in_use} of {max_size} in use[; the server refused more: {last_cause}]"
)
_POOL_TIMEOUT_REMEDIES = (
    "[the pool cannot grow because the server refuses new connections: fix that first "
    "(see {last_docs})]",
    "return connections promptly: release them in a `with` block or `finally`, also on errors",
    "look for slow queries or open transactions holding connections (SHOW PROCESSLIST)",
    "raise the pool size only if the server's max_connections leaves room for it",
    "wait longer only if callers can afford to; a queue that never drains just hides a leak",
)
_POOL_CLOSED_CAUSE = "the pool is closed[: {pool}]"
_POOL_CLOSED_REMEDIES = (
    "take connections only from an open pool: close() it once, at shutdown, after the last "
    "user is done",
)
_CIRCUIT_CAUSE = (
    "connecting[ to {target}] paused for {retry_after} s[ after {failures} failures in a row]"
    "[; last: {last_cause}]"
)
_CIRCUIT_REMEDIES = (
    "[fix the last failure (see {last_docs})|fix the last failure]; new connections are "
    "allowed again after {retry_after} s",
    "until then calls fail fast on purpose: a reconnect storm would make the server's load "
    "and this host's port and descriptor use worse",
)


def summary(exc: Optional[BaseException]) -> Optional[str]:
    """``ClassName: cause`` of an exception (its first line if it has no cause)."""
    if exc is None:
        return None
    try:
        first = getattr(exc, "cause", "") or str(exc).split("\n", 1)[0]
    except Exception:
        first = ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _restore(
    static: Type[ConnGuardError],
    origin: Optional[Type[BaseException]],
    args: Tuple[Any, ...],
    state: Dict[str, Any],
) -> ConnGuardError:
    """Unpickle a ConnGuardError without calling constructors whose signatures differ."""
    klass = combined_class(static, origin) if origin is not None else static
    inst = klass.__new__(klass, *args)
    if isinstance(inst, OSError):
        OSError.__init__(inst, *args)  # sets errno/strerror, which OSError parses from args
    inst.args = args
    inst.__dict__.update(state)
    return inst


def detached(err: BaseException) -> BaseException:
    """A copy of ``err`` that keeps no frame alive: no traceback, no chained exceptions, its
    ``original`` detached too. What a long-lived object (a process-wide storm gate) keeps:
    a traceback holds every local of every frame it passed (engines, pools, connections)."""
    try:
        new = copy.copy(err)
    except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt
        new = Exception(f"{type(err).__name__}: {err}")
    new.__traceback__ = new.__cause__ = new.__context__ = None
    for name in ("original", "original_exception"):  # connguard's, and PyMySQL's socket error
        inner = getattr(new, name, None)
        if isinstance(inner, BaseException) and inner is not err:
            setattr(new, name, detached(inner))
    return new


def as_driver_error(err: BaseException, driver_error: Type[BaseException]) -> BaseException:
    """``err``, an error connguard raised itself (the storm gate, the resource guard: no
    driver error behind it), as an instance of ``driver_error`` too, so that code and
    SQLAlchemy catching another driver's classes see it as that driver's. ``err`` itself when
    it is not connguard's or already is one."""
    if not isinstance(err, ConnGuardError) or isinstance(err, driver_error):
        return err
    new = _restore(err._static or type(err), driver_error, err.args, dict(err.__dict__))
    new.__cause__, new.__traceback__ = err.__cause__, err.__traceback__
    return new



#: The top-level modules of the other MySQL drivers whose exceptions carry PyMySQL's shape
#: (``args == (code, message)``): mysqlclient's ``MySQLdb``, and ``asyncmy``. aiomysql
#: raises PyMySQL's own. Named, not imported: connguard never imports a driver it is not
#: given.
OTHER_DRIVERS = frozenset({"MySQLdb", "asyncmy"})


def is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of a MySQL driver connguard knows: PyMySQL's
    ``MySQLError`` or one of :data:`OTHER_DRIVERS`' (found by the class named ``MySQLError``
    in its bases, since their modules are not imported here)."""
    if isinstance(exc, pymysql.err.MySQLError):
        return True
    return any(cls.__name__ == "MySQLError"
               and cls.__module__.partition(".")[0] in OTHER_DRIVERS
               for cls in type(exc).__mro__)


def original_text(exc: Optional[BaseException]) -> str:
    if exc is None:
        return ""
    if isinstance(exc, pymysql.err.MySQLError):
        return str(exc.args)  # PyMySQL's own str(): (2003, "Can't connect ...")
    if is_driver_error(exc):
        return f"{type(exc).__module__.partition('.')[0]}.{type(exc).__name__}{exc.args}"
    return f"{type(exc).__name__}: {exc}"


def describe(
    err: ConnGuardError,
    cause: str,
    remedy_templates: Tuple[str, ...],
    diagnosis: Dict[str, Any],
    original: Optional[BaseException],
    password: Password = None,
    server_message: str = "",
) -> None:
    """Fill in cause, remedies, diagnosis and message of ``err``."""
    facts = messages.facts(diagnosis, server_message)
    remedies = [r for r in (messages.render(t, facts) for t in remedy_templates) if r]
    err.cause = redact(cause, password)
    err.remedies = [redact(r, password) for r in remedies]
    err.diagnosis = diagnosis
    err.original = original
    shown = redact(original_text(original), password)
    err._message = messages.compose(err.cause, err.remedies, shown, err.docs)


_COMBINED: Dict[Tuple[Type[ConnGuardError], Type[BaseException]], Type[ConnGuardError]] = {}


def combined_class(static: Type[ConnGuardError],
                   origin: Type[BaseException]) -> Type[ConnGuardError]:
    """``static`` plus the original's class, so ``except`` clauses for the latter still match.

    Cached: one class per pair, so ``type(a) is type(b)`` for errors alike.
    """
    if issubclass(static, origin):
        return static
    key = (static, origin)
    klass = _COMBINED.get(key)
    if klass is None:
        attrs = {
            "__module__": static.__module__,
            "__qualname__": static.__qualname__,
            "__doc__": static.__doc__,
            "_static": static,
            "_origin": origin,
        }
        klass = _COMBINED.setdefault(key, type(static.__name__, (static, origin), attrs))
    return klass


# The classes keep the module they are documented, imported, pickled and reported under
# (error trackers group by it): connguard.errors, which re-exports them.
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, ConnGuardError):
        _cls.__module__ = "connguard.errors"
del _cls
# The shared-state errors were always connguard.coordination's, which re-exports them.
LeaseUnavailable.__module__ = CoordinatorUnavailable.__module__ = "connguard.coordination"
# Pickles name the function that rebuilds an error: the same module for old and new ones.
_restore.__module__ = "connguard.errors"
