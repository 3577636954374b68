"""Model shapes without loading weights: named architectures for synthetic sources, and the linear layers of a
Llama-style decoder computed from its config.json. Used at plan time, so it must stay free of torch."""

from __future__ import annotations

from typing import Any

_LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}

# Shapes of real models (from their published config.json), for synthetic sources.
ARCHS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA_BASE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-70b": {**_LLAMA_BASE, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-2-13b": {**_LLAMA_BASE, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-3-8b": {**_LLAMA_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                   "eos_token_id": 128001, "rms_norm_eps": 1e-5},
    "smollm2-135m": {**_LLAMA_BASE, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    # Small enough for unit tests: every code path of a Llama in a few MB.
    "llama-tiny": {**_LLAMA_BASE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                   "max_position_embeddings": 2048, "rope_theta": 10000.0},
    # The same in whole 128x128 blocks (k/v_proj 128 rows: head_dim 64): block-scaled FP8 needs them.
    "llama-tiny-b128": {**_LLAMA_BASE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                        "max_position_embeddings": 2048, "rope_theta": 10000.0},
}

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


def synthetic_config(arch: str, num_layers: int | None, dtype: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise KeyError(arch)
    cfg = dict(ARCHS[arch])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    cfg["dtype"] = dtype
    return cfg


def head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def linear_shapes(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every nn.Linear in a Llama-style causal LM."""
    if cfg.get("model_type") not in LLAMA_LIKE:
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not supported yet (supported: {sorted(LLAMA_LIKE)})")
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = head_dim(cfg)
    q_out = cfg["num_attention_heads"] * hd
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    out = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj", q_out, h),
            (f"{p}.self_attn.k_proj", kv_out, h),
            (f"{p}.self_attn.v_proj", kv_out, h),
            (f"{p}.self_attn.o_proj", h, q_out),
            (f"{p}.mlp.gate_proj", inter, h),
            (f"{p}.mlp.up_proj", inter, h),
            (f"{p}.mlp.down_proj", h, inter),
        ]
    out.append(("lm_head", cfg["vocab_size"], h))
    return out


def is_ignored(name: str, ignore: tuple[str, ...] | list[str]) -> bool:
    """compressed-tensors' convention: a plain entry matches the module name or its last component;
    `re:<pattern>` is a regular expression."""
    import re

    for pat in ignore:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def resolved_ignore(cfg: dict[str, Any], ignore: tuple[str, ...] | list[str]) -> list[str]:
    """The linears `ignore` leaves unquantized, by their exact module names: what a checkpoint's own ignore list
    must say, since loaders match exact names or re: patterns only (not our bare last-name shorthand)."""
    return [n for n, _o, _i in linear_shapes(cfg) if is_ignored(n, ignore)]


def dense_params(cfg: dict[str, Any]) -> int:
    """Parameters of the linears plus the embedding (norms are negligible)."""
    return sum(o * i for _n, o, i in linear_shapes(cfg)) + cfg["vocab_size"] * cfg["hidden_size"]


def fits_in_memory(cfg: dict[str, Any], bytes_per_param: int = 4, fraction: float = 0.4) -> bool:
    """Whether the whole model, dense at `bytes_per_param`, fits in `fraction` of this machine's RAM."""
    import psutil

    return dense_params(cfg) * bytes_per_param < fraction * psutil.virtual_memory().total
