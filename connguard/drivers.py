"""Which DBAPI driver a :class:`~connguard.Pool` speaks, by name (``driver=``).

Each driver has one seam module of the same shape (``connguard.driver`` for PyMySQL,
``connguard.mysqldb`` for mysqlclient): how to open a connection, what its borrower may have
left in the session and how to undo it, which socket to poll, how to drop it, which errors
it raises, and the handle class callers hold. The pool only ever calls the seam. A seam is
imported on first use, so a driver that is not used is never imported.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

#: ``driver=`` value -> the module that is the seam to that driver.
SEAMS: Dict[str, str] = {"pymysql": "connguard.driver", "mysqldb": "connguard.mysqldb"}
#: ``driver=`` value -> the driver's own module, when that is an extra to install.
NEEDS = {"mysqldb": "MySQLdb"}
#: How to install an optional driver module.
INSTALL = {"MySQLdb": "pip install 'connguard[mysqlclient]' (mysqlclient)"}


def not_installed(what: str, module: str) -> ModuleNotFoundError:
    """The error for ``what`` when the driver ``module`` is missing: what to install."""
    return ModuleNotFoundError(f"{what} needs the {module} module, which is not installed: "
                               f"{INSTALL[module]}", name=module)


def seam(name: Any) -> Any:
    """The seam module for ``driver=name``; ValueError naming the allowed values."""
    module = SEAMS.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"driver must be one of {', '.join(map(repr, sorted(SEAMS)))}, "
                         f"got {name!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        needed = NEEDS.get(name)
        if needed is None or exc.name != needed:
            raise
        raise not_installed(f"driver={name!r}", needed) from None
