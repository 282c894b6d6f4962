"""The per-checkout hold has one layout, written by two places: pinned here.

``_pool.py`` builds the hold of a checkout with an inline list display (the hot
path), ``_guard.py`` builds the hold of an adopted connection with
:func:`poolguard._hold.new_hold`. Both must give the same length and defaults,
in the order ``_hold.FIELDS`` names.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa

import poolguard
from poolguard import _hold


def test_the_index_constants_number_the_fields_in_order() -> None:
    assert [getattr(_hold, name) for name in _hold.FIELDS] == list(range(len(_hold.FIELDS)))
    assert len(_hold.new_hold(1.0, 0.5, 7, None)) == len(_hold.FIELDS)


def _only_hold(engine: sa.Engine) -> list[object]:
    holds = list(poolguard.get_guard(engine).gate.out.values())
    assert len(holds) == 1
    return holds[0]


def test_a_checkout_and_an_adoption_write_the_same_layout(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.QueuePool, pool_size=2)
    try:
        held = engine.connect()  # checked out before wrap(): adopted, by new_hold()
        poolguard.wrap(engine)
        adopted = _only_hold(engine)
        held.close()
        with engine.connect():  # a checkout: the hot path's inline list
            checked_out = _only_hold(engine)
        expected = _hold.new_hold(0.0, 0.0, 0, None)
        assert len(checked_out) == len(adopted) == len(expected)
        # The fields after the first four are the defaults of a fresh hold.
        start = _hold.STATEMENT
        assert checked_out[start:] == adopted[start:] == expected[start:]
        assert checked_out[_hold.THREAD] == threading.get_ident()
        assert isinstance(checked_out[_hold.T0], float)
        assert isinstance(checked_out[_hold.WAIT], float)
        assert checked_out[_hold.REQUEST] is None
    finally:
        poolguard.unwrap(engine)
        engine.dispose()
