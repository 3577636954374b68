"""Qwen3 (dense): a Llama block with RMSNorm(head_dim) on each head of q and k after the projection, before RoPE
(q_norm, k_norm), attention_bias from the config (false in every release), head_dim 128 by default.

AWQ: the norms sit after q_proj and k_proj, so no scale may be folded *through* them (e.g. dividing q_proj's rows,
which q_norm would normalize away). The Llama pairs fold none: input_layernorm -> q,k,v scales the projections'
inputs (the norm acts on their outputs), and v -> o goes through v, which has no norm. So the same four pairs hold.
llama.cpp arch `qwen3` with blk.N.attn_q_norm / attn_k_norm, q/k rows not permuted."""

from __future__ import annotations

from typing import Any

from .base import LLAMA_PAIRS, Family

_BASE: dict[str, Any] = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                         "attention_bias": False, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                         "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
                         "bos_token_id": 151643, "eos_token_id": 151645, "vocab_size": 151936,
                         "max_position_embeddings": 40960}

FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    bias="config",
    qk_norm=True,
    sliding_window="flag",
    head_dim_default="128",
    rope_types=("default", "yarn"),  # yarn: Qwen3's documented long-context setting (see qwen2)
    smoothing=LLAMA_PAIRS,
    gguf_arch="qwen3",
    shapes={
        # Qwen/Qwen3-8B and Qwen/Qwen3-0.6B config.json
        "qwen3-8b": {**_BASE, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_window_layers": 36,
                     "tie_word_embeddings": False},
        "qwen3-0.6b": {**_BASE, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "max_window_layers": 28,
                       "tie_word_embeddings": True},
        "qwen3-tiny": {**_BASE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024,
                       "max_position_embeddings": 2048, "tie_word_embeddings": False},
    },
)
