"""Secrets out of every text connguard shows: masked by structure, never by substring.

A password is found where it stands (``password=...``, ``'password': ...``, URL userinfo up to
the last ``@`` before the host) and, as a whole token of at least :data:`MIN_VERBATIM`
characters that is not all digits, where the caller names it. Used for exception messages,
log lines, reprs, CLI output and what is written to a shared coordinator.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, List, Tuple, Union

Password = Union[str, bytes, None]

_MASK = "***"
# The places a password has in text, by structure: ``password=...`` / ``password: ...``
# (keyword arguments, DSN query strings, MYSQL_PWD=..., db_password=..., config text), a
# dict's or JSON's ``'password': '...'``, and the userinfo of ``scheme://user:password@host``
# URLs (up to the last ``@`` before the host: a password may hold ``@`` and ``/``).
_QUOTED = r"b?'(?:[^'\\]|\\.)*'|" + r'b?"(?:[^"\\]|\\.)*"'
_SECRET_ASSIGNMENT = re.compile(
    # (?<![a-z_]): a name is tried from the start of its run of letters only; tried from
    # each "_" in it too, "a_a_a_..." (a long token in an error text) cost quadratic time.
    r"(?i)(?<![a-z_])([a-z_]*(?:password|passwd|pwd))(\s*[=:]\s*)"
    r"(?!(?:YES|NO)\))"  # MariaDB's "(using password: YES)" says nothing secret
    rf"({_QUOTED}|[^\s,;)&'\"]+)")
_SECRET_ENTRY = re.compile(
    rf"(?i)(['\"][a-z_]*(?:password|passwd|pwd)['\"]\s*:\s*)({_QUOTED})")
# scheme://user: (a user name may hold "@": user@corp:pw@host); its password runs to the last
# "@" of the token, whatever follows it (a host, or "/" in a host-less socket URL).
_URL_USER = re.compile(r"://[^/\s:]*:")
_BLANK = re.compile(r"\s")
#: A password is also masked where it appears verbatim, as a whole token, only from this
#: length on (and not all digits): a short one would match by chance ("3" in 10.0.0.3),
#: mangling the message and showing where the password's characters are.
MIN_VERBATIM = 8


def _password_text(password: Password) -> str:
    if isinstance(password, bytes):
        try:
            return password.decode("utf-8")
        except UnicodeDecodeError:
            return password.decode("latin-1")
    return password or ""


def redact(text: str, password: Password = None) -> str:
    """``text`` with its secrets masked, by structure: ``password=...`` assignments,
    ``'password': ...`` entries and the password of ``scheme://user:password@`` URLs.

    ``password`` (str or bytes) is also masked where it appears verbatim as a whole token
    (not inside a longer word or number), when it has at least MIN_VERBATIM characters and
    is not all digits: never by substring, which would mangle "10.0.0.3:3306" for a
    password "3" and show where the password's characters are.
    """
    secret = _password_text(password)
    if len(secret) >= MIN_VERBATIM and not secret.isdigit() and secret in text:
        # First: a URL or a quoted value holding it is then masked whole below.
        token = re.compile(rf"(?<![\w]){re.escape(secret)}(?![\w])")
        text = token.sub(_MASK, text)
    text = _SECRET_ENTRY.sub(rf"\1'{_MASK}'", text)
    text = _SECRET_ASSIGNMENT.sub(rf"\1\2{_MASK}", text)
    return _mask_url_passwords(text)


def _mask_url_passwords(text: str) -> str:
    """``scheme://user:password@host`` with the password masked, in linear time: each token
    (a run without whitespace) is read once, however many "://" it holds (a regex of the
    same rule, ``\\S*@`` tried from every "://", was quadratic)."""
    out: List[str] = []
    pos = 0
    while True:
        user = _URL_USER.search(text, pos)
        if user is None:
            break
        blank = _BLANK.search(text, user.end())
        token_end = len(text) if blank is None else blank.start()
        at = _last_host_at(text, user.end(), token_end)
        if at < 0:  # no later "://" of this token can find one either: skip the token
            out.append(text[pos:token_end])
            pos = token_end
            continue
        out.append(text[pos:user.end()] + _MASK)
        pos = at  # the "@host" is kept
    out.append(text[pos:])
    return "".join(out)


#: A ``password=`` query parameter of a URL, its value up to the next parameter.
_QUERY_PASSWORD = re.compile(r"(?i)([?&;][a-z_]*(?:password|passwd|pwd)=)[^&;#]*")


def redact_url(url: str) -> str:
    """A URL given as a value (a coordinator's) with its password masked, by the URL's own
    structure: the userinfo's password up to the URL's last "@", and the value of a
    ``password=`` query parameter up to the next parameter, whatever they hold. Text's
    :func:`redact` ends a URL at the first blank, and urllib and the Redis client read
    ``redis://app:two words@host`` with the password "two words"."""
    head, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        user, colon, _ = rest[:max(at, 0)].partition(":")
        if at >= 0 and colon:
            rest = f"{user}:{_MASK}{rest[at:]}"
    return redact(_QUERY_PASSWORD.sub(rf"\1{_MASK}", head + sep + rest))


def _last_host_at(text: str, start: int, end: int) -> int:
    """The last "@" in text[start:end]; -1 if there is none. Past a password's own "@"s and
    "/"s: masking a URL's path too hides more, never less."""
    return text.rfind("@", start, end)


def redact_args(args: Tuple[Any, ...], password: Password) -> Tuple[Any, ...]:
    """``args`` with every string redacted."""
    return tuple(redact(a, password) if isinstance(a, str) else a for a in args)


def redact_exception(exc: BaseException, password: Password = None) -> None:
    """Mask ``password`` (and credential-like text, see :func:`redact`) in ``exc`` and in
    every exception chained to it, in place.

    A traceback prints each exception of the chain (``__cause__``, ``__context__``); PyMySQL
    also keeps the ``OSError`` of a failed connect as ``original_exception``.  What a
    traceback shows of each comes from a few fields, and those are redacted one by one:
    ``args`` (``repr()``, and ``str()`` of most exceptions), an ``OSError``'s ``strerror``,
    ``filename`` and ``filename2`` (its ``str()``: ``[Errno 2] No such file or directory:
    '/path'``), ``__notes__``, and the ``traceback`` text PyMySQL stores.  Other attributes
    and the source lines a traceback quotes are beyond reach.  Never raises.
    """
    pending: List[BaseException] = [exc]
    seen = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        with contextlib.suppress(Exception):  # an exotic exception class: left as it is
            _redact_fields(current, password)
        for linked in (current.__cause__, current.__context__,
                       getattr(current, "original_exception", None),
                       getattr(current, "original", None)):
            if isinstance(linked, BaseException):
                pending.append(linked)


def _redact_fields(exc: BaseException, password: Password) -> None:
    args = exc.args
    if isinstance(args, tuple):
        clean = redact_args(args, password)
        if clean != args:
            exc.args = clean
    if isinstance(exc, OSError):
        # str(OSError) is built from these, not from args.
        for name in ("strerror", "filename", "filename2"):
            value = getattr(exc, name)
            clean_value = _redact_value(value, password)
            if clean_value is not value:
                setattr(exc, name, clean_value)
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes[:] = [redact(n, password) if isinstance(n, str) else n for n in notes]
    trace = getattr(exc, "traceback", None)  # PyMySQL keeps format_exc() of connect errors
    if isinstance(trace, str):
        clean_trace = redact(trace, password)
        if clean_trace != trace:
            setattr(exc, "traceback", clean_trace)  # noqa: B010 - not an attribute mypy knows


def _redact_value(value: Any, password: Password) -> Any:
    """A str, bytes or path field redacted (as a str when it had to change); else itself."""
    raw = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(raw, (str, bytes)):
        text = os.fsdecode(raw)
        clean = redact(text, password)
        if clean != text:
            return clean
    return value
