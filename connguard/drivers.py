"""Which DBAPI driver a :class:`~connguard.Pool` speaks, by name (``driver=``).

Each driver has one seam module of the same shape (``connguard.driver`` for PyMySQL,
``connguard.mysqldb`` for mysqlclient): how to open a connection, what its borrower may have
left in the session and how to undo it, which socket to poll, how to drop it, which errors
it raises, and the handle class callers hold. The pool only ever calls the seam. A seam is
imported on first use, so a driver that is not used is never imported.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Dict, Iterator

#: ``driver=`` value -> the module that is the seam to that driver.
SEAMS: Dict[str, str] = {"pymysql": "connguard.driver", "mysqldb": "connguard.mysqldb"}
#: How to install an optional driver module.
INSTALL = {"MySQLdb": "pip install 'connguard[mysqlclient]' (mysqlclient)"}


@contextlib.contextmanager
def explained_import(what: str) -> Iterator[None]:
    """Around an import for ``what``: a missing optional driver module says what to
    install instead of a bare "No module named ..."."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name not in INSTALL:
            raise
        raise ModuleNotFoundError(f"{what} needs the {exc.name} module, which is not "
                                  f"installed: {INSTALL[exc.name]}", name=exc.name) from None


def seam(name: Any) -> Any:
    """The seam module for ``driver=name``; ValueError naming the allowed values."""
    module = SEAMS.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"driver must be one of {', '.join(map(repr, sorted(SEAMS)))}, "
                         f"got {name!r}")
    with explained_import(f"driver={name!r}"):
        return importlib.import_module(module)
