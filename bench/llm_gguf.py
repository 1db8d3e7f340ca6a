"""The same checkpoint for llama.cpp: a Llama GGUF written with the ``gguf`` package (the
tensor mapping and the Q/K row permutation of llama.cpp's ``convert_hf_to_gguf.py``), then
quantized to Q4_K_M by llama.cpp itself (``llama_model_quantize``). The F32 file is checked
against the PyTorch model's logits before it is quantized."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(checkpoint: Path, cfg: dict):
    from safetensors.numpy import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if "lm_head.weight" in state and not cfg.get("tie_word_embeddings"):
        yield "output.weight", state["lm_head.weight"]
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] != ["model", "layers"]:
            continue
        i, rest = parts[2], ".".join(parts[3:-1])
        if rest == "self_attn.q_proj":
            value = _permute(value, cfg["num_attention_heads"])
        elif rest == "self_attn.k_proj":
            value = _permute(value, cfg["num_key_value_heads"])
        yield f"blk.{i}.{NAMES[rest]}.weight", value


def _vocab(writer, checkpoint: Path, cfg: dict) -> None:
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    special = {t["id"] for t in tok.get("added_tokens", [])}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if vocab[t] in special else 1 for t in tokens])
    merges = tok["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])


def write_f32(checkpoint: Path, out: Path) -> Path:
    import gguf

    cfg = json.loads((checkpoint / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
    w.add_rope_freq_base(float(rope))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _vocab(w, checkpoint, cfg)
    for name, value in _tensors(checkpoint, cfg):
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize_q4_k_m(src: Path, out: Path, threads: int = 2) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return out


def all_logits(path: Path, windows: list[np.ndarray]) -> list[np.ndarray]:
    """Logits of every position of each window (llama.cpp, logits_all)."""
    from llama_cpp import Llama

    n = max(len(w) for w in windows)
    llm = Llama(model_path=str(path), n_ctx=n + 8, logits_all=True, verbose=False,
                n_batch=n + 8, n_threads=2)
    out = []
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        out.append(np.array(llm.scores[:len(w)], dtype=np.float32))
    return out
