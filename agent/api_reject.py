"""Connections past the local API's cap: a 503 the client can read, then closed."""

from __future__ import annotations

import json
import queue
import selectors
import socket
import threading
import time


class Rejector:
    """Answers connections past the cap: writes a 503, then reads what the client sent
    until it closes (at most ``LINGER_S``), so the client reads the 503 instead of a reset.
    One thread and a selector for all of them; past ``MAX_PENDING`` a connection is just
    closed."""

    MAX_PENDING = 256
    LINGER_S = 1.0

    def __init__(self, name: str, response: bytes) -> None:
        self._name = name
        self._response = response
        self._incoming: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self._pending: dict[socket.socket, float] = {}
        self._thread: threading.Thread | None = None  # started by the first rejection
        self.rejected = 0

    def _start(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name=f"{self._name}-reject",
                                        daemon=True)
        self._thread.start()

    def reject(self, sock: socket.socket) -> None:
        """Called by the accepting thread only."""
        if self._thread is None:
            self._start()
        self.rejected += 1
        try:
            sock.setblocking(False)
            sock.send(self._response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._incoming.put(sock)
        self._wake_w.send(b"x")

    def stop(self) -> None:
        if self._thread is None:
            return
        self._incoming.put(None)
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            for key, _ in self._selector.select(timeout=0.2):
                if key.fileobj is self._wake_r:
                    if not self._take():
                        return
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for sock in [s for s, t in self._pending.items() if t < now]:
                self._close(sock)

    def _take(self) -> bool:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                sock = self._incoming.get_nowait()
            except queue.Empty:
                return True
            if sock is None:
                for s in list(self._pending):
                    self._close(s)
                return False
            if len(self._pending) >= self.MAX_PENDING:
                sock.close()
                continue
            self._pending[sock] = time.monotonic() + self.LINGER_S
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self._pending.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()


def busy_response(limit: int) -> bytes:
    body = json.dumps({"error": f"too many connections (at most {limit}): retry later, or "
                                "use the agent's Unix socket"}).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode() + body
