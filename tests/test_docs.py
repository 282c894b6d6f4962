"""The README and docs/: links that resolve, and names that exist.

The README is the front door (under 200 lines); the reference lives in
``docs/``. Every relative link and anchor in them must lead somewhere, every
page of ``docs/`` is in its table of contents, and the names the docs list
(options, events, metrics, stats keys, environment variables) are the ones
the code has, in both directions where the code can be read for them.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import poolguard
from poolguard import Config, PoolStats, QueryStats

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SRC = "\n".join(p.read_text(encoding="utf-8")
                for p in sorted((ROOT / "src" / "poolguard").rglob("*.py")))

_FENCE = re.compile(r"^```.*?^```[ \t]*$", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", flags=re.MULTILINE)


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings there are code)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.replace("`", "").strip().lower()
    kept = "".join(
        c for c in text
        if c in " -_" or unicodedata.category(c)[0] in "LMN"
    )
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in _HEADING.finditer(_prose(_text(page))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return _LINK.findall(_CODE_SPAN.sub("code", _prose(_text(page))))


def test_slug_follows_github() -> None:
    assert slug("`poolguard demo`: the outage, replayed") == "poolguard-demo-the-outage-replayed"
    assert slug("SQLAlchemy's own pool suites") == "sqlalchemys-own-pool-suites"
    assert slug("FastAPI and Starlette (ASGI)") == "fastapi-and-starlette-asgi"
    assert slug("Logging, stats and metrics") == "logging-stats-and-metrics"


def test_the_readme_is_a_front_door() -> None:
    lines = _text(README).splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines"
    sections = [m.group(2) for m in _HEADING.finditer(_prose(_text(README)))
                if m.group(1) == "##"]
    for needed in ("Why", "Set-up", "Quick start", "The recommended setting", "Documentation"):
        assert needed in sections
    # The two set-up commands, exactly as .ci/run runs them.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'make_venv "$venv21" -e ".[dev]"' in ci
    assert "timeout --kill-after=30s \"$PYTEST_TIMEOUT\" pytest " in ci
    assert 'pip install -e ".[dev]"\npytest\n' in _text(README)
    assert "POOLGUARD_REQUIRE_DATABASES=1" in _text(README)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    checked = 0
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        checked += 1
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file {dest}")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix != ".md":
                broken.append(f"{target}: anchor into a non-Markdown target")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []
    assert checked > 0


def test_docs_has_a_table_of_contents_of_every_page() -> None:
    toc = {t.partition("#")[0] for t in links(DOCS / "README.md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= toc
    assert "docs/README.md" in links(README)


@pytest.mark.parametrize("page", sorted(set(DOCS.glob("*.md")) - {DOCS / "README.md"}),
                         ids=lambda p: p.name)
def test_each_page_opens_with_its_own_table_of_contents(page: Path) -> None:
    sections = [slug(m.group(2)) for m in _HEADING.finditer(_prose(_text(page)))
                if m.group(1) == "##"]
    own = {t[1:] for t in links(page) if t.startswith("#")}
    assert sections
    assert set(sections) <= own, f"not in the page's contents: {set(sections) - own}"


def _first_column(page: Path, after: str, before: str | None = None) -> set[str]:
    """The back-quoted names in the first column of the tables of a section."""
    text = _prose(_text(page)).split(after, 1)[1]
    if before is not None:
        text = text.split(before, 1)[0]
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([^`]+)`", first))
    return names


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    documented = _first_column(DOCS / "reference.md", "\n## Options\n", "\n## Requests\n")
    assert documented == set(Config.option_names())


def _emitted_events() -> set[str]:
    # emit(logging.LEVEL, "event", ...) with a literal name.
    return set(re.findall(r"\.emit\(\s*logging\.[A-Z]+,\s*\"([a-z_.]+)\"", SRC))


def _exists_as_event(name: str) -> bool:
    if f'"{name}"' in SRC:
        return True
    # f"breaker.{state}", f"alert.{alert.name}": the family, and the suffix a constant.
    prefix, _, suffix = name.partition(".")
    return f'f"{prefix}.{{' in SRC and f'"{suffix}"' in SRC


def test_the_events_table_lists_the_events_the_code_logs() -> None:
    documented = _first_column(DOCS / "observability.md", "\n### Events\n", "\n### Fingerprints\n")
    assert {name for name in documented if not _exists_as_event(name)} == set()
    emitted = _emitted_events()
    assert {"query.slow", "pool.exhausted", "connection.held_too_long"} <= emitted
    assert emitted - documented == set()
    for family in ("breaker", "alert"):
        assert f'f"{family}.{{' in SRC
        assert any(name.startswith(family + ".") for name in documented)


def _created_instruments() -> set[str]:
    """The names of the instruments poolguard creates on a meter, legacy ones too."""
    from poolguard import _otel

    names: set[str] = set()

    class RecordingMeter:
        def __getattr__(self, kind: str) -> Any:
            assert kind.startswith("create_"), kind

            def create(name: str, **options: Any) -> None:
                names.add(name)

            return create

    _otel._Instruments(RecordingMeter())._register_legacy()
    return names


def test_the_metrics_table_lists_metrics_the_code_exports() -> None:
    documented = _first_column(DOCS / "observability.md", "\n## Metrics\n", "\n### How it")
    assert len(documented) >= 15
    assert {name for name in documented if f'"{name}"' not in SRC} == set()
    # And every instrument the code creates is in the table.
    created = _created_instruments()
    assert "db.client.connection.count" in created
    legacy = {name for name in created if name.startswith("db.client.connections.")}
    assert created - legacy - documented == set()
    # The older names metrics_legacy_names adds are listed after the table.
    after = _text(DOCS / "observability.md").split("\n### How it", 1)[0].rsplit("| ---", 1)[1]
    assert legacy
    assert {name for name in legacy if f"`{name}`" not in after} == set()


def test_the_stats_table_lists_every_stats_field() -> None:
    documented = _first_column(DOCS / "observability.md", "\n## Stats\n", "\n## Who holds")
    assert documented == {f.name for f in dataclasses.fields(PoolStats)}
    query_stats = _text(DOCS / "observability.md").split("\n## Query stats\n", 1)[1]
    query_stats = query_stats.split("\n## ", 1)[0]
    for field in dataclasses.fields(QueryStats):
        assert f"`{field.name}`" in query_stats


def test_every_poolguard_variable_named_in_the_docs_exists() -> None:
    options = {f"POOLGUARD_{name.upper()}" for name in Config.option_names()}
    bed = "\n".join(p.read_text(encoding="utf-8")
                    for p in [*sorted((ROOT / "tests").glob("*.py")), ROOT / ".ci" / "run"])
    unknown = set()
    for page in PAGES:
        for var in re.findall(r"\bPOOLGUARD_[A-Z_]*[A-Z]\b", _text(page)):
            if var not in options and f'"{var}"' not in bed and f"{var}=" not in bed:
                unknown.add(var)
    assert unknown == set()


def test_the_recommended_setting_runs_as_written(tmp_path: Path) -> None:
    section = _text(README).split("\n## The recommended setting\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}", pool_size=10, max_overflow=0)
    try:
        exec(block, {"poolguard": poolguard, "engine": engine})  # noqa: S102 - the README's own code
        config = poolguard.get_guard(engine).config
        names = re.findall(r"\b([a-z_]+)=", block)
        assert "reserved_critical" in names
        for name in names:
            assert getattr(config, name) != getattr(Config(), name)
            # Every option it sets is explained next to it.
            assert f"- `{name}=" in section
    finally:
        engine.dispose()
