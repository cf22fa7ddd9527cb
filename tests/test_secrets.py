"""No password in any repr, log line, exception chain or CLI output; and masking by
structure, so that short passwords neither mangle messages nor give themselves away."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Iterator, Tuple

import pytest

import connguard
from connguard import coordination
from connguard.errors import redact, redact_exception
from connguard.sqlalchemy_plugin import PluginOptions
from tests.mariadb import MariaDB
from tests.optional import optional

DISTINCT = "Zq9-distinct-Pw!x"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but never listening: every connect is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _printed(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@pytest.mark.parametrize("password", ["3", "1234", "a"])
def test_short_passwords_never_mangle_messages(password: str) -> None:
    text = "cannot reach the MySQL server at 10.0.0.3:3306 (errno 111) after 1234 a try"
    assert redact(text, password) == text  # not a single character masked
    assert redact(f"mysql://app:{password}@10.0.0.3:3306/x", password) == \
        "mysql://app:***@10.0.0.3:3306/x"  # its place in a URL is known: masked there
    assert redact(f"connect(password='{password}', host='10.0.0.3')", password) == \
        "connect(password=***, host='10.0.0.3')"
    assert redact(f"{{'password': '{password}', 'port': 3306}}") == \
        "{'password': '***', 'port': 3306}"


@pytest.mark.parametrize("text, expected", [
    ("mysql://app:p@ssw0rdXYZ@db:3306/x", "mysql://app:***@db:3306/x"),  # @ in it
    ("redis://u:p@ss/word@h:6379/0", "redis://u:***@h:6379/0"),  # / in it
    ("MYSQL_PWD=hunter2 mysql", "MYSQL_PWD=*** mysql"),
    ("db_password=hunter2, x=1", "db_password=***, x=1"),
    ("{'ssl_key_password': 'hunter2', 'a': 1}", "{'ssl_key_password': '***', 'a': 1}"),
    ("password: hunter2", "password: ***"),
    ("{'password': b\"it's\"}", "{'password': '***'}"),
    ("password='ab\\'cd\"ef' user='a'", "password=*** user='a'"),
    ('{"password": "a\\"b", "user": "x"}', '{"password": \'***\', "user": "x"}'),
    ("Access denied for user 'app'@'localhost' (using password: YES)",
     "Access denied for user 'app'@'localhost' (using password: YES)"),
])
def test_structure_finds_the_password_wherever_text_gives_it_a_place(
        text: str, expected: str) -> None:
    assert redact(text) == expected


def test_distinctive_passwords_are_masked_as_whole_tokens_only() -> None:
    assert redact(f"opening /etc/{DISTINCT}.pem failed", DISTINCT) == \
        "opening /etc/***.pem failed"
    longer = f"x{DISTINCT}y"  # part of a longer word: not this password
    assert redact(longer, DISTINCT) == longer


def test_reprs_never_show_the_password(closed_port: int) -> None:
    url = f"redis://:{DISTINCT}@127.0.0.1:6379/0"
    settings = coordination.settings_from_options({"coordinator": url})
    assert DISTINCT not in repr(settings)
    assert DISTINCT not in repr(PluginOptions(coordination_settings=settings))
    pool = connguard.Pool(host="127.0.0.1", port=closed_port, user="app", password=DISTINCT)
    try:
        assert DISTINCT not in repr(pool) and DISTINCT not in str(pool.stats())
    finally:
        pool.close()


@pytest.mark.parametrize("password", [DISTINCT, "3"])
def test_failed_connects_never_show_the_password(closed_port: int, password: str,
                                                 caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="connguard")
    pool = connguard.Pool(host="127.0.0.1", port=closed_port, user="app", password=password,
                          checkout_timeout=0.3)
    try:
        seen = []
        for _ in range(4):  # enough to open the breaker (logged) and fail at the deadline
            with pytest.raises(connguard.ServerUnavailable) as info:
                pool.connect()
            seen.append(_printed(info.value))
    finally:
        pool.close()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    if password == DISTINCT:
        assert not any(DISTINCT in text for text in seen) and DISTINCT not in logs
    assert "***" not in "".join(seen) and "***" not in logs  # nothing needed masking
    assert f"127.0.0.1:{closed_port}" in seen[0]  # the address is intact


def test_redacting_a_chain_reaches_every_exception() -> None:
    inner = OSError(2, f"No such file: {DISTINCT}", f"/keys/{DISTINCT}")
    outer = RuntimeError(f"connect(password='{DISTINCT}')")
    outer.__cause__ = inner
    redact_exception(outer, DISTINCT)
    assert DISTINCT not in _printed(outer)


def _doctor(*args: str) -> Tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "connguard.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_doctor_never_prints_the_password(closed_port: int, mariadb: MariaDB) -> None:
    for port in (closed_port, mariadb.port):  # refused, then a wrong password for a server
        code, out = _doctor("--dsn", f"mysql://app:{DISTINCT}@127.0.0.1:{port}/app")
        assert DISTINCT not in out and code != 2, out
        code, out = _doctor("--json", "--dsn", f"mysql://app:{DISTINCT}@127.0.0.1:{port}/app")
        assert DISTINCT not in out, out


def test_access_denied_never_shows_the_password(mariadb: MariaDB) -> None:
    pool = connguard.Pool(**mariadb.connect_kwargs(password=DISTINCT), max_size=1)
    try:
        with pytest.raises(connguard.AccessDenied) as info:
            pool.connect()
        assert DISTINCT not in _printed(info.value) and DISTINCT not in repr(info.value)
    finally:
        pool.close()


def test_an_unparsable_coordinator_url_never_quotes_the_password() -> None:
    optional("redis")
    with pytest.raises(ValueError) as info:  # a "/" in the password, not percent-encoded
        connguard.Pool(host="127.0.0.1", port=1, user="u", password="p",
                       coordinator="redis://:Zq9x/Secret@127.0.0.1:1/0", global_max=3)
    assert "Zq9x" not in str(info.value) and "Secret" not in str(info.value)
    assert "percent-encode" in str(info.value)


def test_a_handshake_cut_by_the_callers_timeout_says_so(closed_port: int) -> None:
    from connguard.connector import Connector

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts, never greets
    try:
        connector = Connector({"host": "127.0.0.1", "port": listener.getsockname()[1],
                               "user": "u", "password": DISTINCT, "connect_timeout": 10})
        with pytest.raises(connguard.errors.HandshakeLost) as info:
            connector.open(time.monotonic() + 0.3)
        assert "of the caller's wait left" in str(info.value).split("\n")[0]
        assert DISTINCT not in _printed(info.value)
    finally:
        listener.close()


@pytest.mark.parametrize("text", ["a_" * 10_000, "://a:" * 10_000, "://" * 10_000 + "@",
                                  "password=" * 10_000, "'password': '" * 5_000,
                                  "x://u:" + "@" * 20_000])
def test_redaction_of_hostile_text_is_linear(text: str) -> None:
    """Error texts quote what the server or the user gave (identifiers, URLs): masking them
    must cost a bounded multiple of a linear scan, never rescan per position."""
    from tests.test_statements import RATIO, _best_of, _linear_scan

    taken = _best_of(redact, text)
    assert taken <= RATIO * _best_of(_linear_scan, text) + 0.001, f"{taken * 1e3:.1f} ms"


@pytest.mark.parametrize(("text", "masked"), [
    ("mysql://u:s3cret-pw@/db", "mysql://u:***@/db"),
    ("mysql+pymysql://u:s3cret-pw@/app?unix_socket=/run/m.sock", "mysql+pymysql://u:***@/app?unix_socket=/run/m.sock"),
    ("mysql://user@corp:s3cret-pw@host/db", "mysql://user@corp:***@host/db"),
    ("mysql://app@db.example:3306/app", "mysql://app@db.example:3306/app"),
])
def test_url_passwords_are_masked_in_every_url_shape(text: str, masked: str) -> None:
    assert redact(text) == masked
