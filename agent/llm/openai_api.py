"""The OpenAI-compatible request and response shapes (pure: no sockets, no model).

``parse_request`` turns a ``/v1/completions`` or ``/v1/chat/completions`` body into a
``CompletionRequest`` or raises ``InferenceInputError`` naming the bad field;
``StopFilter`` holds back text that may be the start of a stop string; the ``*_doc``
functions build response objects and stream chunks as the OpenAI API documents them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from edgeship.agent.errors import InferenceInputError
from edgeship.agent.llm.runtime import SamplingParams

MAX_PROMPT_CHARS = 256 * 1024
MAX_MESSAGES = 256
DEFAULT_MAX_TOKENS = 16
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
               "tools": None, "tool_choice": None, "functions": None}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    chat: bool
    prompt: str | None  # completions
    messages: tuple[dict[str, str], ...]  # chat
    params: SamplingParams
    stream: bool
    include_usage: bool = False


def _number(doc: dict, key: str, default: float, kind: type = float) -> Any:
    value = doc.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise InferenceInputError(f"{key} must be a{'n integer' if kind is int else ' number'}, "
                                  f"got {value!r}")
    return kind(value)


def _stop(doc: dict) -> tuple[str, ...]:
    stop = doc.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InferenceInputError("stop must be a string or a list of strings")


def _unsupported(doc: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        if key in doc and doc[key] not in (neutral, None, [] if neutral is None else neutral):
            raise InferenceInputError(f"{key}={doc[key]!r} is not supported by this server")


def _prompt(doc: dict) -> str:
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InferenceInputError("prompt must be a string (or a list of one string)")
    return prompt


def _messages(doc: dict) -> tuple[dict[str, str], ...]:
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise InferenceInputError(f"messages must be a list of 1..{MAX_MESSAGES} messages")
    out = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(content, str):
            raise InferenceInputError("each message needs a string role and text content")
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def parse_request(doc: Any, chat: bool) -> CompletionRequest:
    if not isinstance(doc, dict):
        raise InferenceInputError("body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InferenceInputError("model must name a served model")
    _unsupported(doc)
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in doc else "max_tokens"
    params = SamplingParams(
        max_tokens=_number(doc, max_key, DEFAULT_MAX_TOKENS, int),
        temperature=_number(doc, "temperature", 1.0), top_p=_number(doc, "top_p", 1.0),
        top_k=_number(doc, "top_k", 0, int),
        seed=doc.get("seed") if doc.get("seed") is None else _number(doc, "seed", 0, int),
        stop=_stop(doc), ignore_eos=doc.get("ignore_eos") is True)
    prompt = None if chat else _prompt(doc)
    messages = _messages(doc) if chat else ()
    size = len(prompt or "") + sum(len(m["content"]) for m in messages)
    if size > MAX_PROMPT_CHARS:
        raise InferenceInputError(f"prompt of {size} characters exceeds {MAX_PROMPT_CHARS}")
    options = doc.get("stream_options") or {}
    return CompletionRequest(model=model, chat=chat, prompt=prompt, messages=messages,
                             params=params, stream=bool(doc.get("stream", False)),
                             include_usage=bool(isinstance(options, dict)
                                                and options.get("include_usage")))


class StopFilter:
    """Feed text pieces; get back what may be sent. Text that could still become a stop
    string is held back; once a stop string appears, everything from it on is dropped."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_doc(req: CompletionRequest, rid: str, text: str, finish: str,
                 use: dict[str, int]) -> dict[str, Any]:
    base = {"id": rid, "created": int(time.time()), "model": req.model, "usage": use,
            "system_fingerprint": None}
    if req.chat:
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chunk_doc(req: CompletionRequest, rid: str, text: str | None,
              finish: str | None, first: bool = False) -> dict[str, Any]:
    base = {"id": rid, "created": int(time.time()), "model": req.model,
            "system_fingerprint": None}
    if req.chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {**base, "object": "chat.completion.chunk", "choices": [{
            "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def finish_reason(stats_reason: str, stopped: bool) -> str:
    return "stop" if stopped or stats_reason == "stop" else "length"
