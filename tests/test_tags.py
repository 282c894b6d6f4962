"""Request tags and request objects: what a tag may carry into logs and labels,
and one ``poolguard.request`` object used by many tasks, threads and itself.

Tags often come from request data (a route, a job name): a newline or an ANSI
escape in one must not forge a log line, and a huge one must not become a huge
log line or metric label. URLs printed by the command line hide every secret.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from poolguard._context import MAX_TAG_CHARS, RequestContext, current_request
from poolguard._log import EventLog
from poolguard.cli._db import describe_error, shown, url_secrets

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.usefixtures("structlog_unconfigured")

FORGED = "login\npoolguard WARNING pool.exhausted pool=forged\x1b[2K\r\x85\u2028\u202e"


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[sa.Engine]:
    engine = poolguard.wrap(sa.create_engine(sqlite_url), name="tags", slow_query_threshold=0)
    yield engine
    engine.dispose()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) for r in caplog.records if r.name == "poolguard"]


# -- tags ---------------------------------------------------------------------------------


def test_control_characters_in_a_tag_are_replaced() -> None:
    with poolguard.request(tag=FORGED) as ctx:
        assert ctx.tag is not None
        assert ctx.tag.isprintable()
        assert ctx.tag.startswith("login?poolguard WARNING")
    assert poolguard.request(tag="GET /orders/{id}")._tag == "GET /orders/{id}"  # untouched


def test_a_huge_tag_is_cut() -> None:
    huge = "x" * 1_000_000
    with poolguard.request(tag=huge) as ctx:
        assert ctx.tag is not None
        assert len(ctx.tag) == MAX_TAG_CHARS
        assert ctx.tag.endswith("...")
    exact = "y" * MAX_TAG_CHARS
    with poolguard.request(tag=exact) as ctx:
        assert ctx.tag == exact


def test_a_bad_tag_error_does_not_echo_a_huge_value() -> None:
    with pytest.raises(ValueError, match="tag=") as raised:
        poolguard.request(tag=b"z" * 1_000_000)  # type: ignore[arg-type]
    assert len(str(raised.value)) < 300


def test_a_forged_tag_stays_on_one_log_line(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard")
    with poolguard.request(tag=FORGED + "y" * 100_000), engine.connect() as conn:
        conn.execute(sa.text("SELECT 1")).all()
    lines = [line for line in _lines(caplog) if "query.slow" in line]
    assert lines
    for line in lines:
        assert len(line.splitlines()) == 1
        assert line.isprintable()
        assert "y" * MAX_TAG_CHARS not in line
        assert "pool=forged" not in line.split("tag=")[0]
    events = [r.poolguard for r in caplog.records if r.poolguard["event"] == "query.slow"]
    assert all(len(e["tag"]) == MAX_TAG_CHARS for e in events)


def test_tag_breaker_labels_are_capped(sqlite_url: str) -> None:
    engine = poolguard.wrap(sa.create_engine(sqlite_url), breaker_per_tag=True)
    try:
        with poolguard.request(tag="t" * 10_000), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).all()
        guard = poolguard.get_guard(engine)
        assert guard.tag_breakers
        assert all(len(tag) <= MAX_TAG_CHARS for tag in guard.tag_breakers)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "value", ["a\nb", "a\rb", "\x1b[31mred", "a\u2028b", "nul\x00", "tab\there", "x\x85y", ""]
)
def test_stdlib_rendering_escapes_control_characters(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")
    log = EventLog("p")
    log.refresh()
    log.emit(logging.INFO, "probe", field=value, after="kept")
    (line,) = _lines(caplog)
    assert line.isprintable(), repr(line)
    assert line.endswith(" after=kept")
    assert f"field={value!r}" in line
    (record,) = [r for r in caplog.records if r.name == "poolguard"]
    assert record.poolguard["field"] == value  # the event dict keeps the value itself


# -- one request object, many scopes -----------------------------------------------------------


async def test_one_request_object_in_overlapping_tasks() -> None:
    scope = poolguard.request(tag="shared", timeout=30)
    a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> str | None:
        async with scope as ctx:
            a_in.set()
            await b_in.wait()
            assert current_request() is ctx
        a_out.set()  # leaves while the second task is still inside
        return current_request() and current_request().tag  # type: ignore[union-attr]

    async def second() -> str | None:
        await a_in.wait()
        async with scope as ctx:
            b_in.set()
            await a_out.wait()
            assert current_request() is ctx
            seen = ctx.tag
        assert current_request() is None
        return seen

    assert await asyncio.gather(first(), second()) == [None, "shared"]


def test_one_request_object_in_overlapping_threads() -> None:
    scope = poolguard.request(tag="shared", timeout=30)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def first() -> None:
        try:
            with scope as ctx:
                a_in.set()
                assert b_in.wait(10)
                results["first inside"] = current_request() is ctx
            a_out.set()
            results["first after"] = current_request()
        except BaseException as exc:
            results["first error"] = exc
            a_out.set()

    def second() -> None:
        try:
            assert a_in.wait(10)
            with scope as ctx:
                b_in.set()
                assert a_out.wait(10)
                results["second inside"] = current_request() is ctx
            results["second after"] = current_request()
        except BaseException as exc:
            results["second error"] = exc
            b_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {
        "first inside": True, "first after": None, "second inside": True, "second after": None,
    }


def test_one_request_object_nested_in_itself() -> None:
    scope = poolguard.request(tag="outer", timeout=30)
    with scope as outer:
        with scope as inner:
            assert inner is not outer
            assert current_request() is inner
            assert inner.deadline is not None
            assert outer.deadline is not None
            assert inner.deadline <= outer.deadline
        assert current_request() is outer
        with poolguard.request(priority="critical") as other, scope as again:
            assert current_request() is again
            assert again.priority == "critical"  # inherited from the scope around it
        assert current_request() is outer
        assert other.tag == "outer"
    assert current_request() is None


async def test_decorator_and_object_shared_by_many_tasks() -> None:
    scope = poolguard.request(tag="many")

    async def work(i: int) -> bool:
        async with scope as ctx:
            await asyncio.sleep(0.001 * (i % 3))
            return current_request() is ctx

    assert all(await asyncio.gather(*(work(i) for i in range(50))))
    assert current_request() is None

    @poolguard.request(tag="decorated", timeout=30)
    async def decorated(depth: int) -> list[RequestContext]:
        ctx = current_request()
        assert ctx is not None
        assert ctx.tag == "decorated"
        await asyncio.sleep(0)
        inner = await decorated(depth - 1) if depth else []  # the same scope, nested
        assert current_request() is ctx
        return [ctx, *inner]

    chains = await asyncio.gather(*(decorated(3) for _ in range(20)))
    assert len({id(ctx) for chain in chains for ctx in chain}) == 80  # a scope per call
    assert current_request() is None


# -- URLs the command line prints ---------------------------------------------------------


SECRET = "qry-s3cr3t"  # noqa: S105 - a fake one, that must never be printed


@pytest.mark.parametrize(
    "param", ["password", "sslpassword", "passwd", "pwd", "secret", "token", "api_key",
              "PASSWORD", "client_secret", "access_token"],
)
def test_shown_url_hides_secret_query_parameters(param: str) -> None:
    url = f"postgresql+psycopg://u:pw@db.example:5432/app?{param}={SECRET}&sslmode=require"
    text = shown(url)
    assert SECRET not in text
    assert ":pw@" not in text
    assert f"{param}=***" in text
    assert "sslmode=require" in text
    assert SECRET in url_secrets(url)


def test_shown_url_without_secrets_is_unchanged() -> None:
    url = "postgresql+psycopg://u@db.example:5432/app?application_name=x&sslmode=require"
    assert shown(url) == url


def test_describe_error_hides_url_secrets() -> None:
    exc = RuntimeError(f"bad login for token {SECRET} and password pw1")
    url = f"mysql+pymysql://root:pw1@h/db?token={SECRET}"
    assert describe_error(exc, url=url) == "RuntimeError: bad login for token *** and password ***"


def test_cli_error_does_not_print_a_query_string_password() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:1/test?password={SECRET}&connect_timeout=2"
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "poolguard.cli", "demo", "--quick", "--url", url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "cannot connect to postgresql+psycopg://postgres@127.0.0.1:1/test?" in done.stderr
    assert "password=***" in done.stderr
    assert SECRET not in done.stderr + done.stdout
