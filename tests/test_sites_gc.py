"""Reading other threads' frames never deadlocks the interpreter.

On CPython before 3.11.9 / 3.12.3, a garbage collection that starts inside
``sys._current_frames()`` and frees a ``threading.local`` deadlocks the whole
process (gh-106883). ``Guard.holders()`` reads thread frames (in the periodic
scan, leak warnings and ``PoolTimeout`` messages), so it must hold the
collector off there. Run in a subprocess: a regression hangs it, and the
timeout turns that into a failure instead of a hung suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import gc, sys, threading, time
    import sqlalchemy as sa
    import poolguard

    engine = poolguard.wrap(sa.create_engine("sqlite://"))
    guard = poolguard.get_guard(engine)
    release, held = threading.Event(), threading.Event()

    def nap():
        time.sleep(0.0005)  # a fresh frame each time: reading it allocates

    def hold():
        with engine.connect():
            held.set()
            while not release.is_set():
                nap()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait()

    class Box:
        pass

    for i in range(3000):
        box = Box()
        box.local = threading.local()
        box.me = box  # a cycle: only the collector frees it, and the local with it
        del box
        gc.set_threshold(1 + i % 97)  # a collection soon, at a varying point
        assert len(guard.holders()) == 1
        gc.set_threshold(700)
    release.set()
    holder.join()
    print("done")
    """
)


@pytest.mark.timing
def test_holders_with_collections_and_thread_locals_never_deadlock() -> None:
    try:
        result = subprocess.run(  # noqa: S603 - this interpreter, our own script
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("holders() deadlocked the interpreter (a collection inside "
                    "sys._current_frames(), gh-106883)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
