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

# GuardedConnection._cg_marks (both drivers' connections): what a borrower did that the
# reset on return must undo. Bit 1 and those from 16 up are each driver's own.
TAINTED = 2  # a statement may have changed session state (see may_change_session)
DB_CHANGED = 4  # select_db()
CHARSET_CHANGED = 8  # set_character_set()


# For the type checker the mixin is a driver connection (it calls super()'s methods).
_Connection: Any = object


class SessionMarks(_Connection):
    """``select_db()`` and ``set_character_set()`` that note what they change, for the
    return's reset: a mixin of both drivers' connection classes, ahead of the driver's own
    (``_cg_marks`` is set by the connection class)."""

    _cg_marks: int

    def select_db(self, db: Any) -> None:
        self._cg_marks |= DB_CHANGED
        super().select_db(db)

    def set_character_set(self, charset: str, collation: Optional[str] = None) -> None:
        self._cg_marks |= CHARSET_CHANGED
        super().set_character_set(charset, collation)

# Statements whose first keyword says they change session state. ``SET`` covers session and
# user variables, ``SET NAMES``, ``SET TRANSACTION`` and MariaDB's ``SET STATEMENT``.
_VERBS = (r"SET|USE|LOCK|PREPARE|EXECUTE|DEALLOCATE|HANDLER|CALL|DO|XA|FLUSH|BACKUP|LOAD"
          r"|BEGIN\s+NOT\s+ATOMIC|(?:CREATE|DROP)\s+(?:OR\s+REPLACE\s+)?TEMPORARY")
# Leading whitespace, comments and parentheses before the first keyword. Executable comments
# (``/*!40101 SET NAMES utf8 */``, MariaDB's ``/*M!...``) are not comments to the server:
# they are caught by the anywhere-pattern below.
_LEAD = r"(?:\s+|/\*(?!M?!).*?\*/|(?:--\s|#)[^\n]*(?:\n|$)|\()*"
# Anywhere in a statement: named locks, user-variable assignment (``:=``, ``INTO @v``),
# LAST_INSERT_ID(expr), which sets the session's value, executable comments, and a second
# statement after a ";" (multi-statements: it is not judged by its first word). Each has a
# "_", ":", "@", "!" or ";": a statement with none of them is not searched at all.
_ANYWHERE = r"GET_LOCK|:=|INTO\s*@|LAST_INSERT_ID\s*\(\s*[^)\s]|/\*M?!|;\s*[^\s;]"
_FLAGS = re.IGNORECASE | re.DOTALL

VERB_TEXT = re.compile(f"{_LEAD}(?:{_VERBS})\\b", _FLAGS)
VERB_BYTES = re.compile(f"{_LEAD}(?:{_VERBS})\\b".encode(), _FLAGS)
ANYWHERE_TEXT = re.compile(_ANYWHERE, _FLAGS)
ANYWHERE_BYTES = re.compile(_ANYWHERE.encode(), _FLAGS)


# The first four letters of the statements most programs send, none a session verb: for
# these the verb pattern (half a microsecond) is not run, only the cheap checks below.
_PLAIN_HEADS = frozenset({"SELE", "INSE", "UPDA", "DELE", "REPL", "WITH", "SHOW", "DESC",
                          "EXPL", "COMM", "ROLL", "ALTE", "TRUN"})


def may_change_session(sql: Union[str, bytes]) -> bool:
    """Whether ``sql`` may change session state the pool cannot track (see module doc)."""
    if isinstance(sql, str):
        return (sql[:4].upper() not in _PLAIN_HEADS and VERB_TEXT.match(sql) is not None) or (
            ("_" in sql or ":" in sql or "@" in sql or "!" in sql or ";" in sql)
            and ANYWHERE_TEXT.search(sql) is not None)
    return VERB_BYTES.match(sql) is not None or (
        (b"_" in sql or b":" in sql or b"@" in sql or b"!" in sql or b";" in sql)
        and ANYWHERE_BYTES.search(sql) is not None)


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
