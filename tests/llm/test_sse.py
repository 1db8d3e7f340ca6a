"""The SSE writer's parts on their own: the prebuilt chunk bytes equal ``json.dumps`` of the
whole chunk, writes coalesce only after a slow one, the disconnect poll is throttled."""

from __future__ import annotations

import json
import socket
import time

import pytest

from edgeship.agent.llm.http import _Chunks
from edgeship.agent.llm.openai_api import chunk_doc, parse_request
from edgeship.agent.llm.sse import ChunkEncoder, DisconnectPoll, WritePacer, event

TEXTS = ["plain", ' "quoted" \\ back', "new\nline\ttab\x00nul\x1f", "é ü 中文", "😀 astral",
         "\ue000edgeship-text\ue000", ""]


@pytest.mark.parametrize("chat", [False, True])
def test_prebuilt_chunks_are_byte_equal_to_json_dumps_of_the_chunk(chat):
    body = {"model": "m", "stream": True}
    body.update({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})
    req = parse_request(body, chat)
    enc = ChunkEncoder(req, "cmpl-1")
    for text in TEXTS[:-1]:
        doc = json.loads(enc.text(text)[6:])
        assert enc.text(text) == event({**chunk_doc(req, "cmpl-1", text, None),
                                        "created": doc["created"]})
        first = json.loads(enc.first(text)[6:])
        assert (first["choices"][0]["delta"] if chat else first["choices"][0]) \
            == ({"role": "assistant", "content": text} if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": None})


def test_pacer_writes_at_once_after_cheap_writes_and_waits_after_slow_ones():
    pacer = WritePacer(share=0.05, max_hold_s=0.05)
    assert pacer.due(0.0)
    pacer.wrote(1.0, 1.00001)  # the first write counts alone: 10 µs, the next 190 µs later
    assert not pacer.due(1.0001) and pacer.due(1.00021)
    pacer.wrote(2.0, 2.003)  # one slow write (preempted once) after a cheap one: no wait
    assert not pacer.due(2.0031) and pacer.due(2.00321)
    pacer.wrote(3.0, 3.001)  # 1 ms after 3 ms: 19 ms later
    assert not pacer.due(3.019) and pacer.due(3.0201)
    pacer.wrote(4.0, 4.5)  # blocked writes (a reader that stopped reading): capped wait
    pacer.wrote(5.0, 5.5)
    assert not pacer.due(5.549) and pacer.due(5.551) and pacer.writes == 5


class _SlowFile:
    """A socket file whose writes take ``delay_s`` (a lagging reader)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.writes = delay_s, []

    def write(self, data: bytes) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.writes.append(data)

    def flush(self) -> None:
        pass


def _texts(writes: list[bytes]) -> list[str]:
    docs = [json.loads(line[6:]) for w in writes for line in w.split(b"\n\n")
            if line.startswith(b"data: {")]
    return [d["choices"][0]["text"] for d in docs if d["choices"] and d["choices"][0]["text"]]


@pytest.mark.parametrize("delay_s, coalesced", [(0.0, False), (0.003, True)])
def test_a_slow_transport_gets_the_pieces_in_fewer_chunks_in_order(delay_s, coalesced):
    req = parse_request({"model": "m", "prompt": "x", "stream": True}, False)
    out = _SlowFile(delay_s)
    chunks = _Chunks(out, ChunkEncoder(req, "cmpl-1"))
    pieces = [f"<{i}>" for i in range(60)]
    for p in pieces:
        chunks.add(p)
        time.sleep(0.0005)  # a token every 0.5 ms
    chunks.finish("length", {"prompt_tokens": 1, "completion_tokens": 60, "total_tokens": 61})
    texts = _texts(out.writes)
    assert "".join(texts) == "".join(pieces) and texts[0] == "<0>"  # the first alone, at once
    assert (len(texts) < 20) == coalesced
    assert out.writes[-1].endswith(b"data: [DONE]\n\n")
    assert json.loads(out.writes[-1].split(b"\n\n")[-3][6:])["usage"]["completion_tokens"] == 60


def test_disconnect_poll_looks_at_the_socket_at_most_every_interval():
    now = [0.0]
    a, b = socket.socketpair()
    try:
        poll = DisconnectPoll(a, every_s=0.002, clock=lambda: now[0])
        assert poll() is False  # peer open
        b.close()
        now[0] = 0.001
        assert poll() is False  # not due yet: no syscall
        now[0] = 0.002
        assert poll() is True
        assert poll() is True
    finally:
        a.close()
