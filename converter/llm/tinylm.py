"""A small Llama-style language model trained here, on text every Python ships with.

The corpus is the Python language reference as ``pydoc`` carries it (``pydoc_data.topics``:
about 80 topics, ~465,000 characters of English prose and code). Topics are split by name:
every ``HELDOUT_EVERY``-th topic is held out for perplexity and the converter's gates.
A byte-level BPE tokenizer is trained on the training topics with ``tokenizers``; the model
is ``transformers.LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Everything is deterministic for a seed (given the same torch build and thread count).
The result is a Hugging Face checkpoint directory: config, safetensors weights, tokenizer,
generation config, a plain chat template — what ``edgeship convert llm`` takes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

HELDOUT_EVERY = 8
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class LmSize:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int


SIZES = {
    # ~6 M parameters: the model scripts/train-llm writes and bench-llm measures
    "small": LmSize(vocab=4096, hidden=256, layers=6, heads=8, kv_heads=2,
                    intermediate=768, context=512),
    # ~0.1 M parameters: trained in a few seconds by the tests
    "tiny": LmSize(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
                   intermediate=128, context=128),
}


@dataclass(frozen=True)
class TrainSettings:
    size: str = "small"
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class TrainedLm:
    path: Path
    parameters: int
    heldout_perplexity: float
    train_s: float


def corpus() -> tuple[str, str]:
    """(training text, held-out text) from the language reference pydoc ships."""
    from pydoc_data.topics import topics

    train, held = [], []
    for i, name in enumerate(sorted(topics)):
        (held if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(topics[name])
    sep = f"\n{SPECIAL_TOKENS[0]}\n"
    return sep.join(train), sep.join(held)


def train_tokenizer(text: str, vocab: int, out_dir: Path) -> None:
    """Byte-level BPE on ``text``, saved as a Hugging Face fast tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0],
                                   bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1],
                                   unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _model(size: LmSize, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        intermediate_size=size.intermediate, max_position_embeddings=size.context,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _batches(ids: np.ndarray, settings: TrainSettings, rng: np.random.Generator):
    starts = rng.integers(0, len(ids) - settings.seq_len - 1, size=settings.batch_size)
    return np.stack([ids[s:s + settings.seq_len] for s in starts])


def perplexity(model, ids: np.ndarray, seq_len: int) -> float:
    """Perplexity of a torch causal LM over ``ids`` in non-overlapping windows."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = torch.from_numpy(ids[start:start + seq_len + 1]).long()[None]
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits[0], chunk[0, 1:],
                                                     reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return math.exp(total / count)


def train(out_dir: str | Path, settings: TrainSettings = TrainSettings()) -> TrainedLm:
    """Train tokenizer and model; write a Hugging Face checkpoint directory to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[settings.size]
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    train_text, held_text = corpus()
    train_tokenizer(train_text, size.vocab, out)
    (out / "heldout.txt").write_text(held_text)
    tokenizer = AutoTokenizer.from_pretrained(out)
    train_ids = np.asarray(tokenizer(train_text)["input_ids"], dtype=np.int64)
    held_ids = np.asarray(tokenizer(held_text)["input_ids"], dtype=np.int64)
    model = _model(size, tokenizer)
    start = time.monotonic()
    _fit(model, train_ids, settings)
    model.eval()
    ppl = perplexity(model, held_ids[:32 * settings.seq_len], settings.seq_len)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8,
                     top_k=40, top_p=0.95, max_length=size.context).save_pretrained(out)
    trained = TrainedLm(path=out, parameters=sum(p.numel() for p in model.parameters()),
                        heldout_perplexity=ppl, train_s=time.monotonic() - start)
    (out / "edgeship-train.json").write_text(json.dumps({
        "corpus": "pydoc_data.topics (Python language reference)", "size": settings.size,
        "steps": settings.steps, "parameters": trained.parameters,
        "heldout_perplexity": ppl, "train_s": trained.train_s}, indent=2))
    return trained


def _fit(model, ids: np.ndarray, settings: TrainSettings) -> None:
    import torch

    rng = np.random.default_rng(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.05)
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5
                                              * (1 + math.cos(math.pi * s / settings.steps)))
    model.train()
    for step in range(settings.steps):
        batch = torch.from_numpy(_batches(ids, settings, rng))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == settings.steps - 1:
            logger.info("step %d/%d loss %.3f", step + 1, settings.steps, loss.item())
