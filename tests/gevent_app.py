"""A WSGI app for tests/test_gevent.py, served by ``gunicorn --preload -k gevent``.

``/connect`` queries through ``connguard.connect``, ``/plugin`` through a SQLAlchemy engine
with the connguard plugin, made at import (in the master, before the fork and the patch).
The server comes from ``CONNGUARD_TEST_URL``; ``CONNGUARD_TEST_ORDER=patch-first`` patches
before anything else is imported (as an app with ``patch_all()`` at its top would).
"""

from __future__ import annotations

import os

if os.environ.get("CONNGUARD_TEST_ORDER") == "patch-first":
    from gevent import monkey

    monkey.patch_all()

from typing import Any, Callable, Iterable, List  # noqa: E402
from urllib.parse import unquote, urlsplit  # noqa: E402

import sqlalchemy  # noqa: E402

import connguard  # noqa: E402

URL = os.environ["CONNGUARD_TEST_URL"]
_parts = urlsplit(URL)
CONNECT_KWARGS = dict(host=_parts.hostname, port=_parts.port,
                      user=unquote(_parts.username or ""),
                      password=unquote(_parts.password or ""),
                      database=_parts.path.lstrip("/"), connect_timeout=10)
connguard.configure(max_size=10, max_overflow=0, checkout_timeout=30)
engine = sqlalchemy.create_engine(URL, plugins=["connguard"], pool_size=10, max_overflow=0,
                                  pool_timeout=30)


def _via_connect() -> Any:
    conn = connguard.connect(**CONNECT_KWARGS)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _via_plugin() -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1").scalar()


ROUTES = {"/connect": _via_connect, "/plugin": _via_plugin}


def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such route\n"]
    try:
        body = f"{route()} {os.getpid()}\n".encode()
        status = "200 OK"
    except Exception as exc:  # noqa: BLE001 - the client counts it as a failed request
        body, status = f"{type(exc).__name__}: {exc}\n".encode(), "500 Internal Server Error"
    headers: List[tuple] = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [body]
