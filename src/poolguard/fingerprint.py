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
# pass finds both, so that '--' inside a string or a quote inside a comment is
# read for what it is. Whether a backslash escapes the next character depends
# on the database (MySQL: always; PostgreSQL and standard SQL: only in E'...'),
# so there is one lexer for each reading, and whatever either takes for a
# literal or a comment goes (see _strip): no reading can leave a literal behind.
_COMMENT = r"(--[^\n]*|/\*.*?\*/)"
_ESCAPED = r"'(?:[^'\\]|\\.|'')*'"
_DOLLAR = r"\$(\w*)\$.*?\$\2\$"
_LEXERS = (
    re.compile(rf"{_COMMENT}|(?:\b[eEnNxXbB])?{_ESCAPED}|{_DOLLAR}", re.S),
    re.compile(rf"{_COMMENT}|\b[eE]{_ESCAPED}|(?:\b[nNxXbB])?'(?:[^']|'')*'|{_DOLLAR}", re.S),
)
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


def _strip(text: str) -> str:
    """``text`` with strings replaced by ``?`` and comments by a space (both readings)."""
    spans = sorted(
        (m.start(), m.end(), m.group(1) is None) for lexer in _LEXERS for m in lexer.finditer(text)
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


def normalize(statement: str) -> str:
    """The statement with literals, parameters and list lengths replaced by ``?``."""
    text = _strip(statement)
    text = _NUMBER.sub("?", text)
    text = _PARAM.sub("?", text)
    text = _LIST.sub(r"\1 (?...)", text)
    text = _ROWS.sub(r"\1", text)
    return _SPACE.sub(" ", text).strip()


_cache: dict[str, Fingerprint] = {}
_cache_lock = threading.Lock()


def fingerprint(statement: str) -> Fingerprint:
    """The :class:`Fingerprint` of ``statement`` (cached)."""
    found = _cache.get(statement)
    if found is not None:
        return found
    text = normalize(statement)
    op = _OPERATION.match(text)
    coll = _COLLECTION.search(text)
    result = Fingerprint(
        id=hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
        text=text[:300],
        operation=op.group(1).upper() if op else "",
        collection=re.sub(r'["`\[\]]', "", coll.group(1)) if coll else "",
    )
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            # Unbounded distinct statements (literals inlined by the app):
            # start over rather than grow without limit.
            _cache.clear()
        _cache[statement] = result
    return result
