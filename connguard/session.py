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

from connguard.statements import SCAN_LIMIT, changes_session_anywhere, starts_with

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
# user variables, ``SET NAMES``, ``SET TRANSACTION`` and MariaDB's ``SET STATEMENT``. Tried at
# one position only (the statement's first keyword, found by connguard.statements).
_VERBS = r"(?:SET|USE|LOCK|PREPARE|EXECUTE|DEALLOCATE|HANDLER|CALL|DO|XA|FLUSH|BACKUP|LOAD)\b"
VERB_TEXT = re.compile(_VERBS, re.IGNORECASE)
VERB_BYTES = re.compile(_VERBS.encode(), re.IGNORECASE)
# Verbs of several words: the server reads whitespace or comments between them.
_PHRASES = (("BEGIN", "NOT", "ATOMIC"), ("CREATE", "TEMPORARY"), ("DROP", "TEMPORARY"),
            ("CREATE", "OR", "REPLACE", "TEMPORARY"))
PHRASES_TEXT = _PHRASES
PHRASES_BYTES = tuple(tuple(word.encode() for word in phrase) for phrase in _PHRASES)

# The first four letters of the statements most programs send, none a session verb: for
# these the lead is not scanned nor the verb pattern run, only the cheap checks below.
_PLAIN_HEADS = frozenset({"SELE", "INSE", "UPDA", "DELE", "REPL", "WITH", "SHOW", "DESC",
                          "EXPL", "COMM", "ROLL", "ALTE", "TRUN"})


def may_change_session(sql: Union[str, bytes, bytearray, memoryview]) -> bool:
    """Whether ``sql`` may change session state the pool cannot track (see module doc).

    Linear in the statement, bounded (a statement over ``statements.SCAN_LIMIT`` is taken to
    change it, unread) and copy-free: each construct searched anywhere is looked for by a
    character it must hold ("_", ":", "@", "!", ";"), so a statement with none of them
    costs five memchr scans."""
    if (sql.nbytes if isinstance(sql, memoryview) else len(sql)) > SCAN_LIMIT:
        return True
    if isinstance(sql, str):
        if sql[:4].upper() not in _PLAIN_HEADS and starts_with(
                sql, VERB_TEXT, PHRASES_TEXT, _PLAIN_HEADS):
            return True
        return (("_" in sql or ":" in sql or "@" in sql or "!" in sql or ";" in sql)
                and changes_session_anywhere(sql))
    if isinstance(sql, memoryview):
        sql = sql.tobytes()
    return starts_with(sql, VERB_BYTES, PHRASES_BYTES) or (
        (b"_" in sql or b":" in sql or b"@" in sql or b"!" in sql or b";" in sql)
        and changes_session_anywhere(sql))


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
