"""One recommended setting: the README, the demo, the benchmark and the examples agree.

``poolguard.recommended.options()`` is the one definition. The demo, the
postmortem benchmark and the examples use exactly it: nothing in them names
the query that will go bad (no tag limit "named in advance"); the README's
section "The recommended setting" shows exactly it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import poolguard
from poolguard import recommended
from poolguard._config import Config
from poolguard.cli import demo, scenario

ROOT = Path(__file__).resolve().parents[1]


def test_the_recommended_setting_is_valid_and_names_no_tag(tmp_path: Path) -> None:
    options = recommended.options()
    config = Config(**options)
    for key, value in options.items():
        assert getattr(config, key) == value, key
    # Nothing in it is specific to one service's queries.
    assert not {"tag_limits", "tag_statement_timeouts", "name"} & set(options)
    engine = poolguard.wrap(sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}"), **options)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_each_call_returns_a_dict_of_its_own() -> None:
    first = recommended.options()
    first["acquire_timeout"] = 99.0
    first.clear()
    assert recommended.options()["acquire_timeout"] != 99.0


def test_the_demo_is_exactly_the_recommended_setting() -> None:
    options = demo.guard_options()
    assert options == {"name": "auth-db", **recommended.options()}


def test_the_benchmark_is_exactly_the_recommended_setting() -> None:
    assert scenario.guarded_options() == recommended.options()
    # The demo and the benchmark differ only in the pool's name.
    assert {k: v for k, v in demo.guard_options().items() if k != "name"} == (
        scenario.guarded_options()
    )


def test_the_examples_engine_has_the_recommended_setting(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _example_db
    finally:
        sys.path.pop(0)
    engine = _example_db.make_engine(f"sqlite:///{tmp_path / 'example.db'}", pool_size=5)
    try:
        config = poolguard.get_guard(engine).config
        for key, value in recommended.options().items():
            assert getattr(config, key) == value, key
        # Nothing names a route or query in advance.
        assert not config.tag_limits
        assert not config.tag_statement_timeouts
    finally:
        engine.dispose()


def _readme_wrap_keywords(readme: str) -> dict[str, Any]:
    """The keyword arguments of the ``wrap(...)`` call in the first ```python block
    of the README's section whose heading says "recommended setting"."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith("#") and "recommended setting" in line.lower()), None)
    assert start is not None, 'README.md has no heading saying "recommended setting"'
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    section = "\n".join(lines[start + 1:end])
    match = re.search(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "no ```python block in the recommended setting's section"
    calls = [node for node in ast.walk(ast.parse(match.group(1)))
             if isinstance(node, ast.Call)
             and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "wrap"]
    assert len(calls) == 1, "the block holds one wrap(...) call"
    keywords = calls[0].keywords
    assert all(k.arg is not None for k in keywords), "options written out, no **"
    return {k.arg: ast.literal_eval(k.value) for k in keywords if k.arg is not None}


def test_the_readme_shows_exactly_the_recommended_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _readme_wrap_keywords(readme) == recommended.options()


def test_the_readme_check_reads_the_block_of_the_section() -> None:
    # The check itself, on a README of its own: it must see a difference.
    shown = ", ".join(f"{k}={v!r}" for k, v in recommended.options().items())
    text = ("# x\n\nSee the recommended setting below.\n\n```python\nimport poolguard\n```\n\n"
            "## The recommended setting\n\nFor a web service:\n\n"
            f"```python\npoolguard.wrap(engine, {shown})\n```\n\n## Next\n\n"
            "```python\npoolguard.wrap(engine)\n```\n")
    assert _readme_wrap_keywords(text) == recommended.options()
    assert _readme_wrap_keywords(text.replace("codel=True", "codel=False")) != (
        recommended.options())
