"""Server-sent events for a streamed completion: cheap per event, coalesced when writes cost.

- ``ChunkEncoder`` builds a stream's chunk JSON once around a placeholder; each event then
  encodes only its text (the bytes equal ``json.dumps`` of the whole chunk).
- ``WritePacer`` decides when the pending text goes out. While writes return quickly (the
  reader keeps up) each token goes out at once, one event per token. When writes take ``w``
  seconds (a reader that lags or shares the CPU and preempts the writer, a full socket
  buffer) the next one waits until ``w * (1 / share - 1)`` has passed, so writing takes at
  most ``share`` of the stream's time; the tokens generated meanwhile go out as one chunk
  carrying their text (OpenAI's chunk text may hold several tokens). ``w`` is the shorter
  of the last two writes (the first write counts alone), so one later write that another
  process happened to preempt does not hold the stream; the wait is at most ``max_hold_s``. The pacer is also the ``pace`` of
  ``GenaiModel.generate``: until the next write is due the generation loop keeps its tokens
  and hands them over in one list, so the writer's side costs nothing per held token.
- ``DisconnectPoll`` looks at the peer socket at most every ``every_s``: generation's
  cancel check runs before each token and costs a ``select`` only when one is due.

Generation and writing share the request's thread on purpose: onnxruntime-genai's
``generate_next_token`` holds the GIL, so a writer thread would run only when the
interpreter's switch interval (5 ms) takes the GIL from the generating thread.
"""

from __future__ import annotations

import json
import select
import socket
import time
from json.encoder import encode_basestring_ascii  # what json.dumps uses for str
from typing import Any, Callable

from edgeship.agent.llm.openai_api import CompletionRequest, chunk_doc

_MARK = "\ue000edgeship-text\ue000"


def peer_closed(sock: socket.socket) -> bool:
    """True once the client has closed its end (readable and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class DisconnectPoll:
    """``peer_closed`` at most once per ``every_s`` (a token every few hundred µs needs no
    syscall each); True stays True."""

    def __init__(self, sock: socket.socket, every_s: float = 0.002,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.sock, self.every_s, self.clock = sock, every_s, clock
        self.next_at = 0.0
        self.closed = False

    def __call__(self) -> bool:
        if not self.closed:
            now = self.clock()
            if now >= self.next_at:
                self.next_at = now + self.every_s
                self.closed = peer_closed(self.sock)
        return self.closed


def event(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


class ChunkEncoder:
    """``text(s)`` → the SSE event of one content chunk of this stream."""

    def __init__(self, req: CompletionRequest, rid: str) -> None:
        self.req, self.rid = req, rid
        doc = json.dumps(chunk_doc(req, rid, _MARK, None), separators=(",", ":"))
        prefix, suffix = doc.split(encode_basestring_ascii(_MARK))
        self._prefix = b"data: " + prefix.encode()
        self._suffix = suffix.encode() + b"\n\n"

    def text(self, s: str) -> bytes:
        return self._prefix + encode_basestring_ascii(s).encode() + self._suffix

    def first(self, s: str) -> bytes:
        """The first chunk (a chat stream's carries the assistant role)."""
        return event(chunk_doc(self.req, self.rid, s, None, True)) if self.req.chat \
            else self.text(s)

    def done(self, finish: str, first: bool) -> bytes:
        return event(chunk_doc(self.req, self.rid, None, finish, first))


class WritePacer:
    """When the next write may go: at once after cheap writes, later after costly ones."""

    def __init__(self, share: float = 0.01, max_hold_s: float = 0.05) -> None:
        self.factor = 1 / share - 1
        self.max_hold_s = max_hold_s
        self.next_at = 0.0
        self.writes = 0
        self.last_s = float("inf")  # the write before the latest one (none: the first counts)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def wrote(self, started: float, ended: float) -> None:
        self.writes += 1
        took = ended - started
        cost, self.last_s = min(took, self.last_s), took
        self.next_at = ended + min(cost * self.factor, self.max_hold_s)
