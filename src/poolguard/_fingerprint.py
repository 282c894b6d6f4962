"""Statement fingerprints: one stable key per query shape.

Literals, bound parameters of every DBAPI style and expanded ``IN`` lists are
replaced by ``?``, comments are dropped and white space is folded, so that
``WHERE id IN (1, 2, 3)`` and ``WHERE id IN (:id_1)`` are the same shape.
The normalised text never contains a literal value, which is what makes it
safe to log. Results are cached per statement string: SQLAlchemy hands the
same compiled string to every execution of a statement, so after the first
call a fingerprint costs one dictionary lookup.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import NamedTuple

__all__ = ["Fingerprint", "fingerprint", "normalize"]

_CACHE_MAX = 4096

# Comments, and quoted strings: '...' with '' escapes, dollar-quoted
# $tag$...$tag$, and E'...'/N'...'/X'...'/B'...' prefixes. One left-to-right
# pass finds them all, so that '--' inside a string or a quote inside a comment
# is read for what it is. How to read the rest depends on the database:
#
# * whether a backslash escapes the next character (MySQL: unless
#   NO_BACKSLASH_ESCAPES; PostgreSQL and standard SQL: only in E'...');
# * whether "..." is an identifier (standard SQL, PostgreSQL) or a string
#   (MySQL/MariaDB unless ANSI_QUOTES; SQLite too when no column has the name);
# * whether # starts a comment (MySQL/MariaDB).
#
# So there is one lexer for each reading a database allows, and whatever any
# of them takes for a literal or a comment goes (see _strip): no reading can
# leave a literal behind. An identifier span ("..." or `...`) is only there
# so that quotes inside it do not start a string; it is kept as it is.
_COMMENT = r"(?P<c>--[^\n]*|/\*.*?\*/)"
_MY_COMMENT = r"(?P<c>--[^\n]*|\#[^\n]*|/\*.*?\*/)"
_ESCAPED = r"'(?:[^'\\]|\\.|'')*'"
_PLAIN = r"'(?:[^']|'')*'"
_DQ_ESCAPED = r'"(?:[^"\\]|\\.|"")*"'
_DQ_PLAIN = r'"(?:[^"]|"")*"'
_DOLLAR = r"\$(?P<d>\w*)\$.*?\$(?P=d)\$"
_BACKTICK = r"`(?:[^`]|``)*`"
_PREFIX = r"(?:\b[eEnNxXbB])?"
_STANDARD = (  # PostgreSQL, standard SQL: "..." is an identifier
    re.compile(rf"{_COMMENT}|(?P<k>{_DQ_PLAIN})|{_PREFIX}{_ESCAPED}|{_DOLLAR}", re.S),
    re.compile(
        rf"{_COMMENT}|(?P<k>{_DQ_PLAIN})|\b[eE]{_ESCAPED}|(?:\b[nNxXbB])?{_PLAIN}|{_DOLLAR}",
        re.S,
    ),
)
_MYSQL = (  # MySQL/MariaDB: "..." is a string, # a comment, `...` an identifier
    re.compile(rf"{_MY_COMMENT}|(?P<k>{_BACKTICK})|{_PREFIX}(?:{_ESCAPED}|{_DQ_ESCAPED})", re.S),
    re.compile(rf"{_MY_COMMENT}|(?P<k>{_BACKTICK})|{_PREFIX}(?:{_PLAIN}|{_DQ_PLAIN})", re.S),
)
# SQLite: "..." is a name, or a string when no column has that name. Right
# after FROM/JOIN/INTO/UPDATE/TABLE only a name can stand (SQLite has no
# TRIM(x FROM y) or EXTRACT(... FROM y); IS DISTINCT FROM is read first, so
# the value after it is not taken for a table): kept, so the shape still
# names its table.
_TABLE = rf"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+{_DQ_PLAIN}(?:\s*\.\s*{_DQ_PLAIN})?"
_SQLITE = (
    *_STANDARD,
    re.compile(
        rf"{_COMMENT}|(?P<k>{_BACKTICK}|\bDISTINCT\s+FROM\b|{_TABLE})|"
        rf"(?:\b[xX])?(?:{_PLAIN}|{_DQ_PLAIN})",
        re.S | re.I,
    ),
)
# A database poolguard does not know: every reading at once.
_ANY = (*_STANDARD, *_MYSQL)
_READINGS: dict[str, tuple[re.Pattern[str], ...]] = {
    "postgresql": _STANDARD,
    "oracle": _STANDARD,
    "oracle.db": _STANDARD,
    "mysql": _MYSQL,
    "mariadb": _MYSQL,
    "sqlite": _SQLITE,
}

_NUMBER = re.compile(
    r"(?<![\w$.?])[-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)\b"
)
# Parameter markers: %(name)s, %s, :name, $1, ? (after literals are gone).
_PARAM = re.compile(r"%\(\w+\)s|%s|(?<![:\w]):[A-Za-z_]\w*|\$\d+|\?")
_TUPLE = r"\(\s*\?(?:\s*,\s*\?)*\s*\)"
_LIST = re.compile(r"\b(IN|VALUES)\s*" + _TUPLE, re.I)
_ROWS = re.compile(r"(\bVALUES \(\?\.\.\.\))(?:\s*,\s*" + _TUPLE + ")+", re.I)
_SPACE = re.compile(r"\s+")
_OPERATION = re.compile(r"^\W*(\w+)")
_COLLECTION = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s+((?:[\"`\[]?[\w$]+[\"`\]]?\.)?[\"`\[]?[\w$]+[\"`\]]?)",
    re.I,
)


class Fingerprint(NamedTuple):
    """A statement's shape.

    Attributes:
        id: 16 hex digits, stable across processes and versions of poolguard
            that normalise alike.
        text: the normalised statement (no literal values), cut to 300 characters.
        operation: first keyword, upper case (``SELECT``), or ``""``.
        collection: first table named after FROM/INTO/UPDATE/JOIN, or ``""``.
    """

    id: str
    text: str
    operation: str
    collection: str

    @property
    def summary(self) -> str:
        """Low-cardinality name of the shape, e.g. ``SELECT users`` (``db.query.summary``)."""
        return f"{self.operation} {self.collection}".strip() or self.text[:40]


def _strip(text: str, lexers: tuple[re.Pattern[str], ...]) -> str:
    """``text`` with strings replaced by ``?`` and comments by a space (every reading)."""
    spans = sorted(
        (m.start(), m.end(), m.group("c") is None)
        for lexer in lexers for m in lexer.finditer(text) if m.group("k") is None
    )
    out: list[str] = []
    pos = i = 0
    while i < len(spans):
        start, end, literal = spans[i]
        i += 1
        while i < len(spans) and spans[i][0] < end:  # overlapping readings: take both
            end = max(end, spans[i][1])
            literal = literal or spans[i][2]
            i += 1
        out += (text[pos:start], "?" if literal else " ")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def normalize(statement: str, db_system: str | None = None) -> str:
    """The statement with literals, parameters and list lengths replaced by ``?``.

    ``db_system`` (``postgresql``, ``mysql``, ``mariadb``, ``sqlite``...) says how
    to read quotes and comments: on MySQL/MariaDB ``"..."`` is a string and
    ``#`` starts a comment, on PostgreSQL ``"..."`` is a name, on SQLite a
    string unless a table name must stand there. Without a system, or for one
    without a reading of its own, every reading applies, so whatever any of
    them takes for a literal is replaced.
    """
    text = _strip(statement, _READINGS.get(db_system or "", _ANY))
    text = _NUMBER.sub("?", text)
    text = _PARAM.sub("?", text)
    text = _LIST.sub(r"\1 (?...)", text)
    text = _ROWS.sub(r"\1", text)
    return _SPACE.sub(" ", text).strip()


# One cache per reading: the same text is a different shape on MySQL ("..." is
# a value) and on PostgreSQL ("..." is a name).
_caches: dict[str | None, dict[str, Fingerprint]] = {}
_cache_lock = threading.Lock()


def fingerprint(statement: str, db_system: str | None = None) -> Fingerprint:
    """The :class:`Fingerprint` of ``statement`` on ``db_system`` (cached: :func:`normalize`)."""
    try:
        return _caches[db_system][statement]
    except KeyError:
        pass
    text = normalize(statement, db_system)
    op = _OPERATION.match(text)
    coll = _COLLECTION.search(text)
    result = Fingerprint(
        id=hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
        text=text[:300],
        operation=op.group(1).upper() if op else "",
        collection=re.sub(r'["`\[\]]', "", coll.group(1)) if coll else "",
    )
    with _cache_lock:
        cache = _caches.setdefault(db_system, {})
        if len(cache) >= _CACHE_MAX:
            # Unbounded distinct statements (literals inlined by the app):
            # start over rather than grow without limit.
            cache.clear()
        cache[statement] = result
    return result
