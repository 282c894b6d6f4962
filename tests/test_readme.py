"""The README's install lines and quick start, checked as a user would use them.

The package is published as ``sqlalchemy-poolguard`` (``poolguard`` on PyPI is
an unrelated project): every install hint must name it. The quick start's code
blocks (sync with logging, then async) run as written, against SQLite files.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import poolguard
import poolguard.cli
from poolguard.cli._db import DISTRIBUTION, install_hint

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# "pip install poolguard", "pip install 'poolguard[plot]'", "pip install -U "poolguard[x]"" ...
_WRONG_INSTALL = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?poolguard\b")


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml",
             *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.py")),
             *sorted((ROOT / "src" / "poolguard").rglob("*.py"))]
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8") for f in files}


def test_the_distribution_is_published_as_sqlalchemy_poolguard() -> None:
    # (tomllib is Python 3.11+; the lines are simple enough to read as text.)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = pyproject.split("[project]\n", 1)[1].split("\n[", 1)[0]
    assert re.findall(r'^name = "(.*)"$', project, flags=re.MULTILINE) == [DISTRIBUTION]
    assert DISTRIBUTION == "sqlalchemy-poolguard"
    # The import name, and the command, stay poolguard.
    assert 'packages = ["src/poolguard"]' in pyproject
    assert 'poolguard = "poolguard.cli:main"' in pyproject


def test_the_installed_distribution_provides_the_poolguard_package() -> None:
    # Fails until the environment is reinstalled from this checkout (pip install -e ".[dev]").
    # (packages_distributions() cannot see an editable install's package: its
    # RECORD lists a .pth file, so the command's entry point is the link.)
    dist = importlib.metadata.distribution(DISTRIBUTION)
    assert dist.version == poolguard.__version__
    (script,) = [ep for ep in dist.entry_points if ep.name == "poolguard"]
    assert script.value == "poolguard.cli:main"
    assert script.load() is poolguard.cli.main


def test_every_install_hint_names_the_published_distribution() -> None:
    wrong = {name: _WRONG_INSTALL.findall(text) for name, text in _texts().items()}
    assert {name: hits for name, hits in wrong.items() if hits} == {}
    assert 'pip install "sqlalchemy-poolguard[postgresql]"' in README
    assert "pip install sqlalchemy-poolguard" in README
    # The command line's own hints.
    assert install_hint("plot") == 'pip install "sqlalchemy-poolguard[plot]"'
    from poolguard.cli import bench

    assert install_hint("plot") in bench.EPILOG + "".join(
        a.help or "" for a in _bench_parser()._actions)


def _bench_parser() -> object:
    import argparse

    from poolguard.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser


def _quick_start() -> list[str]:
    section = README.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_quick_start_shows_logging_and_an_async_engine() -> None:
    blocks = _quick_start()
    assert len(blocks) == 2
    sync, async_ = blocks
    assert "logging.basicConfig(level=logging.INFO)" in sync
    assert "create_async_engine" in async_
    assert "await" in async_


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    sync_url = f"sqlite:///{tmp_path / 'sync.db'}"
    async_url = f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"
    preamble = f"url = {sync_url!r}\nasync_url = {async_url!r}\n"
    # After the snippets: the logging line makes an event visible (a statement
    # over the slow-query threshold logs query.slow).
    epilogue = (
        "poolguard.wrap(engine, slow_query_threshold=0.0)\n"
        "with engine.connect() as conn:\n"
        "    conn.execute(sa.text('SELECT 42'))\n"
    )
    script = tmp_path / "quick_start.py"
    script.write_text(preamble + "\n".join(_quick_start()) + epilogue, encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        check=False, env=env,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith("PoolStats(") or "in_use" in out[0], out
    assert out[1] == "1"  # the async block's SELECT 1
    assert "query.slow" in done.stderr
    assert "SELECT ?" in done.stderr  # normalised, never the literal
