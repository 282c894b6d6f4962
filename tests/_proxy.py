"""A TCP proxy for fault-injection tests: between a pool and its database server.

Threads, not asyncio, so that synchronous tests drive it directly. It listens
on ``127.0.0.1:<free port>`` and forwards every connection to ``target``. The
mode can be switched at any time:

* ``pass``: forward both ways untouched.
* ``delay``: forward both ways, sleeping ``delay`` seconds before each chunk.
* ``reset``: send a TCP RST (``SO_LINGER`` 0) on every open connection at
  once; new connections are reset as soon as they are accepted.
* ``refuse``: stop listening, so new connections are refused
  (``ECONNREFUSED``); open ones are left alone. Leaving ``refuse`` listens
  again on the same port.
* ``blackhole``: accept connections and never answer: what clients send is
  read and dropped, nothing is forwarded either way. Open connections stay
  open, silent.

Everything is bounded: sockets block only in ``recv``/``accept`` with a
timeout or until :meth:`Proxy.close` shuts them down, and ``close`` joins
every thread with a timeout. ``accepted`` counts the connections accepted
(the dials that reached the proxy).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["MODES", "Proxy", "bounded"]

MODES = ("pass", "delay", "reset", "refuse", "blackhole")
_CHUNK = 65536
_JOIN_TIMEOUT = 2.0
_ACCEPT_POLL = 0.05


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN.

    ``SHUT_RD`` first: it wakes a thread blocked in ``recv`` on the socket
    without sending anything, so that the ``close`` (linger 0: an RST) really
    releases the socket instead of waiting for that ``recv`` to return.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: the client's socket and the upstream one."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.done = threading.Event()
        self.lock = threading.Lock()

    def close(self, *, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.done.set()
        if reset:
            _rst(self.client)
            if self.upstream is not None:
                _rst(self.upstream)
        else:
            _shut(self.client)
            if self.upstream is not None:
                _shut(self.upstream)


class Proxy:
    """A switchable TCP proxy to ``target`` (see the module docstring)."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay = 0.0
        self.accepted = 0
        # Bumped by every switch to ``reset``: a connection being set up while
        # one happened is reset even if the mode has moved on since.
        self._resets = 0
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop_accepting = threading.Event()
        self._closed = False
        self.port = 0
        self._listen()

    # -- control ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        """Switch to ``mode`` (``delay``: seconds per chunk in mode ``delay``)."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}: expected one of {MODES}")
        previous = self.mode
        self.delay = delay
        self.mode = mode
        if mode == "reset":
            # After the mode: _serve() reads the count before the mode, so a
            # connection either sees "reset" at once or sees the count move.
            with self._lock:
                self._resets += 1
            for pair in self._open_pairs():
                pair.close(reset=True)
        if mode == "refuse" and previous != "refuse":
            self._unlisten()
        elif mode != "refuse" and previous == "refuse":
            self._listen()

    def open_connections(self) -> int:
        """Connections accepted and not closed yet."""
        return len(self._open_pairs())

    def close(self) -> None:
        """Stop listening, close every connection, join every thread (bounded)."""
        self._closed = True
        self._unlisten()
        for pair in self._open_pairs():
            pair.close()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listening --------------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(_ACCEPT_POLL)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._stop_accepting = threading.Event()
        thread = threading.Thread(
            target=self._accept_loop, args=(sock, self._stop_accepting),
            name=f"proxy-accept-{self.port}", daemon=True,
        )
        self._accept_thread = thread
        self._start(thread)

    def _unlisten(self) -> None:
        self._stop_accepting.set()
        thread, self._accept_thread = self._accept_thread, None
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        resets = self._resets
        mode = self.mode
        if mode == "reset" or self._closed:
            _rst(client)
            return
        if mode == "blackhole":
            pair = _Pair(client, None)
            self._track(pair)
            if self._resets != resets:
                pair.close(reset=True)
                return
            self._start(threading.Thread(
                target=self._drain, args=(pair,), name="proxy-blackhole", daemon=True
            ))
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            _rst(client)
            return
        upstream.settimeout(None)
        pair = _Pair(client, upstream)
        self._track(pair)
        if self._resets != resets:
            # Switched to reset while this connection was being set up
            # (set_mode() may not have seen it among the open ones), even if
            # the mode has been switched on again since.
            pair.close(reset=True)
            return
        for src, dst in ((client, upstream), (upstream, client)):
            self._start(threading.Thread(
                target=self._pump, args=(pair, src, dst), name="proxy-pump", daemon=True
            ))

    # -- forwarding -------------------------------------------------------------

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        while not pair.closed:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                break
            if not data:
                break
            mode = self.mode
            if mode == "blackhole":
                continue  # swallowed: the other side never hears of it
            if mode == "delay" and self.delay > 0 and pair.done.wait(self.delay):
                break  # closed while the chunk was held back
            try:
                dst.sendall(data)
            except OSError:
                break
        pair.close()

    def _drain(self, pair: _Pair) -> None:
        # Blackholed at accept: read what the client sends, answer nothing.
        while not pair.closed:
            try:
                data = pair.client.recv(_CHUNK)
            except OSError:
                break
            if not data:
                break
        pair.close()

    # -- bookkeeping ------------------------------------------------------------

    def _track(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if not p.closed]
            self._pairs.append(pair)

    def _open_pairs(self) -> list[_Pair]:
        with self._lock:
            return [p for p in self._pairs if not p.closed]

    def _start(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()


@contextlib.contextmanager
def bounded(proxy: Proxy, seconds: float = 10.0) -> Iterator[None]:
    """If the code under test hangs, reset the proxy's connections after ``seconds``."""
    timer = threading.Timer(seconds, proxy.set_mode, args=("reset",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
