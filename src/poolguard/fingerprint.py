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

_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
# Quoted strings: standard '...' with '' escapes (and backslash escapes, as
# MySQL allows), dollar-quoted $tag$...$tag$, and E'...'/N'...'/X'...' prefixes.
_STRING = re.compile(r"(?:\b[eEnNxXbB])?'(?:[^'\\]|\\.|'')*'|\$(\w*)\$.*?\$\1\$", re.S)
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


def normalize(statement: str) -> str:
    """The statement with literals, parameters and list lengths replaced by ``?``."""
    text = _COMMENT.sub(" ", statement)
    text = _STRING.sub("?", text)
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
        collection=coll.group(1).replace('"', "").replace("`", "").strip("[]") if coll else "",
    )
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            # Unbounded distinct statements (literals inlined by the app):
            # start over rather than grow without limit.
            _cache.clear()
        _cache[statement] = result
    return result
