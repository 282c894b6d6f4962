"""Statement fingerprints: ``poolguard._fingerprint.normalize`` and ``fingerprint``.

A fingerprint is the key of every per-statement stat and the statement text
that goes into logs, so two promises are tested here: statements of one shape
share one id (and different shapes do not), and the normalised text never
contains a literal value.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import poolguard._fingerprint as fpmod
from poolguard._fingerprint import fingerprint, normalize

# -- literals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM t WHERE a = ''", "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM t WHERE a = 'it''s'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM t WHERE a = ''''", "SELECT * FROM t WHERE a = ?"),
        ("SELECT 'a', 'b''c', 'd'", "SELECT ?, ?, ?"),
        ("SELECT * FROM t WHERE a = 'multi\nline'", "SELECT * FROM t WHERE a = ?"),
        # backslash escapes (MySQL/MariaDB, PostgreSQL E'...')
        ("SELECT * FROM t WHERE a = 'it\\'s'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT E'it\\'s', e'x'", "SELECT ?, ?"),
        ("SELECT N'unicode', X'ff', B'1010'", "SELECT ?, ?, ?"),
        # dollar quoting (PostgreSQL)
        ("SELECT $$it's here$$", "SELECT ?"),
        ("SELECT $body$ a 'b' $x$ c $body$ FROM t", "SELECT ? FROM t"),
    ],
)
def test_string_literals_become_placeholders(statement: str, expected: str) -> None:
    assert normalize(statement, "postgresql") == expected
    # Every reading at once may take more for a literal, never less.
    assert "'" not in normalize(statement)


@pytest.mark.parametrize(
    "literal",
    ["1", "42", "-7", "+7", "3.14", "-0.5", ".5", "10.0", "1e10", "1E-3", "2.5e+7", "-6.02E23",
     "0xFF", "0x1f"],
)
def test_numbers_become_placeholders(literal: str) -> None:
    assert normalize(f"SELECT * FROM t WHERE a = {literal}") == "SELECT * FROM t WHERE a = ?"
    assert normalize(f"SELECT {literal}, {literal}") == "SELECT ?, ?"


def test_arithmetic_keeps_its_operator() -> None:
    assert normalize("SELECT a-1, a - 1, a+2 FROM t") == "SELECT a-?, a - ?, a+? FROM t"
    assert normalize("UPDATE t SET n = n + 1 WHERE id = -5") == (
        "UPDATE t SET n = n + ? WHERE id = ?"
    )


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT a::text, x1, t2.col2 FROM t2 WHERE b::int4 = c",
        "SELECT col_1, \"Col2\", `c3` FROM tbl9 JOIN s1.t2 ON tbl9.k = t2.k",
        "SELECT md5(x) FROM t WHERE y IS NULL",
        "SELECT interval_2_days FROM t",
    ],
)
def test_identifiers_and_casts_are_untouched(statement: str) -> None:
    assert normalize(statement, "postgresql") == statement


def test_casts_after_a_literal_or_parameter_are_kept() -> None:
    assert normalize("SELECT 'x'::text, %(p)s::int4, 5::bigint") == (
        "SELECT ?::text, ?::int4, ?::bigint"
    )


# -- parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "marker", ["%(name)s", "%(user_id_1)s", "%s", ":name", ":user_id_1", "$1", "$12", "?"]
)
def test_every_parameter_style_becomes_a_placeholder(marker: str) -> None:
    assert normalize(f"SELECT * FROM t WHERE a = {marker}") == "SELECT * FROM t WHERE a = ?"


def test_all_parameter_styles_give_one_shape() -> None:
    shapes = {
        fingerprint(f"SELECT * FROM users WHERE id = {m} AND name = {n}")
        for m, n in [("%(id)s", "%(name)s"), ("%s", "%s"), (":id", ":name"), ("$1", "$2"),
                     ("?", "?"), ("42", "'bob'")]
    }
    assert len(shapes) == 1


# -- lists and rows --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257])
def test_in_lists_of_any_length_collapse(n: int) -> None:
    values = ", ".join(str(i) for i in range(n))
    markers = ", ".join(f"%(id_1_{i})s" for i in range(n))
    expected = "SELECT * FROM t WHERE id IN (?...)"
    assert normalize(f"SELECT * FROM t WHERE id IN ({values})") == expected
    assert normalize(f"SELECT * FROM t WHERE id IN ({markers})") == expected
    assert normalize(f"SELECT * FROM t WHERE id in ( {', '.join(['?'] * n)} )") == (
        "SELECT * FROM t WHERE id in (?...)"
    )


def test_in_list_of_strings_and_not_in() -> None:
    assert normalize("SELECT * FROM t WHERE c NOT IN ('a', 'b''c', 'd')") == (
        "SELECT * FROM t WHERE c NOT IN (?...)"
    )


def test_in_subquery_is_not_collapsed() -> None:
    stmt = "SELECT * FROM t WHERE a IN (SELECT b FROM u)"
    assert normalize(stmt) == stmt


@pytest.mark.parametrize("rows", [1, 2, 5, 100])
def test_multi_row_values_collapse(rows: int) -> None:
    literal_rows = ", ".join(f"({i}, 'v{i}')" for i in range(rows))
    param_rows = ", ".join(f"(%(a__{i})s, %(b__{i})s)" for i in range(rows))
    expected = "INSERT INTO t (a, b) VALUES (?...)"
    assert normalize(f"INSERT INTO t (a, b) VALUES {literal_rows}") == expected
    assert normalize(f"INSERT INTO t (a, b) VALUES {param_rows}") == expected
    ids = {
        fingerprint(f"INSERT INTO t (a, b) VALUES {literal_rows}").id,
        fingerprint(f"INSERT INTO t (a, b) VALUES {param_rows}").id,
        fingerprint("INSERT INTO t (a, b) VALUES (?, ?)").id,
    }
    assert len(ids) == 1


# -- comments and white space ---------------------------------------------------------


def test_comments_are_dropped_and_white_space_folded() -> None:
    stmt = (
        "/* app:orders */ SELECT  a,\n\t b   -- the b column\n"
        "FROM t /* multi\nline */ WHERE a = 1  -- trailing"
    )
    assert normalize(stmt) == "SELECT a, b FROM t WHERE a = ?"


def test_quotes_inside_comments_do_not_start_strings() -> None:
    stmt = "SELECT a -- it's the a column\nFROM t WHERE b = 'x'"
    assert normalize(stmt) == "SELECT a FROM t WHERE b = ?"
    assert normalize("SELECT /* don't */ a FROM t WHERE b = 2") == "SELECT a FROM t WHERE b = ?"


# -- no literal survives ------------------------------------------------------------------

_SECRET = "s3cr3t-v4lue"  # noqa: S105 - a marker, not a password


@pytest.mark.parametrize(
    "statement",
    [
        # comment markers inside a string must not hide the string's end
        f"SELECT * FROM t WHERE a = 'x--y'\nAND b = '{_SECRET}'",
        f"SELECT * FROM t WHERE a = '--'\nAND b = '{_SECRET}'",
        f"SELECT * FROM t WHERE a = '/*' AND b = '{_SECRET}' AND c = '*/'",
        # a string ending in a backslash (PostgreSQL standard_conforming_strings)
        f"SELECT * FROM t WHERE path = 'C:\\' AND token = '{_SECRET}'",
        f"SELECT '\\', '{_SECRET}', '\\', 'x'",
        # the same with backslash escapes (MySQL/MariaDB)
        f"SELECT * FROM t WHERE a = 'it\\'s' AND token = '{_SECRET}'",
        f"SELECT * FROM t WHERE a = $$x$$ AND token = '{_SECRET}'",
        f"SELECT * FROM t WHERE a = '{_SECRET}' -- '{_SECRET}'",
    ],
)
def test_no_literal_text_survives(statement: str) -> None:
    text = normalize(statement)
    assert _SECRET not in text
    assert "s3cr3t" not in text
    assert "v4lue" not in text
    assert "'" not in text


_TRICKY = st.text(alphabet="ab'\\-*/$\n :?%()E", max_size=30)


def _standard(value: str) -> str:  # PostgreSQL (standard_conforming_strings), SQLite
    return "'" + value.replace("'", "''") + "'"


def _backslashed(value: str) -> str:  # MySQL/MariaDB, PostgreSQL E'...'
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@given(first=_TRICKY, second=_TRICKY)
def test_no_literal_survives_any_content(first: str, second: str) -> None:
    marker = "zqxjv"
    for quote, prefix in ((_standard, ""), (_backslashed, ""), (_backslashed, "E")):
        statement = (
            f"SELECT a -- note\nFROM t WHERE a = {prefix}{quote(first)} /* c */ "
            f"AND b = {prefix}{quote(marker + second)} AND c = {prefix}{quote(first)}"
        )
        for dialect in (None, "sqlite", "postgresql"):
            text = normalize(statement, dialect)
            assert marker not in text, (statement, dialect)
            assert text.startswith("SELECT a FROM t WHERE a = ?"), (statement, dialect)


# -- dialects: double quotes and # ----------------------------------------------------


@pytest.mark.parametrize("dialect", ["mysql", "mariadb", None, "other_sql"])
@pytest.mark.parametrize(
    "statement",
    [
        f'SELECT * FROM t WHERE api_key = "{_SECRET}"',
        f'SELECT * FROM t WHERE a = "it\\"s" AND b = "{_SECRET}"',
        f'SELECT * FROM t WHERE a = "x""y" AND b = "{_SECRET}"',
        f"SELECT * FROM t WHERE a = 1 # {_SECRET}\nAND b = 2",
        f"SELECT * FROM t WHERE a = 1 #'\nAND b = '{_SECRET}'",
        f'SELECT `we"ird`, `it\'s` FROM t WHERE b = "{_SECRET}"',
        f'SELECT * FROM t WHERE a = \'"\' AND b = "{_SECRET}"',
        f'INSERT INTO t (k) VALUES ("{_SECRET}")',
        f'SELECT TRIM(BOTH "x" FROM "{_SECRET}")',  # MySQL: a value after FROM
        f'SELECT SUBSTRING("{_SECRET}" FROM 2) FROM t',
        f'SELECT * FROM t WHERE a IS DISTINCT FROM "{_SECRET}"',  # SQLite: a value too
        f'SELECT * FROM t WHERE a IS  NOT DISTINCT\nFROM "{_SECRET}"',
    ],
)
def test_double_quoted_and_hash_literals_go_where_they_may_be_strings(
    statement: str, dialect: str | None
) -> None:
    text = normalize(statement, dialect)
    assert f'"{_SECRET}"' not in text
    assert f"'{_SECRET}'" not in text
    assert f"# {_SECRET}" not in text
    assert f"= {_SECRET}" not in text


@pytest.mark.parametrize(
    "statement",
    [
        f'SELECT * FROM t WHERE api_key = "{_SECRET}"',
        f'SELECT * FROM t WHERE a IS DISTINCT FROM "{_SECRET}"',
        f'SELECT * FROM t WHERE a IS NOT DISTINCT\n FROM "{_SECRET}"',
        f'INSERT INTO "t" (k) VALUES ("{_SECRET}")',
        f'SELECT `we"ird`, [it\'s] FROM t WHERE b = "{_SECRET}"',
        f'UPDATE "t" SET k = "{_SECRET}" WHERE "id" = 1',
    ],
)
@pytest.mark.parametrize("dialect", ["sqlite", None])
def test_sqlite_double_quoted_strings_go(statement: str, dialect: str | None) -> None:
    assert _SECRET not in normalize(statement, dialect)


def test_mysql_double_quotes_and_hash() -> None:
    stmt = 'SELECT `a`, "x" FROM `t` WHERE k = "sk_live_SECRET123" # note\nAND n = 1'
    assert normalize(stmt, "mariadb") == "SELECT `a`, ? FROM `t` WHERE k = ? AND n = ?"
    assert fingerprint(stmt, "mysql").collection == "t"
    # One shape whatever the quotes.
    assert fingerprint(stmt, "mariadb").id == fingerprint(
        "SELECT `a`, 'y' FROM `t` WHERE k = %(k)s AND n = %(n)s", "mariadb"
    ).id


def test_postgresql_double_quotes_are_names_and_hash_an_operator() -> None:
    stmt = 'SELECT "Col", data #> \'{a,b}\' FROM "Users" WHERE "it\'s" = 1'
    assert normalize(stmt, "postgresql") == 'SELECT "Col", data #> ? FROM "Users" WHERE "it\'s" = ?'
    assert fingerprint(stmt, "postgresql").collection == "Users"


def test_sqlite_table_names_in_double_quotes_survive() -> None:
    fp = fingerprint('SELECT "user".id FROM "user" JOIN "order" ON "user".k = 1', "sqlite")
    assert fp.text == 'SELECT ?.id FROM "user" JOIN "order" ON ?.k = ?'
    assert fp.summary == "SELECT user"
    assert fingerprint('SELECT * FROM "main"."items"', "sqlite").collection == "main.items"
    assert fingerprint('INSERT INTO "order" (a) VALUES (1)', "sqlite").summary == "INSERT order"
    assert fingerprint('UPDATE "order" SET "a" = "b"', "sqlite").text == (
        'UPDATE "order" SET ? = ?'
    )


def _my_backslashed(value: str) -> str:  # MySQL/MariaDB double-quoted string
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _my_doubled(value: str) -> str:  # MySQL/MariaDB with NO_BACKSLASH_ESCAPES
    return '"' + value.replace('"', '""') + '"'


_TRICKY_MY = st.text(alphabet="ab'\"\\-#*/`\n :?%()", max_size=30)


@given(first=_TRICKY_MY, second=_TRICKY_MY)
def test_no_mysql_literal_survives_any_content(first: str, second: str) -> None:
    marker = "zqxjv"
    for quote in (_my_backslashed, _my_doubled, _backslashed, _standard):
        statement = (
            f"SELECT a # note\nFROM t WHERE a = {quote(first)} /* c */ "
            f"AND b = {quote(marker + second)} AND c = {quote(first)}"
        )
        for dialect in ("mariadb", "mysql", None):
            text = normalize(statement, dialect)
            assert marker not in text, (statement, dialect)
            assert text.startswith("SELECT a FROM t WHERE a = ?"), (statement, dialect)
    for quote in (_my_doubled, _standard):  # SQLite: "..." a string when no column matches
        statement = (
            f"SELECT a -- note\nFROM t WHERE a = {quote(first)} /* c */ "
            f"AND b IS DISTINCT FROM {quote(marker + second)} AND c = {quote(first)}"
        )
        for dialect in ("sqlite", None):
            text = normalize(statement, dialect)
            assert marker not in text, (statement, dialect)
            assert text.startswith("SELECT a FROM t WHERE a = ?"), (statement, dialect)


# -- identity ---------------------------------------------------------------------------


def test_same_shape_same_id_and_text() -> None:
    a = fingerprint("SELECT * FROM users WHERE email = 'a@example.com' AND age > 30")
    b = fingerprint("SELECT  *  FROM users\nWHERE email = %(e)s AND age > %(a)s")
    assert a.id == b.id
    assert a.text == b.text == "SELECT * FROM users WHERE email = ? AND age > ?"
    assert re.fullmatch(r"[0-9a-f]{16}", a.id)


def test_different_shapes_different_ids() -> None:
    statements = [
        "SELECT * FROM users WHERE id = 1",
        "SELECT * FROM users WHERE email = 'x'",
        "SELECT * FROM orders WHERE id = 1",
        "SELECT id FROM users WHERE id = 1",
        "DELETE FROM users WHERE id = 1",
        "SELECT * FROM users WHERE id IN (1, 2)",
        "SELECT * FROM users WHERE id = 1 AND x1 = 2",
        "SELECT * FROM users WHERE id = 1 AND x2 = 2",
        "SELECT a::text FROM t",
        "SELECT a::int FROM t",
    ]
    ids = [fingerprint(s).id for s in statements]
    assert len(set(ids)) == len(statements)


def test_id_is_stable_across_calls_and_processes() -> None:
    # Ids are a hash of the normalised text, not of object identity or hash
    # seed: pinned, so that a change of normalisation or hash is noticed.
    import hashlib

    text = "SELECT * FROM users WHERE id = ?"
    expected = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    assert fingerprint("SELECT * FROM users WHERE id = 5").id == expected
    assert fingerprint("SELECT * FROM users WHERE id = :id").id == expected


def test_normalize_is_idempotent() -> None:
    for stmt in [
        "SELECT * FROM t WHERE id IN (1, 2, 3) AND a = 'x' AND b = $1",
        "INSERT INTO t VALUES (1, 2), (3, 4)",
        "SELECT a::text FROM t WHERE b = -1.5e3",
    ]:
        once = normalize(stmt)
        assert normalize(once) == once
        assert fingerprint(once).id == fingerprint(stmt).id


def test_text_is_cut_to_300_characters() -> None:
    stmt = "SELECT " + ", ".join(f"col_{i}" for i in range(200)) + " FROM t"
    fp = fingerprint(stmt)
    assert len(fp.text) == 300
    assert fp.text == normalize(stmt)[:300]
    # ...but the id covers the whole statement.
    assert fp.id != fingerprint(stmt.replace("col_199", "col_x")).id


# -- operation, collection, summary ------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "operation", "collection", "summary"),
    [
        ("SELECT * FROM users WHERE id = 1", "SELECT", "users", "SELECT users"),
        ("select * from users", "SELECT", "users", "SELECT users"),
        ("INSERT INTO orders (a) VALUES (1)", "INSERT", "orders", "INSERT orders"),
        ("UPDATE accounts SET x = 1", "UPDATE", "accounts", "UPDATE accounts"),
        ("DELETE FROM sessions WHERE id = 2", "DELETE", "sessions", "DELETE sessions"),
        ("SELECT * FROM public.users", "SELECT", "public.users", "SELECT public.users"),
        ('SELECT * FROM "Users"', "SELECT", "Users", "SELECT Users"),
        ('SELECT * FROM "public"."Users" u', "SELECT", "public.Users", "SELECT public.Users"),
        ("SELECT * FROM `shop`.`order`", "SELECT", "shop.order", "SELECT shop.order"),
        ("SELECT * FROM [main].[items]", "SELECT", "main.items", "SELECT main.items"),
        ("SELECT * FROM [items]", "SELECT", "items", "SELECT items"),
        ("SELECT a FROM t1 JOIN t2 ON t1.k = t2.k", "SELECT", "t1", "SELECT t1"),
        ("CREATE TABLE widgets (id INTEGER)", "CREATE", "widgets", "CREATE widgets"),
        ("/* c */ SELECT 1", "SELECT", "", "SELECT"),
        ("  (SELECT 1) UNION (SELECT 2)", "SELECT", "", "SELECT"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH", "x", "WITH x"),
    ],
)
def test_operation_collection_summary(
    statement: str, operation: str, collection: str, summary: str
) -> None:
    fp = fingerprint(statement, "postgresql")
    assert fp.operation == operation
    assert fp.collection == collection
    assert fp.summary == summary


def test_summary_falls_back_to_text() -> None:
    fp = fingerprint("$1")
    assert (fp.operation, fp.collection, fp.summary) == ("", "", "?")


# -- the cache -------------------------------------------------------------------------------


def test_cache_returns_the_same_object() -> None:
    stmt = "SELECT * FROM cache_probe WHERE id = %(id)s"
    assert fingerprint(stmt) is fingerprint(stmt)
    assert fpmod._caches[None][stmt] is fingerprint(stmt)
    assert fingerprint(stmt, "mariadb") is fingerprint(stmt, "mariadb")
    assert fpmod._caches["mariadb"][stmt] is fingerprint(stmt, "mariadb")


def test_cache_is_bounded() -> None:
    for i in range(5000):
        fingerprint(f"SELECT * FROM bounded_{i} WHERE id = {i}")
        assert len(fpmod._caches[None]) <= 4096
    # Still correct after the cache was reset.
    assert fingerprint("SELECT * FROM bounded_4999 WHERE id = 4999").text == (
        "SELECT * FROM bounded_4999 WHERE id = ?"
    )
