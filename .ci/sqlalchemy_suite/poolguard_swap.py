"""pytest plugin: run SQLAlchemy's own test suite with QueuePool replaced by poolguard's.

Loaded with ``-p poolguard_swap`` (this directory on ``PYTHONPATH``) by
``.ci/sqlalchemy_suite/run.py``; it is not a test module and the project's own
``pytest`` run (testpaths = tests) never sees it.

A ``-p`` plugin is imported before any conftest.py, so the swap is in place
before SQLAlchemy's testing plugin and test modules import anything: test
modules that call ``pool.QueuePool(...)``, do ``from sqlalchemy.pool import
QueuePool``, or let ``create_engine`` pick the dialect's default pool
(``DefaultDialect.get_pool_class`` and the sqlite dialect read
``sqlalchemy.pool.QueuePool`` at call time) all get the guarded class.

Every pool of that class that gets a guard is counted; at the end of the session
the plugin fails the run when too few did (the suite ran on the stock class) and
writes the counts to ``$SA_SUITE_REPORT`` (JSON) for the runner.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import sqlalchemy
import sqlalchemy.pool
import sqlalchemy.pool.impl
from sqlalchemy import create_engine

import poolguard
from poolguard._guard import Guard
from poolguard._pool import GuardedQueuePool

# Pools built with poolclass=Guarded... configure from POOLGUARD_* variables;
# the suite must run on the defaults, whatever the calling environment says.
for _name in [name for name in os.environ if name.startswith("POOLGUARD_")]:
    del os.environ[_name]

STOCK = sqlalchemy.pool.impl.QueuePool
if STOCK is not sqlalchemy.pool.QueuePool or issubclass(STOCK, poolguard.GuardedPoolMixin):
    raise RuntimeError("poolguard_swap: sqlalchemy.pool.QueuePool was already replaced")

# The class a wrapped engine's QueuePool becomes, as the issue defines it.
_engine = poolguard.wrap(create_engine("sqlite://", poolclass=STOCK))
GUARDED = type(_engine.pool)
poolguard.unwrap(_engine)
_engine.dispose()
del _engine
if GUARDED is not GuardedQueuePool:
    raise RuntimeError(f"poolguard_swap: wrap() made {GUARDED!r}, not GuardedQueuePool")

_MODULES = (sqlalchemy, sqlalchemy.pool, sqlalchemy.pool.impl)
for _module in _MODULES:
    _module.QueuePool = GUARDED  # type: ignore[attr-defined]

COUNTS: dict[str, int] = {"guarded_pools": 0, "guarded_attaches": 0}
_seen: set[int] = set()
_attach = Guard._attach


def _counting_attach(self: Guard, pool: Any) -> None:
    if isinstance(pool, GUARDED):
        COUNTS["guarded_attaches"] += 1
        # id() may repeat once a pool is collected: this is a lower bound.
        if id(pool) not in _seen:
            _seen.add(id(pool))
            COUNTS["guarded_pools"] += 1
    _attach(self, pool)


Guard._attach = _counting_attach  # type: ignore[method-assign]


def pytest_report_header(config: pytest.Config) -> list[str]:
    current = sqlalchemy.pool.QueuePool
    return [
        f"poolguard_swap: sqlalchemy.pool.QueuePool is {current.__module__}."
        f"{current.__qualname__} (poolguard {poolguard.__file__})",
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    problems = [
        f"{module.__name__}.QueuePool was changed back during the run"
        for module in _MODULES
        if module.QueuePool is not GUARDED
    ]
    minimum = int(os.environ.get("SA_SUITE_MIN_GUARDED_POOLS", "1"))
    if COUNTS["guarded_pools"] < minimum:
        problems.append(
            f"only {COUNTS['guarded_pools']} guarded pools got a guard (expected at least "
            f"{minimum}): the suite did not run on poolguard's class"
        )
    path = os.environ.get("SA_SUITE_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(
                {
                    **COUNTS,
                    "guarded_class": f"{GUARDED.__module__}.{GUARDED.__qualname__}",
                    "sqlalchemy": sqlalchemy.__version__,
                    "sqlalchemy_file": sqlalchemy.__file__,
                    "poolguard_file": poolguard.__file__,
                    "problems": problems,
                },
                out,
                indent=2,
            )
    if problems:
        for problem in problems:
            print(f"\npoolguard_swap: ERROR: {problem}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"poolguard_swap: {COUNTS['guarded_pools']} guarded pools, "
        f"{COUNTS['guarded_attaches']} guard attaches"
    )
