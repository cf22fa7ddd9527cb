"""Reading a statement's text, in time linear in the statement and without copying it.

Every statement a borrower sends passes through here on its way to the server (both
drivers), so this module's cost is paid per ``execute``. Two questions are asked:

* which keyword the statement starts with, after the whitespace, comments and opening
  parentheses that may lead it (:func:`keyword_start`, :func:`starts_with`): indented
  triple-quoted SQL leads with dozens of spaces and newlines, generated SQL with comments;
* whether it holds, anywhere, a construct that changes the session without a leading verb
  (:func:`changes_session_anywhere`): ``GET_LOCK()``, ``:=``, ``INTO @v``,
  ``LAST_INSERT_ID(expr)``, executable comments, a second statement after ``;``.

Why no single regular expression: a lead written as ``(?:\\s+|/\\*.*?\\*/|...)*`` followed by
the verb backtracks exponentially when the verb is not there (each run of n spaces can be
split 2^n ways: 23 spaces cost 1.4 s). Here whitespace is skipped by ``str.lstrip`` /
``bytes.lstrip`` on a bounded, growing window (C speed, never the whole statement),
comments by ``find`` of their end, and each construct is found by a ``find``/``in`` of a
character it must contain (memchr speed) before anything looks at its neighbours. Each
character is looked at a bounded number of times, whatever the input.

``str`` and ``bytes``/``bytearray`` (mysqlclient sends bytes) take the same paths with
needles of their own type; bytes are never decoded, so invalid UTF-8 costs nothing extra.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Pattern, Union

Statement = Union[str, bytes, bytearray]

#: Statements longer than this are not read: every caller takes the conservative answer
#: ("may change the session", "may open a transaction"), which costs one reset or rollback on
#: return, a round trip, less than reading 64 KB would (~0.1-0.5 ms) and far less than
#: sending it. So the work per statement is bounded, and a 16 MB INSERT costs what it costs
#: without connguard (plus that round trip at return).
SCAN_LIMIT = 65536

# The window that lstrip looks at first; it doubles while it holds only whitespace, so a
# lead of n characters costs at most 2n copied characters and a statement with none costs
# one copy of this many.
_FIRST_WINDOW = 128


_WS = r"[ \t\n\r\f\v]"  # MySQL's whitespace (ASCII only)
# GET_LOCK and LAST_INSERT_ID(expr) (not "()": that reads the value, it does not set it;
# a comment before or inside the parentheses counts as an argument).
# Letters spelt as classes and the name checked by a lookbehind after the "_", so that the
# pattern starts with a literal "_", which the regex engine scans for at C speed (with
# IGNORECASE, or a class first, it tries every position: ~30x slower on a 64 KB INSERT).
_NAMED_FUNCTIONS = (r"_(?:(?<=[Gg][Ee][Tt]_)[Ll][Oo][Cc][Kk]"
                    rf"|(?<=[Ll][Aa][Ss][Tt]_)[Ii][Nn][Ss][Ee][Rr][Tt]_[Ii][Dd]{_WS}*"
                    # an argument, or a comment where one may hide: conservative
                    rf"(?:\({_WS}*[^){_WS[1:-1]}]|/\*|#|--))")


# The "@"s INTO may stand before: right after an "o" or a "/" (a comment's end), or one
# blank after one, or after two blanks or a newline (a longer gap, or a line that may end in
# a comment: read in Python). Fixed-width lookbehinds after a literal "@": a C-speed scan
# that drops "@ @ @ ..." and e-mail addresses without a Python step each.
_AT_CANDIDATE = (rf"@(?:(?<=[Oo/]@)|(?<=[Oo/]{_WS}@)|(?<={_WS}{_WS}@)|(?<=\n@))")


class _Alphabet(NamedTuple):
    """The needles of one text type (str or bytes): the same code, no per-call encoding."""

    comment_open: Any  # "/*"
    comment_close: Any  # "*/"
    executable: tuple  # what follows "/*" in an executable comment: "!", "M!", "m!"
    dash_comment: Any  # "--"
    hash_comment: Any  # "#"
    newline: Any
    paren: Any  # "("
    lead_marks: Any  # the first characters of what may lead a keyword, whitespace aside
    word_marks: Any  # what continues an identifier beside letters and digits: "_", "$"
    semicolon: Any
    at: Any  # "@" (INTO @v)
    bang: Any  # "!"
    colon: Any  # ":" (:=)
    assign: Any  # ":="
    underscore: Any  # "_" (GET_LOCK, LAST_INSERT_ID)
    into: Any  # "into" (lower case: compared with a lowered 4-character slice)
    space: Any  # " ": "--" and a character up to this one (or DEL) start a comment
    delete: Any  # "\x7f"
    blank_or_paren: Any  # what a run of opening parentheses and whitespace is made of
    blank_or_semicolon: Any  # what may follow a statement's ";" without a second statement
    executable_comment: Pattern[Any]  # /*! or /*M! (a literal "/*" first: a fast scan)
    named_functions: Pattern[Any]
    at_after_o_or_blank: Pattern[Any]


def _alphabet(encode: Any) -> _Alphabet:
    return _Alphabet(
        comment_open=encode("/*"), comment_close=encode("*/"),
        executable=(encode("!"), encode("M!"), encode("m!")), dash_comment=encode("--"),
        hash_comment=encode("#"), newline=encode("\n"), paren=encode("("),
        lead_marks=encode("(/-#"), word_marks=encode("_$"),
        semicolon=encode(";"), bang=encode("!"), at=encode("@"), colon=encode(":"),
        assign=encode(":="), underscore=encode("_"), into=encode("into"),
        space=encode(" "), delete=encode("\x7f"), blank_or_paren=encode(" \t\n\r\f\v("),
        blank_or_semicolon=encode(" \t\n\r\f\v;"),
        executable_comment=re.compile(encode(r"/\*[Mm]?!")),
        named_functions=re.compile(encode(_NAMED_FUNCTIONS)),
        at_after_o_or_blank=re.compile(encode(_AT_CANDIDATE)))


_TEXT = _alphabet(lambda text: text)
_BYTES = _alphabet(lambda text: text.encode("ascii"))


def _of(sql: Any) -> _Alphabet:
    return _TEXT if isinstance(sql, str) else _BYTES


def skip_blanks(sql: Statement, pos: int = 0, also: Any = None) -> int:
    """The index of the first character at or after ``pos`` that is not whitespace (nor one
    of ``also``'s characters)."""
    window = _FIRST_WINDOW
    while pos < len(sql):
        chunk = sql[pos:pos + window]
        # lstrip() with no argument is the fast one (whitespace only): ~0.5 ns a character.
        rest = chunk.lstrip() if also is None else chunk.lstrip(also)
        pos += len(chunk) - len(rest)
        if rest:
            return pos
        window *= 2
    return len(sql)


def skip_blanks_back(sql: Statement, end: int) -> int:
    """The index just after the last character before ``end`` that is not whitespace
    (0 when there is none): :func:`skip_blanks` backwards."""
    window = _FIRST_WINDOW
    while end > 0:
        chunk = sql[max(0, end - window):end]
        rest = chunk.rstrip()
        end -= len(chunk) - len(rest)
        if rest:
            return end
        window *= 2
    return 0


def keyword_start(sql: Statement, pos: int = 0) -> int:
    """Where the statement's first keyword starts: after whitespace, comments (``/* */``,
    ``-- ``, ``#``) and opening parentheses; ``len(sql)`` when nothing follows them.

    Executable comments (``/*!40101 ...*/``, MariaDB's ``/*M!...*/``) are not comments to
    the server: the lead stops at them (:func:`changes_session_anywhere` sees them). An
    unterminated comment runs to the end, as the server reads it."""
    a = _of(sql)
    while True:
        head = sql[pos:pos + 1]
        if head.isspace():
            pos = skip_blanks(sql, pos)
            head = sql[pos:pos + 1]
        if not head or head not in a.lead_marks:  # a letter: the common case, at once
            return pos
        if head == a.paren:
            pos = skip_blanks(sql, pos, a.blank_or_paren)
        elif sql.startswith(a.comment_open, pos) and not _executable_at(sql, pos + 2, a):
            end = sql.find(a.comment_close, pos + 2)
            pos = len(sql) if end < 0 else end + 2
        elif head == a.hash_comment or _dash_comment_at(sql, pos, a):
            end = sql.find(a.newline, pos)
            pos = len(sql) if end < 0 else end + 1
        else:
            return pos


def _executable_at(sql: Statement, pos: int, a: _Alphabet) -> bool:
    """After "/*": "!" or "M!" makes the comment a statement's text."""
    return sql.startswith(a.executable, pos)


def _dash_comment_at(sql: Statement, pos: int, a: _Alphabet) -> bool:
    """"--" starts a comment only when a space or a control character (or the end) follows
    it (MySQL's rule: ``SELECT 1--1`` is arithmetic; ``--\\x01`` is a comment)."""
    if not sql.startswith(a.dash_comment, pos):
        return False
    follower = sql[pos + 2:pos + 3]
    return not follower or follower <= a.space or follower == a.delete


def starts_with(sql: Statement, keywords: Pattern[Any], phrases: Any = (),
                plain: Any = ()) -> bool:
    """Whether the statement's first keyword is one of ``keywords`` (a compiled pattern of the
    text's type, tried by ``match`` at that one position) or starts one of ``phrases`` (tuples
    of upper-case words of the text's type, such as ``("START", "TRANSACTION")``, which the
    server reads with whitespace or comments between the words); True, without reading, for
    a statement over :data:`SCAN_LIMIT`. ``plain``: upper-case first four letters (str) of
    statements known to match neither, answered at once (SELECT after indentation)."""
    if len(sql) > SCAN_LIMIT:
        return True
    pos = keyword_start(sql)
    if plain and sql[pos:pos + 4].upper() in plain:
        return False
    return keywords.match(sql, pos) is not None or any(
        _phrase_at(sql, pos, phrase) for phrase in phrases)


def _phrase_at(sql: Statement, pos: int, words: Any) -> bool:
    for i, word in enumerate(words):
        if i:
            pos = keyword_start(sql, pos)
        end = pos + len(word)
        if sql[pos:end].upper() != word or _word_goes_on(sql, end):
            return False
        pos = end
    return True


def _word_goes_on(sql: Statement, end: int) -> bool:
    """Whether the character at ``end`` continues an identifier (so the word before it is
    not a keyword of its own)."""
    follower = sql[end:end + 1]
    return bool(follower) and (follower.isalnum() or follower in _of(sql).word_marks)


def changes_session_anywhere(sql: Statement) -> bool:
    """Whether the statement holds, anywhere, a construct that changes session state:
    ``GET_LOCK(``, ``:=``, ``INTO @v``, ``LAST_INSERT_ID(expr)``, an executable comment, or a
    second statement after a ``;``. Conservative: a match inside a string literal counts
    (a false positive costs one reset on return; a false negative leaks state), and so does
    a statement over :data:`SCAN_LIMIT`, unread."""
    if len(sql) > SCAN_LIMIT:
        return True
    a = _of(sql)
    return (_second_statement(sql, a) or _executable_comment(sql, a)
            or (a.colon in sql and a.assign in sql) or _into_variable(sql, a)
            or _named_function(sql, a))


def _second_statement(sql: Statement, a: _Alphabet) -> bool:
    """Anything but whitespace and more ";" after a ";". A run of both is skipped in one
    step, so ``"; ; ; ..."`` costs one pass."""
    i = sql.find(a.semicolon)
    return i >= 0 and skip_blanks(sql, i, a.blank_or_semicolon) < len(sql)


def _executable_comment(sql: Statement, a: _Alphabet) -> bool:
    return a.bang in sql and a.executable_comment.search(sql) is not None


#: How many "@"s after an "o" or a blank are read in Python before the answer is "may
#: change" unread: bounds a statement's Python steps (real SQL has a handful at most).
_CANDIDATES_READ = 64


def _into_variable(sql: Statement, a: _Alphabet) -> bool:
    """INTO right before an "@", with whitespace or comments between. The regex engine keeps
    only the "@"s INTO may stand before (_AT_CANDIDATE), at C speed. Conservative where a
    comment may hide the INTO: after "*/", or after a line holding "#" or "--"."""
    if a.at not in sql:
        return False
    for read, match in enumerate(a.at_after_o_or_blank.finditer(sql)):
        if read == _CANDIDATES_READ:  # a statement full of them: a reset costs less
            return True
        at = match.start()
        # the gap is mostly empty or one blank: no window copied for those
        end = at if not sql[at - 1:at].isspace() else (
            at - 1 if at < 2 or not sql[at - 2:at - 1].isspace() else skip_blanks_back(sql, at))
        if end >= 4 and sql[end - 4:end].lower() == a.into:
            return True
        if end >= 2 and sql.startswith(a.comment_close, end - 2):
            return True
        newline = sql.rfind(a.newline, end, at)
        if newline >= 0:  # the "@" starts a line: the line before may end in a comment
            line = sql[sql.rfind(a.newline, 0, end) + 1:end]
            if a.hash_comment in line or a.dash_comment in line:
                return True
    return False


def _named_function(sql: Statement, a: _Alphabet) -> bool:
    return a.underscore in sql and a.named_functions.search(sql) is not None
