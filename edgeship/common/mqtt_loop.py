"""One thread for the network I/O of many MQTT sessions (paho's external-loop API).

A gateway, or a simulator with hundreds of agents per process, pays one network thread
instead of one per connection: ``MqttSession(..., loop=SharedLoop())``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Callable

import paho.mqtt.client as paho

logger = logging.getLogger(__name__)


class SharedLoop:
    """One thread runs the network I/O of many :class:`MqttSession` objects (each keeps its
    own client id, socket, session and keepalive) through paho's external-loop API.

    Selector state is touched only on the loop thread; other threads hand work over with
    :meth:`call_soon` (a lock, a deque and a wake-up byte). Every ``misc_interval_s`` each
    client gets ``loop_misc`` (keepalive PINGREQs, keepalive timeouts)."""

    def __init__(self, *, misc_interval_s: float = 1.0, name: str = "edgeship-mqtt-shared"):
        self.misc_interval_s = misc_interval_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # loop thread only
        self._order = itertools.count()
        self._clients: set[paho.Client] = set()  # loop thread only
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        if self._on_loop():
            fn()
            return
        with self._lock:
            self._calls.append(fn)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (buffer full) or the loop closed

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self.call_soon(lambda: self._clients.add(client))

    def detach(self, client: paho.Client, *, wait_s: float) -> None:
        """Stop driving ``client``, after up to ``wait_s`` for its queued packets (e.g. a
        DISCONNECT) to leave and its socket to close."""
        deadline = time.monotonic() + wait_s
        while client.socket() is not None and time.monotonic() < deadline \
                and not self._on_loop():
            time.sleep(0.01)

        def drop() -> None:
            self._clients.discard(client)
            sock = client.socket()
            if sock is not None:
                self._unregister(sock)
                client._sock_close()  # noqa: SLF001 - paho has no public close
        self.call_soon(drop)

    def stop(self) -> None:
        self._stopped = True
        self.call_soon(lambda: None)
        self._thread.join(timeout=5)

    # --- loop thread -----------------------------------------------------------------

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.call_soon(lambda: heapq.heappush(
            self._timers, (time.monotonic() + delay_s, next(self._order), fn)))

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _run(self) -> None:
        next_misc = time.monotonic() + self.misc_interval_s
        while not self._stopped:
            now = time.monotonic()
            timeout_s = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            for key, events in self._selector.select(max(0.0, timeout_s)):
                self._ready(key, events)
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now >= next_misc:
                next_misc = now + self.misc_interval_s
                for client in list(self._clients):
                    self._guard(client.loop_misc)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _ready(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is None:  # the wake-up socket
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            return
        client: paho.Client = key.data
        if events & selectors.EVENT_READ:
            self._guard(client.loop_read)
        if events & selectors.EVENT_WRITE and client.socket() is key.fileobj:
            self._guard(client.loop_write)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
        for fn in calls:
            self._guard(fn)

    @staticmethod
    def _guard(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # one client's failure must not stop the others' network
            logger.exception("shared MQTT loop: %s failed", getattr(fn, "__name__", fn))

    def _set_events(self, sock, client: paho.Client, events: int) -> None:
        try:
            self._selector.modify(sock, events, client)
        except (KeyError, ValueError):
            if sock.fileno() >= 0:
                self._selector.register(sock, events, client)

    def _unregister(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- paho's socket callbacks -------------------------------------------------------

    def _socket_open(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._set_events(sock, client, selectors.EVENT_READ))

    def _socket_close(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._unregister(sock))

    def _register_write(self, client, userdata, sock) -> None:
        self.call_soon(lambda: self._set_events(
            sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)
            if client.socket() is sock else None)

    def _unregister_write(self, client, userdata, sock) -> None:
        def apply() -> None:
            if client.socket() is not sock:
                return
            if client.want_write():  # a publish raced with the drain: keep writing
                client._registered_write = True  # noqa: SLF001 - paho's own flag
                return
            self._set_events(sock, client, selectors.EVENT_READ)
        self.call_soon(apply)
