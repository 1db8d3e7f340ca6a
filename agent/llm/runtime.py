"""A language model served with onnxruntime-genai: prompt in, tokens out, one at a time.

``GenaiModel`` loads a variant file (see ``agent.llm.assets``) and offers

- ``run({"input_ids": ids})`` → ``[next-token logits (1, vocab)]``: the ``ModelRuntime``
  protocol, which the health check (golden prompt), shadow runs and ``/predict`` use;
- ``generate(ids, params, should_stop, pace=...)``: a generator of lists of ``Step`` (token
  id, text piece) with sampling options and a cancel check before each token: one list per
  token, or, with ``pace``, the tokens decoded until ``pace.next_at`` (a
  ``time.perf_counter`` value the consumer moves on; at most ``MAX_HELD_TOKENS``) in one
  list — a streaming writer that wants no token before then costs the loop nothing per
  token. Leaving the iteration early
  (client gone, stop string, ``max_tokens``) drops the genai ``Generator`` at once, which
  frees its KV cache.

onnxruntime-genai is imported here only, so an agent that serves no language model never
loads it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from edgeship.agent.errors import EdgeshipError, InferenceInputError, Reason, RuntimeLoadError
from edgeship.agent.llm import assets

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_HELD_TOKENS = 16  # handed over at least this often: stop strings are looked for then
MAX_STOP_CHARS = 128


class PromptTooLongError(InferenceInputError):
    """The prompt (plus what was asked to be generated) does not fit the context."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    def __post_init__(self) -> None:
        checks = [(self.max_tokens >= 1, "max_tokens must be >= 1"),
                  (0 <= self.temperature <= 2, "temperature must be in [0, 2]"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (len(self.stop) <= MAX_STOP_STRINGS,
                   f"at most {MAX_STOP_STRINGS} stop strings"),
                  (all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                   f"stop strings must be 1..{MAX_STOP_CHARS} characters")]
        for ok, message in checks:
            if not ok:
                raise InferenceInputError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Pace(Protocol):
    next_at: float  # time.perf_counter() before which a consumer wants no tokens


class _EveryToken:
    next_at = 0.0


_EVERY_TOKEN = _EveryToken()


class Step(NamedTuple):  # a tuple: made once per token, on the generation's critical path
    token: int
    text: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt in → first token out (time to first token)
    decode_s: float = 0.0  # first token → last token
    finish_reason: str = "length"


class GenaiModel:
    """One loaded language model; ``generate`` may be called from several threads, each
    with its own genai Generator (the agent bounds how many at once)."""

    def __init__(self, path: Path, *, threads: int = 0,
                 providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise RuntimeLoadError("onnxruntime-genai is not installed (pip install "
                                   "'edgeship[llm-device]')",
                                   reason_code=Reason.NO_COMPATIBLE_VARIANT) from e
        self._og = og
        self.path = Path(path)
        try:
            folder = assets.materialize(self.path)
            config = og.Config(str(folder))
            config.clear_providers()
            if providers and "CUDAExecutionProvider" in providers:
                config.append_provider("cuda")
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except EdgeshipError:
            raise
        except Exception as e:  # genai raises RuntimeError for every load failure
            raise RuntimeLoadError(f"onnxruntime-genai cannot load {self.path.name}: {e}",
                                   reason_code=Reason.HEALTH_CHECK_FAILED) from e
        model_cfg = assets.genai_config(self.path)["model"]
        self.context_length = int(model_cfg["context_length"])
        self.vocab_size = int(model_cfg["vocab_size"])
        eos = model_cfg.get("eos_token_id", [])
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.chat_template = self._chat_template(folder)
        self._lock = threading.Lock()
        self.active_sequences = 0  # genai Generators alive (each holds a KV cache)

    @staticmethod
    def _chat_template(folder: Path) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            return json.loads(cfg.read_text()).get("chat_template") or None
        return None

    # --- tokens ---------------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise InferenceInputError("this model has no chat template: use /v1/completions")
        return self.tokenizer.apply_chat_template(json.dumps(messages),
                                                  template_str=self.chat_template,
                                                  add_generation_prompt=True)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> int:
        """Refuse a prompt longer than the context; returns the tokens that may follow."""
        if prompt_tokens < 1:
            raise InferenceInputError("prompt is empty")
        if prompt_tokens >= self.context_length:
            raise PromptTooLongError(
                f"prompt is {prompt_tokens} tokens; this model's context is "
                f"{self.context_length} tokens (at least one must be left to generate)")
        return min(max_tokens, self.context_length - prompt_tokens)

    # --- ModelRuntime ---------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Next-token logits after the prompt ``input_ids`` (1, n)."""
        ids = np.asarray(next(iter(inputs.values()))).reshape(-1).astype(np.int32)
        self.check_fits(len(ids), 1)
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        gen = self._og.Generator(self.model, params)
        try:
            gen.append_tokens(ids)
            logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
        finally:
            del gen
        return [logits.reshape(-1, logits.shape[-1])[-1:].copy()]

    # --- generation -----------------------------------------------------------------------
    def _params(self, n_prompt: int, params: SamplingParams, budget: int):
        p = self._og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": n_prompt + budget,
                                   "do_sample": not params.greedy}
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k or self.vocab_size)
        if params.seed is not None:
            options["random_seed"] = int(params.seed)
        if params.ignore_eos:
            options["min_length"] = n_prompt + budget
        p.set_search_options(**options)
        return p

    def generate(self, ids: np.ndarray, params: SamplingParams,
                 should_stop: Callable[[], bool] = lambda: False,
                 stats: GenerationStats | None = None,
                 prompt_logits: list[np.ndarray] | None = None,
                 pace: Pace | None = None) -> Iterator[list[Step]]:
        """Tokens after ``ids``, in lists (see the module's doc). ``prompt_logits``: a list
        that receives the next-token logits after the prompt (for shadow runs; costs one
        copy of the prefill's logits)."""
        stats = stats if stats is not None else GenerationStats()
        budget = self.check_fits(len(ids), params.max_tokens)
        stats.prompt_tokens = len(ids)
        gen = self._og.Generator(self.model, self._params(len(ids), params, budget))
        self._count(+1)
        start = time.perf_counter()
        try:
            gen.append_tokens(np.asarray(ids, dtype=np.int32))
            if prompt_logits is not None:
                logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
                prompt_logits.append(logits.reshape(-1, logits.shape[-1])[-1:].copy())
            yield from self._decode_loop(gen, params, budget, should_stop, stats, start,
                                         pace or _EVERY_TOKEN)
        finally:
            del gen  # frees the KV cache now, not when the garbage collector runs
            self._count(-1)

    def _decode_loop(self, gen: Any, params: SamplingParams, budget: int,
                     should_stop: Callable[[], bool], stats: GenerationStats,
                     start: float, pace: Pace) -> Iterator[list[Step]]:
        """The per-token loop does only what each token needs (it runs between two model
        steps, with cold caches): keep the id, read the clock, ask genai whether it is done
        (EOS, length). Ids become text, EOS is looked for and the statistics are written
        when a list is handed over, in one go."""
        steps = _Steps(self.tokenizer.create_stream().decode,
                       frozenset() if params.ignore_eos else self.eos_ids, stats)
        clock = time.perf_counter
        ids: list[Any] = []
        first = 0.0
        while not should_stop():
            gen.generate_next_token()
            ids.append(gen.get_next_tokens()[0])
            now = clock()
            if not first:
                first = now
                stats.prefill_s = now - start
            done = steps.n + len(ids) >= budget or gen.is_done()
            if done or now >= pace.next_at or len(ids) >= MAX_HELD_TOKENS:
                batch = steps.take(ids, now - first)
                ids = []
                if steps.stopped or done:
                    stats.finish_reason = "stop" if steps.stopped else "length"
                    if batch:
                        yield batch
                    return
                yield batch
        steps.take(ids, clock() - first if first else 0.0)
        stats.finish_reason = "cancelled"

    def _count(self, delta: int) -> None:
        with self._lock:
            self.active_sequences += delta


class _Steps:
    """Token ids handed over in lists: their text (decoded in one go, the decoder's state
    hot), cut at the first EOS, counted into the statistics."""

    def __init__(self, decode: Callable[[int], str], eos: frozenset,
                 stats: GenerationStats) -> None:
        self.decode, self.eos, self.stats = decode, eos, stats
        self.n = 0
        self.stopped = False

    def take(self, ids: list[Any], decode_s: float) -> list[Step]:
        out: list[Step] = []
        for raw in ids:
            token = int(raw)
            if token in self.eos:  # counted, not shown; genai stops at it
                self.stopped = True
                out_n = len(out) + 1
                decode_s *= (self.n + out_n - 1) / max(self.n + len(ids) - 1, 1)
                self._count(out_n, decode_s)
                return out
            out.append(Step(token, self.decode(token)))
        self._count(len(ids), decode_s)
        return out

    def _count(self, tokens: int, decode_s: float) -> None:
        self.n += tokens
        self.stats.generated_tokens = self.n
        self.stats.decode_s = decode_s


def load_genai(path: Path, *, threads: int = 0,
               providers: Sequence[str] | None = None) -> GenaiModel:
    return GenaiModel(path, threads=threads, providers=providers)
