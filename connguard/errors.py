"""Turn PyMySQL and socket errors into exceptions that say why they happened and what to do.

Connection errors (refused, ports or descriptors exhausted, server full, lost) and the
statement errors a retry can cure (interrupted, timed out, lock wait timeout, deadlock).

One table, :data:`TABLE` (in :mod:`connguard.error_table`, re-exported here), maps an
error's identity to a connguard exception class, whether retrying can help, the remedies
and a docs page.  The identity is the MySQL code
(``exc.args[0]``) and, where it matters, the errno of the ``OSError`` underneath: PyMySQL
reports every failed ``connect()`` as ``OperationalError(2003, ...)`` whether the cause is a
refused port, exhausted local ports (errno 99) or the open-file limit (errno 24).  Raw
``OSError``s are identified by errno alone.

:func:`translate` builds the exception.  The result subclasses both :class:`ConnGuardError`
and the PyMySQL class of the original, keeps the original ``args`` (``e.args[0]`` is still
the MySQL code), chains the original as ``__cause__`` and carries a ``diagnosis`` of the
local resources involved, so existing ``except pymysql.err.OperationalError`` clauses keep
working while the message now names the numbers.  :func:`classify`, :func:`is_transient`
and :func:`is_disconnect` answer the questions the pool and reconnect logic ask.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import re
import socket
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from pymysql.constants import CR, ER

from connguard import exceptions, messages
from connguard.census import census as sockets_toward
from connguard.census import unix_listen_queue
from connguard.error_table import (  # noqa: F401 - the ER_ constants, re-exported
    CONNECT_CODES,
    DISCONNECT_CODES,
    ER_ACCESS_DENIED_NO_PASSWORD_ERROR,
    ER_ACCOUNT_HAS_BEEN_LOCKED,
    ER_CLIENT_INTERACTION_TIMEOUT,
    ER_CONNECTION_KILLED,
    ER_MUST_CHANGE_PASSWORD_LOGIN,
    ER_QUERY_TIMEOUT,
    ER_STATEMENT_TIMEOUT,
    ER_USER_IS_BLOCKED,
    SHARED_CODES,
    TABLE,
    Identity,
    Row,
)

# Every exception class: connguard.errors.X is their documented home (and where pickles
# find them); they are defined in connguard.exceptions, beside how each is worded.
from connguard.exceptions import *  # noqa: F403
from connguard.exceptions import (  # noqa: F401 - what errors uses, and helpers re-exported
    OTHER_DRIVERS,
    ConnGuardError,
    CoordinatorUnavailable,
    FdLimitReached,
    HandshakeLost,
    LeaseUnavailable,
    LocalPortsExhausted,
    _restore,
    as_driver_error,
    combined_class,
    describe,
    detached,
    is_driver_error,
    note_deadline_cut,
    original_text,
    outage_error,
    summary,
)
from connguard.limits import limits as local_limits
from connguard.messages import docs_base, docs_link  # noqa: F401 - re-exported
from connguard.redaction import (  # noqa: F401 - redact and friends, re-exported
    MIN_VERBATIM,
    Password,
    redact,
    redact_args,
    redact_exception,
)

__all__ = [
    *exceptions.__all__,
    "TABLE",
    "Row",
    "classify",
    "is_disconnect",
    "is_transient",
    "preflight_error",
    "redact",
    "redact_exception",
    "translate",
]

# --- identity -----------------------------------------------------------------------------

_ERRNO_IN_TEXT = re.compile(r"\[Errno (-?\d+)\]|\((-?\d+)\)\s*$")
_TIMED_OUT_TEXT = re.compile(r"\(timed out\)\s*$")
# libmysqlclient's wording for a connection lost during login; PyMySQL has no such text,
# so its callers say so with translate(..., during_connect=True).
_HANDSHAKE_TEXT = re.compile(r"reading (initial communication|authorization) packet|handshake")
_HOST_IN_TEXT = re.compile(r"MySQL server on '([^']*)'")


def _mysql_code(exc: BaseException) -> Optional[int]:
    """``args[0]`` of a driver's error when it is an int we can trust; None otherwise."""
    if not is_driver_error(exc):
        return None
    args = getattr(exc, "args", ())
    code = args[0] if isinstance(args, tuple) and args else None
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    if code in SHARED_CODES:
        pattern, match_means_ours = SHARED_CODES[code]
        if bool(pattern.search(_server_message(exc))) != match_means_ours:
            return None  # the other vendor's error with the same number
    return code


def _server_message(exc: BaseException) -> str:
    """The text part of an error: ``args[1]`` for PyMySQL, ``strerror`` for OSError."""
    if isinstance(exc, OSError):
        return exc.strerror if isinstance(exc.strerror, str) else ""
    args = getattr(exc, "args", ())
    if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], str):
        return args[1]
    return ""


def _wrapped_oserror(exc: BaseException) -> Optional[OSError]:
    """The OSError under a PyMySQL error: ``original_exception``, ``__cause__``, ``__context__``."""
    for candidate in (
        getattr(exc, "original_exception", None),
        exc.__cause__,
        exc.__context__,
    ):
        if isinstance(candidate, OSError):
            return candidate
    return None


def _is_timeout(exc: OSError) -> bool:
    """A Python-level socket timeout (no errno), as opposed to the kernel's ETIMEDOUT."""
    return exc.errno is None and isinstance(exc, (socket.timeout, TimeoutError))


def _errno_from_text(text: str) -> Optional[int]:
    """Last resort: "(99)" or "[Errno 99]" in the message."""
    match = _ERRNO_IN_TEXT.search(text)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def _identify(exc: BaseException, during_connect: bool) -> Optional[Identity]:
    """The identity of ``exc``, or None if it is neither a coded PyMySQL error nor an OSError."""
    if isinstance(exc, OSError):
        errno = exc.errno if isinstance(exc.errno, int) else None
        return Identity(None, errno, _is_timeout(exc), during_connect)
    code = _mysql_code(exc)
    if code is None:
        return None
    text = _server_message(exc)
    wrapped = _wrapped_oserror(exc)
    if wrapped is not None:
        errno = wrapped.errno if isinstance(wrapped.errno, int) else None
        timed_out = _is_timeout(wrapped)
    else:
        # The message only says which errno for connect failures; elsewhere a number in
        # parentheses may be anything.
        errno = _errno_from_text(text) if code in CONNECT_CODES else None
        if errno == errno_codes.EINPROGRESS:
            # MariaDB's libmysqlclient (mysqlclient's): its non-blocking connect reports the
            # errno of starting it, whatever ended it (refused, unreachable): unknown.
            errno = None
        timed_out = bool(_TIMED_OUT_TEXT.search(text))
    connecting = during_connect or bool(_HANDSHAKE_TEXT.search(text))
    return Identity(code, errno, timed_out, connecting)


def _match(ident: Identity) -> Optional[Row]:
    return next((row for row in TABLE if row.matches(ident)), None)


def classify(exc: BaseException, *, during_connect: bool = False) -> Optional[Row]:
    """The :data:`TABLE` row describing ``exc``, or None if the table does not know it.

    A translated error is classified by its original.  Never raises.
    """
    try:
        if isinstance(exc, ConnGuardError):
            return None if exc.original is None else classify(exc.original)
        ident = _identify(exc, during_connect)
        return None if ident is None else _match(ident)
    except Exception:
        return None


def is_transient(exc: BaseException) -> Optional[bool]:
    """Whether a later retry (with backoff) can succeed; None if we do not know the error."""
    if isinstance(exc, ConnGuardError):
        return exc.transient
    row = classify(exc)
    return None if row is None else row.transient


def is_disconnect(exc: BaseException) -> bool:
    """Whether the connection that raised ``exc`` is unusable and must be discarded.

    True for the connection-level codes in :data:`DISCONNECT_CODES`, for PyMySQL's errors
    about an already closed connection, and for any raw ``OSError`` (a socket error on the
    connection).  A translated error answers for its original.  Never raises.
    """
    try:
        if isinstance(exc, ConnGuardError):
            return exc.original is not None and is_disconnect(exc.original)
        if isinstance(exc, OSError):
            return True
        if not is_driver_error(exc):
            return False
        if _mysql_code(exc) in DISCONNECT_CODES:
            return True
        # PyMySQL's wording for using a connection that is already closed.
        return exc.args in ((0, ""), ("Already closed",))
    except Exception:
        return False


# --- diagnosis ----------------------------------------------------------------------------

_LIMIT_KEYS = ("fd_in_use", "fd_soft", "fd_hard", "port_range", "tcp_tw_reuse")


def _limits() -> Dict[str, Any]:
    """Local limits for a diagnosis (:func:`connguard.limits.limits`); a source that fails
    reads None, and a translation never fails for want of one."""
    try:
        found = local_limits()
    except Exception:  # noqa: BLE001 - a sandbox without /proc or resource: no numbers
        found = {}
    return {**{key: None for key in _LIMIT_KEYS}, **found}


def _resolves_locally(host: str) -> bool:
    """IP literals and localhost: names we can count sockets for without DNS.

    Errors are often translated while DNS or the network is what is failing, and a
    translation must not hang, so other names get no census.
    """
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _census(host: Optional[str], port: Optional[int]) -> Optional[Dict[str, int]]:
    """Sockets toward host:port by state, from connguard.census; None if unavailable."""
    if not host or port is None or not _resolves_locally(host):
        return None
    try:
        return {str(state): int(count) for state, count in sockets_toward(host, port).items()}
    except Exception:  # noqa: BLE001 - no netlink nor /proc: the message goes without it
        return None


# getaddrinfo errors carry negative numbers that errno.errorcode does not name.
_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def _errno_name(ident: Identity) -> Optional[str]:
    if ident.errno is None:
        return "timeout" if ident.timed_out else None
    if ident.errno < 0:
        return _EAI_NAMES.get(ident.errno)
    return errno_codes.errorcode.get(ident.errno)


def _endpoint(host: Optional[str], port: Optional[int], text: str) -> Tuple[Any, Any]:
    """host and port as given, else as named in "Can't connect to MySQL server on 'h[:p]'"."""
    if host is not None:
        return host, port
    match = _HOST_IN_TEXT.search(text)
    if match is None:
        return None, port
    found = match.group(1)
    name, sep, maybe_port = found.rpartition(":")
    if sep and name.count(":") == 0 and maybe_port.isdigit():  # not an IPv6 address
        return name, port if port is not None else int(maybe_port)
    return found, port


def _diagnose(
    ident: Identity, row: Row, host: Optional[str], port: Optional[int], deep: bool
) -> Dict[str, Any]:
    """Facts about the error and this host's resources; never raises, no DNS, no server I/O."""
    diagnosis: Dict[str, Any] = {
        "mysql_code": ident.code,
        "errno": ident.errno,
        "errno_name": _errno_name(ident),
        "host": host,
        "port": port,
    }
    if deep and row.local:
        diagnosis.update(_limits())
        diagnosis["census"] = _census(host, port) if row.census else None
        if ident.errno == errno_codes.EAGAIN and host and host.startswith("/"):
            queue = unix_listen_queue(host)
            if queue is not None:
                diagnosis["listen_queue"], diagnosis["listen_backlog"] = queue
    return diagnosis


# Facts only the server's own text carries.
# 1135: MySQL "(errno 11)", MariaDB '(errno 11 "Resource temporarily unavailable")'.
_SERVER_ERRNO_TEXT = re.compile(r"\(errno:? (\d+)")
_BLOCKED_HOST_TEXT = re.compile(r"Host '([^']*)' is blocked")


def _message_facts(code: Optional[int], text: str) -> Dict[str, Any]:
    """The server's errno behind a 1135, the client host a 1129 names."""
    facts: Dict[str, Any] = {}
    if code == ER.CANT_CREATE_THREAD:
        match = _SERVER_ERRNO_TEXT.search(text)
        if match:
            facts["server_errno"] = int(match.group(1))
            facts["server_errno_name"] = errno_codes.errorcode.get(int(match.group(1)))
    elif code == ER.HOST_IS_BLOCKED:
        match = _BLOCKED_HOST_TEXT.search(text)
        if match:
            facts["blocked_host"] = match.group(1)
    return facts


# --- messages (the templates are filled by connguard.messages) -------------------------


# --- translate ----------------------------------------------------------------------------

def _instantiate(
    static: Type[ConnGuardError], exc: BaseException, args: Tuple[Any, ...]
) -> ConnGuardError:
    """An instance of ``static`` combined with ``type(exc)``, carrying ``args``."""
    try:
        new = combined_class(static, type(exc))(*args)
    except Exception:
        # The original's class cannot be combined or built from its args (odd signature or
        # layout): the table's class still subclasses PyMySQL's OperationalError.
        new = static(*args)
    for attr in ("sqlstate", "original_exception"):
        if hasattr(exc, attr):
            setattr(new, attr, getattr(exc, attr))
    return new


def _translate(
    exc: BaseException,
    host: Optional[str],
    port: Optional[int],
    diagnose: bool,
    extra: Optional[Mapping[str, Any]],
    password: Password,
    during_connect: bool,
) -> BaseException:
    if isinstance(exc, ConnGuardError) or not isinstance(exc, BaseException):
        return exc
    if password:
        # Before anything reads a message, and for errors the table does not know too: the
        # caller raises ours "from exc", or exc itself, and a traceback prints the chain.
        redact_exception(exc, password)
    ident = _identify(exc, during_connect)
    row = None if ident is None else _match(ident)
    if ident is None or row is None:
        return exc
    server_message = redact(_server_message(exc), password)
    host, port = _endpoint(host, port, server_message)
    diagnosis = _diagnose(ident, row, host, port, diagnose)
    diagnosis.update(_message_facts(ident.code, server_message))
    diagnosis.update(extra or {})
    if password:  # e.g. a unix socket path that holds it; diagnoses get logged
        diagnosis = {k: redact(v, password) if isinstance(v, str) else v
                     for k, v in diagnosis.items()}
    new = _instantiate(row.cls, exc, redact_args(tuple(exc.args), password))
    new.transient = row.transient
    cause = messages.render(row.cause, messages.facts(diagnosis, server_message))
    describe(new, cause, row.remedies, diagnosis, exc, password, server_message)
    new.__cause__ = exc  # also sets __suppress_context__
    return new


def translate(
    exc: BaseException,
    *,
    host: Optional[str] = None,
    port: Optional[int] = None,
    diagnose: bool = True,
    extra: Optional[Mapping[str, Any]] = None,
    password: Password = None,
    during_connect: bool = False,
) -> BaseException:
    """Return ``exc`` as the connguard exception the table names for it.

    Returns ``exc`` itself when it already is a :class:`ConnGuardError` or the table does
    not know it, and never raises: on any internal failure the original is the answer.
    The result is meant to be raised (``raise translate(e) from e``).

    ``host``/``port`` name the server (default: the host in PyMySQL's message, no port);
    they appear in the message and select the socket census.  ``diagnose=False`` skips
    reading local limits and counting sockets (cheap identity only).  ``extra`` adds facts
    to the diagnosis and the message, e.g. ``{"max_connections": 151,
    "threads_connected": 150}``; also used: ``connect_timeout``, ``read_timeout``,
    ``wait_timeout``, ``max_connect_errors``.  ``password`` is masked wherever it would
    appear: in the result, and in place in ``exc`` and the exceptions chained to it (an
    ``OSError``'s ``filename`` and ``strerror`` included, see :func:`redact_exception`),
    also when the table does not know ``exc``.  ``during_connect=True`` says the error
    happened while connecting, which turns a lost connection (2013, 2006) into
    :class:`HandshakeLost`.

    Time is bounded: the census (sockets toward the server) is taken only for rows that
    use it and only for IP literals or ``localhost``, so no DNS lookup happens here.
    """
    try:
        return _translate(exc, host, port, diagnose, extra, password, during_connect)
    except Exception:
        # Translating is a courtesy: the original error is always a correct answer.
        return exc



# --- the resource guard's refusals (connguard.guard) -----------------------------------------

PREFLIGHT_PORT_CAUSE = (
    "refused before connect()[ to {target}]: {ports_free} of {ports_total} local ports free "
    "toward it[ (range {port_range_text}; {states_text})], and one more connection would "
    "leave fewer than the reserve of {port_reserve}"
)
PREFLIGHT_FD_CAUSE = (
    "refused before connect()[ to {target}]: {fds_left} file descriptors left under the soft "
    "limit of {fd_soft}[ (hard {fd_hard}; {fd_in_use} open)], and one more connection would "
    "leave fewer than the reserve of {fd_reserve}"
)


def _port_remedies(diagnosis: Mapping[str, Any]) -> Tuple[str, ...]:
    """What to do about exhausted ports, most useful first, for the sockets actually seen."""
    census_counts = diagnosis.get("census") or {}
    remedies: List[str] = [
        "hold fewer connections to {target}: lower max_size, use one pool per process and "
        "server, close pools no longer needed[ ({established} established now)]",
    ]
    if census_counts.get("time_wait"):
        remedies.append(
            "{time_wait} ports sit in TIME_WAIT (60 s after each close): reuse connections "
            "instead of reconnecting[, below about {max_connect_rate} new connections/s]; "
            "net.ipv4.tcp_tw_reuse=1[ (now {tcp_tw_reuse})] lets connect() reuse them early")
    if census_counts.get("close_wait"):
        remedies.append("{close_wait} sockets are in CLOSE_WAIT: the server closed them and "
                        "this host has not; find the code that keeps them open")
    remedies += [
        "widen net.ipv4.ip_local_port_range[ (now {port_range_text})]",
        "spread connections over more client IPs or server addresses",
        "the guard keeps {port_reserve} ports for the rest of this host: lower port_reserve "
        "only if nothing else here connects to that server, or set resource_guard=False",
    ]
    return tuple(remedies)


def _fd_remedies(diagnosis: Mapping[str, Any]) -> Tuple[str, ...]:
    """What to do about the descriptor limit, most useful first."""
    remedies: List[str] = [
        "close connections and files no longer used; lower max_size",
    ]
    if diagnosis.get("fd_hard") != diagnosis.get("fd_soft"):
        remedies.append(
            "raise the soft limit toward the hard limit[ {fd_hard}]: "
            "connguard.limits.raise_fd_soft_limit() in the process, LimitNOFILE= in systemd, "
            "`ulimit -n` in the start script")
    else:
        remedies.append("raise the hard limit (LimitNOFILE= in systemd, limits.conf), then "
                        "the soft one")
    remedies.append("the guard keeps {fd_reserve} descriptors for files, logs and other "
                    "pools: lower fd_reserve only if the process opens little else, or set "
                    "resource_guard=False")
    return tuple(remedies)


def preflight_refusal(fds: bool, diagnosis: Dict[str, Any]) -> ConnGuardError:
    """The resource guard's refusal (``fds``: the descriptor limit, else the local ports
    toward the server) as FdLimitReached or LocalPortsExhausted, worded from ``diagnosis``."""
    if fds:
        return preflight_error(FdLimitReached, PREFLIGHT_FD_CAUSE, _fd_remedies(diagnosis),
                               diagnosis)
    return preflight_error(LocalPortsExhausted, PREFLIGHT_PORT_CAUSE,
                           _port_remedies(diagnosis), diagnosis)


def preflight_error(
    cls: Type[ConnGuardError],
    cause: str,
    remedies: Tuple[str, ...],
    diagnosis: Dict[str, Any],
) -> ConnGuardError:
    """``cls`` for a connection refused *before* connect() (the OS resource guard).

    Nothing failed yet, so there is no original; ``cause`` and ``remedies`` are templates
    like the table's, filled from ``diagnosis`` (which becomes ``err.diagnosis``).
    ``args`` is ``(2003, first line)``, the code PyMySQL uses for a failed connect, so
    handlers that look at ``args[0]`` treat it like the kernel's refusal.
    """
    facts = messages.facts(diagnosis)
    text = messages.render(cause, facts)
    err = cls(CR.CR_CONN_HOST_ERROR, text)
    describe(err, text, remedies, diagnosis, None)
    return err
