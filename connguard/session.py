"""What one borrower can leave behind in a session, and what the pool must undo.

A pooled connection outlives its borrower, so anything the borrower changed in the server
session would reach the next one. Two kinds of state, two remedies:

* what the pool can track exactly (an open transaction, autocommit, the database chosen with
  ``select_db()``, the character set chosen with ``set_character_set()``) is undone with the
  one statement that undoes it, or with nothing when nothing changed;
* anything a statement may have changed that the pool cannot see (``SET`` of a session
  variable or a user variable, ``USE``, ``GET_LOCK()``, temporary tables, prepared
  statements, ``LOCK TABLES``, ``HANDLER``, stored procedures) is undone by resetting the
  session (COM_RESET_CONNECTION) and applying again what the connect arguments set.

:func:`may_change_session` is the classifier: a pure function over the statement text,
conservative on purpose (a false positive costs one reset; a false negative leaks state).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

# Statements whose first keyword says they change session state. ``SET`` covers session and
# user variables, ``SET NAMES``, ``SET TRANSACTION`` and MariaDB's ``SET STATEMENT``.
_VERBS = r"SET|USE|LOCK|PREPARE|EXECUTE|DEALLOCATE|HANDLER|CALL|DO|XA"
# Leading whitespace, comments and parentheses before the first keyword.
_LEAD = r"(?:\s+|/\*.*?\*/|(?:--\s|#)[^\n]*(?:\n|$)|\()*"
# Anywhere in a statement: named locks, user-variable assignment (``:=``, ``INTO @v``),
# temporary tables, and LAST_INSERT_ID(expr), which sets the session's value.
_ANYWHERE = r"GET_LOCK|:=|TEMPORARY|INTO\s*@|LAST_INSERT_ID\s*\(\s*[^)\s]"

_PATTERN = f"^{_LEAD}(?:{_VERBS})\\b|{_ANYWHERE}"
_TEXT = re.compile(_PATTERN, re.IGNORECASE | re.DOTALL)
_BYTES = re.compile(_PATTERN.encode(), re.IGNORECASE | re.DOTALL)


def may_change_session(sql: Union[str, bytes]) -> bool:
    """Whether ``sql`` may change session state the pool cannot track (see module doc)."""
    pattern: Any = _TEXT if isinstance(sql, str) else _BYTES
    return pattern.search(sql) is not None


@dataclasses.dataclass(frozen=True)
class ConnectSettings:
    """What the connect arguments established in a fresh session, to apply again after a
    session reset (the same steps, in the same order, as PyMySQL's ``connect()``)."""

    database: Optional[str]
    charset: str
    collation: Optional[str]
    sql_mode: Optional[str]
    init_command: Optional[str]
    autocommit: Optional[bool]

    @classmethod
    def of(cls, conn: Any) -> ConnectSettings:
        """The settings of a connection that has just connected."""
        database = conn.db
        if isinstance(database, bytes):
            database = database.decode(conn.encoding or "utf-8")
        return cls(database=database or None, charset=conn.charset, collation=conn.collation,
                   sql_mode=conn.sql_mode, init_command=conn.init_command,
                   autocommit=conn.autocommit_mode)
