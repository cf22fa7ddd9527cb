"""Reading statements (connguard.statements and its callers): what they answer, against a plain
reference implementation on statements built from a grammar, and what they cost on hostile
input, against a linear scan of the same input (pure logic, no server)."""

from __future__ import annotations

import re
import time
from typing import Any, Callable, List, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connguard import statements
from connguard.session import may_change_session
from connguard.statements import SCAN_LIMIT, changes_session_anywhere, keyword_start
from tests.optional import optional

try:
    from connguard.mysqldb import _opens_transaction
except ImportError:  # mysqlclient not installed: its tracker is not there to test
    _opens_transaction = None

WS = " \t\n\r\f\v"

# -- the reference: a plain reading of the server's rules ------------------------------------
# (what the server reads; the classifier may say "changes" more often, never less)
CONTROL = "".join(map(chr, range(0x21))) + "\x7f"  # what may follow "--" in a comment
_GAP = (r"(?:\s|/\*(?![Mm]?!).*?\*/|#[^\n]*(?:\n|$)"
        r"|--[\x00-\x20\x7f][^\n]*(?:\n|$)|--$)+")  # between two words
_VERBS = re.compile(
    r"(?:SET|USE|LOCK|PREPARE|EXECUTE|DEALLOCATE|HANDLER|CALL|DO|XA|FLUSH|BACKUP|LOAD)\b"
    rf"|(?:BEGIN{_GAP}NOT{_GAP}ATOMIC|(?:CREATE|DROP){_GAP}(?:OR{_GAP}REPLACE{_GAP})?TEMPORARY)"
    r"(?![\w$])", re.IGNORECASE)
_BEGIN = re.compile(rf"(?:BEGIN\b|START{_GAP}TRANSACTION(?![\w$]))", re.IGNORECASE)
_ANYWHERE = re.compile(
    rf"GET_LOCK|:=|INTO(?:{_GAP})?@|LAST_INSERT_ID(?:{_GAP})?\((?:{_GAP})?[^)\s]|/\*M?!"
    r"|;\s*[^\s;]", re.IGNORECASE)


def reference_keyword_start(text: str) -> int:
    i, n = 0, len(text)
    while i < n:
        if text[i] in WS or text[i] == "(":
            i += 1
        elif text.startswith("/*", i) and not text.startswith(("!", "M!", "m!"), i + 2):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif text[i] == "#" or (text.startswith("--", i)
                                and (i + 2 == n or text[i + 2] in CONTROL)):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        else:
            break
    return i


def reference_changes(text: str) -> bool:
    if len(text) > SCAN_LIMIT:
        return True
    return (_VERBS.match(text[reference_keyword_start(text):]) is not None
            or _ANYWHERE.search(text) is not None)


def reference_opens_transaction(text: str) -> bool:
    if len(text) > SCAN_LIMIT:
        return True
    return _BEGIN.match(text[reference_keyword_start(text):]) is not None


# -- the grammar: leads, verbs, bodies, in any letter case -----------------------------------
LEADS = [" ", "\t", "\n", "\r\n", "\f", "\v", " " * 12, "\n" + " " * 12, "(", "((", "/* c */",
         "/**/", "/* * / */", "/*", "-- c\n", "--\n", "--\tx\n", "-- ", "# c\n", "#", "--x ",
         "/*!40101 ", "/*M!100000 ", "/*m!1 ", "*/", "-", "--\x01\n", "--\x7f", "--\x1f x\n"]
VERBS = ["SELECT", "SET", "USE", "BEGIN", "START TRANSACTION", "START \n TRANSACTION",
         "CREATE TEMPORARY TABLE", "CREATE OR REPLACE TEMPORARY TABLE", "DROP TEMPORARY",
         "CREATE TABLE", "BEGIN NOT ATOMIC", "LOCK TABLES", "DO", "CALL", "XA", "INSERT",
         "UPDATE", "DELETE", "SHOW", "COMMIT", "SETTINGS", "USER", "DOC", "BEGINS", "STARTED",
         "LOAD", "FLUSH", "HANDLER", "PREPARE", "EXECUTE", "WITH", "", "CREATE/**/TEMPORARY",
         "DROP -- x\nTEMPORARY", "CREATE OR/* */REPLACE TEMPORARY", "START/**/TRANSACTION",
         "START#\nTRANSACTION", "BEGIN/**/NOT ATOMIC", "CREATE/**/TEMPORARY_X", "START/**/"]
BODY = [" ", "t", "user_id", "GET_LOCK('a', 1)", "get_lock", "_lock", "get", "get_", ":=",
        ":", "=", "INTO @x", "into\n\t@x", "INTO", "@", "@@session.x", "o@", "into", "e@x.com",
        "LAST_INSERT_ID()", "last_insert_id( 5 )", "LAST_INSERT_ID ( )", "last_insert_id",
        "(", ")", ";", "; ", ";SELECT 1", ";;", "/*!", "/*M!", "/*m!", "!", "/*", "*/", "--",
        "'a;b'", "12:30:00", "_", "-- x\n", "\n", "\t", "  ", "INTO/**/@v", "INTO -- c\n@v",
        "INTO#c\n@v", "LAST_INSERT_ID/**/(9)", "last_insert_id(/**/)", "/**/", "#", "user@x"]


def _cased(draw: Any, word: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(ch.swapcase() if flip else ch for ch, flip in zip(word, flips))


@st.composite
def statement_texts(draw: Any) -> str:
    lead = "".join(draw(st.lists(st.sampled_from(LEADS), max_size=6)))
    verb = _cased(draw, draw(st.sampled_from(VERBS)))
    body = "".join(_cased(draw, piece)
                   for piece in draw(st.lists(st.sampled_from(BODY), max_size=8)))
    return lead + verb + draw(st.sampled_from(["", " ", "\n", "(", ";"])) + body


FAST = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(statement_texts())
def test_the_classifier_never_misses_what_the_reference_sees(text: str) -> None:
    """No false negative (a leak to the next borrower); str and the bytes types agree."""
    answer = may_change_session(text)
    if reference_changes(text):
        assert answer, text
    assert may_change_session(text.encode()) is answer, text
    assert may_change_session(bytearray(text.encode())) is answer, text
    assert may_change_session(memoryview(text.encode())) is answer, text


@FAST
@given(statement_texts())
def test_without_comments_the_classifier_is_exact(text: str) -> None:
    """Its conservative guesses are only where a comment may hide a construct."""
    if "/*" in text or "#" in text or "--" in text:
        return
    assert may_change_session(text) is reference_changes(text), text


@FAST
@given(statement_texts())
def test_the_lead_ends_where_the_reference_says(text: str) -> None:
    assert keyword_start(text) == reference_keyword_start(text), text
    assert keyword_start(text.encode()) == reference_keyword_start(text), text


def test_the_transaction_tracker_agrees_with_the_reference() -> None:
    optional("MySQLdb", "pip install 'connguard[mysqlclient]'")
    assert _opens_transaction is not None
    _tracker_agrees()


@FAST
@given(statement_texts())
def _tracker_agrees(text: str) -> None:
    assert _opens_transaction is not None
    expected = reference_opens_transaction(text)
    assert _opens_transaction(text) is expected, text
    assert _opens_transaction(text.encode()) is expected, text
    assert _opens_transaction(memoryview(text.encode())) is expected, text


@pytest.mark.parametrize(("text", "start"), [
    ("SELECT 1", 0), ("  SELECT", 2), ("\n\t SET", 3), ("((SELECT", 2), ("( ( SET", 4),
    ("/* a */ SET", 8), ("/*!40101 SET */", 0), ("/*M!1 SET */", 0), ("-- x\nSET", 5),
    ("--\nSET", 3), ("--x", 0), ("# x\r\n SET", 6), ("/* never closed", 15), ("", 0),
    ("-- no newline", 13), ("SELECT 1--1", 0), ("--\x01\nSET", 4), ("--\x7f\nSET", 4),
])
def test_where_the_first_keyword_starts(text: str, start: int) -> None:
    assert keyword_start(text) == start
    assert keyword_start(text.encode()) == start


def test_a_statement_over_the_scan_limit_is_not_read_and_counts_as_changing() -> None:
    body = "SELECT " + "1" * SCAN_LIMIT  # nothing in it changes a session, but it is long
    assert may_change_session(body) and may_change_session(body.encode())
    assert changes_session_anywhere(body)
    assert not may_change_session(body[:SCAN_LIMIT])


# -- cost: hostile inputs, each timed against a linear scan of the same input ----------------
def _linear_scan(text: Union[str, bytes]) -> None:
    """One Python-level look at each character a bounded reader may look at: the yardstick.
    (A classifier that backtracks or rescans is quadratic or worse: at 10k characters that
    is hundreds to millions of times this.)"""
    for _ in text[:2 * SCAN_LIMIT]:
        pass


def _best_of(function: Callable[[Any], Any], argument: Any, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        function(argument)
        best = min(best, time.perf_counter() - start)
    return best


N = 10_000
HOSTILE = {
    "spaces": " " * N + "SELECT 1", "tabs": "\t" * N + "SET @a = 1",
    "newlines": "\n" * N + "SELECT 1", "mixed whitespace": " \t\n\r" * (N // 4) + "SELECT 1",
    "comments": "/* c */" * N + "SELECT 1", "nested comment openers": "/*" * N + "*/" * N,
    "dash comments": "-- c\n" * N + "SELECT 1", "hash comments": "# c\n" * N + "SELECT 1",
    "parentheses": "(" * N + "SELECT 1", "parentheses and spaces": "( " * N + "SELECT 1",
    "unterminated comment": "/* " + "x" * N, "semicolons": "; " * N,
    "at signs": "@ " * N, "at signs after o": "o @" * N, "at signs on lines": "\n@" * N,
    "into without @": "INTO " * N, "bangs": "! " * N,
    "underscores": "_ " * N, "lock words": "_lock " * N, "colons": ": " * N,
    "16 MB body": "INSERT INTO t VALUES ('" + "a_b:c@d;" * (2 * 1024 * 1024) + "')",
    "16 MB lead": " " * (16 * 1024 * 1024) + "SELECT 1",
}
READERS = {"may_change_session": may_change_session, "keyword_start": keyword_start,
           "changes_session_anywhere": changes_session_anywhere}
if _opens_transaction is not None:
    READERS["opens_transaction"] = _opens_transaction
CASES: List[Any] = []
for name, text in HOSTILE.items():
    CASES.append(pytest.param(text, id=f"{name}-str"))
    CASES.append(pytest.param(text.encode(), id=f"{name}-bytes"))
CASES.append(pytest.param(b"\xff\xfe\x80 " * N + b"SELECT 1", id="invalid utf-8-bytes"))

#: A bounded reader does a few Python steps per comment, ";" or "@" at worst; 100x a bare
#: loop over the characters leaves room for a loaded machine and none for a rescan.
RATIO = 100


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("text", CASES)
def test_hostile_input_costs_a_bounded_multiple_of_a_linear_scan(reader: str, text: Any) -> None:
    read = READERS[reader]
    taken = _best_of(read, text)
    yardstick = _best_of(_linear_scan, text)
    assert taken <= RATIO * yardstick + 0.001, (
        f"{reader}: {taken * 1e3:.2f} ms against {yardstick * 1e3:.2f} ms for a linear scan")


def test_the_old_lead_pattern_would_have_failed_the_bound() -> None:
    """The yardstick catches what it is for: the backtracking lead this module replaced
    (a repeated group holding a quantified \\s+), on 18 spaces before a word it rejects."""
    old = re.compile(r"(?:\s+|/\*(?!M?!).*?\*/|(?:--\s|#)[^\n]*(?:\n|$)|\()*(?:SET)\b")
    text = " " * 18 + "SELECT 1"
    taken = _best_of(old.match, text, rounds=1)
    assert taken > RATIO * _best_of(_linear_scan, text) + 0.001


def test_the_scanner_needles_match_their_text_type() -> None:
    # bytes and str take the same code with needles of their own type (a str needle on
    # bytes would raise TypeError at the first find).
    for alphabet, kind in ((statements._TEXT, str), (statements._BYTES, bytes)):
        for field, value in alphabet._asdict().items():
            if isinstance(value, (str, bytes)):
                assert isinstance(value, kind), field
