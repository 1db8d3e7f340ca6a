"""``POST /v1/completions`` and ``POST /v1/chat/completions`` on the agent's local API.

Raw routes of ``agent.api``'s route table (``ROUTES``). Generation runs on the request's own thread,
behind an admission bound shared by every listener of one ``ModelServer``: at most
``max_active`` sequences hold a KV cache at once (the number the memory check assumed),
at most ``max_queued`` wait; past that a request gets 429 at once, and one that waited
``queue_timeout_s`` gets 503. With ``stream: true`` the answer is server-sent events: one
chunk per decoded piece of text while writes are cheap, the pieces generated meanwhile in
one chunk when a write was slow (``agent.llm.sse.WritePacer``), then ``data: [DONE]``.
Before each token the generation checks for a disconnect (the peer socket is polled at most
every 2 ms): a client that went away stops the generation and frees its KV cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from edgeship.agent.api_routes import Route
from edgeship.agent.errors import EdgeshipError, InferenceInputError
from edgeship.agent.llm.openai_api import (CompletionRequest, StopFilter, chunk_doc,
                                           finish_reason, new_id, parse_request, response_doc,
                                           usage)
from edgeship.agent.llm.runtime import GenaiModel, GenerationStats, PromptTooLongError, Step
from edgeship.agent.llm.sse import ChunkEncoder, DisconnectPoll, WritePacer, event
from edgeship.agent.llm.stats import LmStats, ns_per_decoded_token
from edgeship.agent.serving import ModelNotFoundError, ModelServer

logger = logging.getLogger(__name__)

_ATTR = "_edgeship_llm"
_attach_lock = threading.Lock()


class QueueFullError(EdgeshipError):
    status = 429


class BusyError(EdgeshipError):
    status = 503


class Admission:
    def __init__(self, max_active: int = 1, max_queued: int = 4,
                 queue_timeout_s: float = 60.0) -> None:
        self.max_active, self.max_queued = max_active, max_queued
        self.queue_timeout_s = queue_timeout_s
        self._slots = threading.BoundedSemaphore(max_active)
        self._lock = threading.Lock()
        self.waiting = 0
        self.refused = 0

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self.waiting >= self.max_queued:
                    self.refused += 1
                    raise QueueFullError(f"{self.max_active} generation(s) running and "
                                         f"{self.waiting} queued: try again later")
                self.waiting += 1
            try:
                acquired = self._slots.acquire(timeout=self.queue_timeout_s)
            finally:
                with self._lock:
                    self.waiting -= 1
            if not acquired:
                raise BusyError(f"no generation slot freed within {self.queue_timeout_s:.0f} s")
        try:
            yield
        finally:
            self._slots.release()


@dataclass
class LmFrontend:
    admission: Admission = field(default_factory=Admission)
    stats: dict[str, LmStats] = field(default_factory=dict)

    def stats_for(self, model: str) -> LmStats:
        with _attach_lock:
            return self.stats.setdefault(model, LmStats())


def frontend(models: ModelServer) -> LmFrontend:
    """The generation state that belongs to one ``ModelServer`` (created on first use)."""
    fe = getattr(models, _ATTR, None)
    if fe is None:
        with _attach_lock:
            fe = getattr(models, _ATTR, None)
            if fe is None:
                fe = LmFrontend()
                setattr(models, _ATTR, fe)
    return fe


def configure(models: ModelServer, *, max_active: int = 1, max_queued: int = 4,
              queue_timeout_s: float = 60.0) -> LmFrontend:
    fe = frontend(models)
    fe.admission = Admission(max_active, max_queued, queue_timeout_s)
    return fe


def _error(handler: Any, status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None) -> None:
    handler._json(status, {"error": {"message": message, "type": kind, "param": None,
                                     "code": code}})


def handle(handler: Any, chat: bool) -> None:
    """Serve one completion request on ``handler`` (an ``agent.api`` request handler)."""
    body = handler._read_body()
    if body is None:
        return
    models: ModelServer = handler.server.models
    try:
        req = parse_request(json.loads(body), chat)
        loaded = models.get(req.model)
        runtime = loaded.runtime
        if not isinstance(runtime, GenaiModel):
            raise InferenceInputError(f"model {req.model!r} is not a language model")
        prompt = runtime.render_chat(list(req.messages)) if chat else req.prompt or ""
        ids = runtime.encode(prompt)
        runtime.check_fits(len(ids), req.params.max_tokens)
        fe = frontend(models)
        with fe.admission.enter():
            _generate(handler, req, loaded, ids, fe)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _error(handler, 400, f"body is not JSON: {str(e)[:200]}")
    except ModelNotFoundError as e:
        _error(handler, 404, str(e), code="model_not_found")
    except PromptTooLongError as e:
        _error(handler, 400, str(e), code="context_length_exceeded")
    except InferenceInputError as e:
        _error(handler, 400, str(e))
    except (QueueFullError, BusyError) as e:
        _error(handler, e.status, str(e), kind="server_busy", code="overloaded")
    except Exception as e:  # the runtime failed: answer 500 unless a stream already started
        logger.exception("generation failed")
        handler.close_connection = True
        if not getattr(handler, "_llm_streaming", False):
            _error(handler, 500, f"generation failed: {str(e)[:200]}", kind="server_error")


def _generate(handler: Any, req: CompletionRequest, loaded: Any, ids, fe: LmFrontend) -> None:
    inst = loaded.installed
    model_stats = handler.server.models.stats_for(inst.model)
    gs = GenerationStats()
    try:
        if req.stream:
            _stream(handler, req, loaded.runtime, ids, gs)
        else:
            _complete(handler, req, loaded.runtime, ids, gs)
    except Exception:
        model_stats.record_error()
        raise
    fe.stats_for(inst.model).record(inst.version, gs)
    ns = ns_per_decoded_token(gs)
    if ns is not None:
        model_stats.record_ns(ns, 1)


def _tokens(handler: Any, req: CompletionRequest, runtime: Any, ids, gs: GenerationStats,
            filt: StopFilter, pace: WritePacer | None = None) -> Iterator[str]:
    """The text of each list of tokens the runtime yields (one per token, or what ``pace``
    held back), stop strings applied."""
    shadow = handler.server.models.shadows.get(req.model)
    served: list | None = [] if shadow is not None else None
    with contextlib.closing(runtime.generate(ids, req.params,
                                             DisconnectPoll(handler.connection),
                                             gs, served, pace=pace)) as batches:
        if shadow is not None and served is not None:  # candidate's next token vs ours
            batches = _offer_after_first(batches, shadow, ids, served)
        for batch in batches:
            text = _filtered(filt, batch, gs)
            if text:
                yield text
            if filt.stopped:
                return
    if not filt.stopped:
        tail = filt.flush()
        if tail:
            yield tail


def _filtered(filt: StopFilter, batch: list[Step], gs: GenerationStats) -> str:
    """``batch``'s text up to a stop string; tokens decoded after the one that completed it
    (ahead, while the writer held them) are not counted, nor their share of the time."""
    if not filt.stops:
        return batch[0].text if len(batch) == 1 else "".join(step.text for step in batch)
    out = []
    for i, step in enumerate(batch):
        out.append(filt.feed(step.text))
        if filt.stopped:
            _uncount(gs, len(batch) - 1 - i)
            break
    return "".join(out)


def _uncount(gs: GenerationStats, tokens: int) -> None:
    if tokens and gs.generated_tokens > 1:
        gs.decode_s *= max(gs.generated_tokens - 1 - tokens, 0) / (gs.generated_tokens - 1)
        gs.generated_tokens -= tokens


def _offer_after_first(batches: Iterator[Any], shadow: Any, ids,
                       served: list) -> Iterator[Any]:
    offered = False
    for batch in batches:
        if not offered and served:
            shadow.offer({"input_ids": np.asarray(ids, dtype=np.int64)[None]}, served)
            offered = True
        yield batch


def _complete(handler: Any, req: CompletionRequest, runtime: Any, ids,
              gs: GenerationStats) -> None:
    filt = StopFilter(req.params.stop)
    text = "".join(_tokens(handler, req, runtime, ids, gs, filt))
    handler._json(200, response_doc(req, new_id(req.chat), text,
                                     finish_reason(gs.finish_reason, filt.stopped),
                                     usage(gs.prompt_tokens, gs.generated_tokens)))


def _stream(handler: Any, req: CompletionRequest, runtime: Any, ids,
            gs: GenerationStats) -> None:
    handler.close_connection = True
    handler.send_response(200)
    for key, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                       ("Connection", "close"), ("X-Accel-Buffering", "no")):
        handler.send_header(key, value)
    handler.end_headers()
    handler._llm_streaming = True
    out = _Chunks(handler.wfile, ChunkEncoder(req, new_id(req.chat)))
    filt = StopFilter(req.params.stop)
    try:
        for text in _tokens(handler, req, runtime, ids, gs, filt, out.pacer):
            out.add(text)
        out.finish(finish_reason(gs.finish_reason, filt.stopped),
                   usage(gs.prompt_tokens, gs.generated_tokens) if req.include_usage else None)
    except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout):
        gs.finish_reason = "cancelled"
        logger.debug("client left during a stream after %d tokens", gs.generated_tokens)


class _Chunks:
    """The content of one stream: text is written at once while the pacer allows, else
    kept and sent with the next write (or the end) as one chunk."""

    def __init__(self, wfile: Any, enc: ChunkEncoder) -> None:
        self.write, self.flush = wfile.write, wfile.flush  # unbuffered: one sendall a write
        self.enc = enc
        self.pacer = WritePacer()
        self.pending: list[str] = []

    def _content(self) -> bytes:
        text = "".join(self.pending)
        self.pending.clear()
        return self.enc.first(text) if self.pacer.writes == 0 else self.enc.text(text)

    def add(self, text: str) -> None:
        self.pending.append(text)
        now = time.perf_counter()
        if self.pacer.due(now):
            self.write(self._content())
            self.flush()
            self.pacer.wrote(now, time.perf_counter())

    def finish(self, finish: str, use: dict[str, int] | None) -> None:
        tail = [self._content()] if self.pending else []
        tail.append(self.enc.done(finish, first=self.pacer.writes == 0 and not tail))
        if use is not None:
            tail.append(event({**chunk_doc(self.enc.req, self.enc.rid, None, None),
                               "choices": [], "usage": use}))
        self.write(b"".join(tail) + b"data: [DONE]\n\n")
        self.flush()


ROUTES = [
    Route("POST", "/v1/completions", lambda server, h: handle(h, chat=False), raw=True),
    Route("POST", "/v1/chat/completions", lambda server, h: handle(h, chat=True), raw=True),
]
