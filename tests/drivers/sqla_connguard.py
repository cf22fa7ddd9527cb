"""pytest plugin: every MySQL engine SQLAlchemy's own test suite creates gets connguard.

    pytest -p tests.drivers.sqla_connguard ...      (with the connguard checkout on PYTHONPATH)

The ``--dburi`` URL stays as it is (SQLAlchemy's harness hands its query to
``pymysql.connect``); instead ``create_engine`` is wrapped so that an engine whose URL names
the ``mysql`` or ``mariadb`` backend gets ``plugins=["connguard"]`` (appended to any plugins
the caller passes). The wrapper replaces the original everywhere it is bound: in
``sqlalchemy``, ``sqlalchemy.engine``, ``sqlalchemy.engine.create`` and every module already
imported that holds it under any name (``sqlalchemy.testing.requirements``,
``sqlalchemy.ext.asyncio.engine``). Test modules import ``create_engine`` at collection, after
this runs, so they get the wrapper.

Counts (``requested``: engines the plugin was added to; ``guarded``: of those, engines that
connguard's ``stats()`` recognises; ``failed``: create_engine calls that raised; ``rebound``:
module attributes that held the original ``create_engine``) are printed at
the end of the session and written as JSON to ``$SQLA_CONNGUARD_REPORT`` when set.
``$SQLA_CONNGUARD_OPTIONS`` (a JSON object, e.g. ``{"connguard_max_connect_rate": 1000}``)
adds plugin options to every engine, for diagnostic runs that switch one feature off.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

import pytest

PLUGIN = "connguard"
BACKENDS = ("mysql", "mariadb")
REPORT_ENV = "SQLA_CONNGUARD_REPORT"
OPTIONS_ENV = "SQLA_CONNGUARD_OPTIONS"  # JSON object of connguard_* create_engine kwargs

COUNTS: Dict[str, int] = {"requested": 0, "guarded": 0, "failed": 0, "rebound": 0}
# (original create_engine, its wrapper), set by the first install().
_WRAPPED: List[Tuple[Callable[..., Any], Callable[..., Any]]] = []


def _is_mysql(url: Any) -> bool:
    from sqlalchemy.engine.url import make_url

    try:
        return make_url(url).get_backend_name() in BACKENDS
    except Exception:  # noqa: BLE001 - not a URL we understand: create_engine will say so
        return False


def _url_names_plugin(url: Any) -> bool:
    from sqlalchemy.engine.url import make_url

    plugins = make_url(url).query.get("plugin", ())
    return PLUGIN in ((plugins,) if isinstance(plugins, str) else plugins)


def extra_options() -> Dict[str, Any]:
    """Plugin options for every engine from ``$SQLA_CONNGUARD_OPTIONS`` (diagnostic runs)."""
    options = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object")
    return options


def _with_plugin(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    plugins: List[str] = list(kwargs.get("plugins") or [])
    if PLUGIN not in plugins:
        plugins.append(PLUGIN)
    return {**extra_options(), **kwargs, "plugins": plugins}


def _is_guarded(engine: Any) -> bool:
    from connguard.sqlalchemy_plugin import stats

    try:
        stats(engine)
    except ValueError:
        return False  # stats() says: not created with the plugin
    except Exception:  # noqa: BLE001 - the guard exists; its stats broke, not our concern
        return True
    return True


def _make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_engine(url: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_mysql(url) or _url_names_plugin(url):
            return original(url, *args, **kwargs)
        COUNTS["requested"] += 1
        try:
            engine = original(url, *args, **_with_plugin(kwargs))
        except BaseException:
            COUNTS["failed"] += 1
            raise
        sync_engine = getattr(engine, "sync_engine", engine)  # AsyncEngine
        COUNTS["guarded"] += _is_guarded(sync_engine)
        return engine

    return create_engine


def _rebind(original: Callable[..., Any], wrapper: Callable[..., Any]) -> int:
    """Put ``wrapper`` wherever an imported module holds ``original``; how many bindings."""
    count = 0
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                namespace[name] = wrapper
                count += 1
    return count


def install() -> None:
    """Wrap ``create_engine`` wherever it is bound (again: binds made since last time)."""
    import sqlalchemy
    import sqlalchemy.engine
    import sqlalchemy.engine.create

    if not _WRAPPED:
        original = sqlalchemy.engine.create.create_engine
        _WRAPPED.append((original, _make_wrapper(original)))
    original, wrapper = _WRAPPED[0]
    COUNTS["rebound"] += _rebind(original, wrapper)
    for module in (sqlalchemy, sqlalchemy.engine, sqlalchemy.engine.create):
        if module.create_engine is not wrapper:
            raise RuntimeError(f"could not wrap {module.__name__}.create_engine")


def summary() -> str:
    import sqlalchemy

    return (f"connguard plugin: {COUNTS['requested']} MySQL engines created with "
            f"plugins=['connguard'] (options {extra_options()}), {COUNTS['guarded']} guarded, "
            f"{COUNTS['failed']} create_engine calls raised; SQLAlchemy from "
            f"{sqlalchemy.__file__}")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # After test/conftest.py (which may put the sdist's lib/ first on sys.path) and before
    # pytest_sessionstart, where SQLAlchemy's harness creates the --dburi engine.
    install()


def pytest_collection_finish(session: pytest.Session) -> None:
    install()  # anything imported during collection that bound the original


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_sep("=", "connguard")
    terminalreporter.write_line(summary())


def pytest_unconfigure(config: pytest.Config) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(COUNTS, f)
