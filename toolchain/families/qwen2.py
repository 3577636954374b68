"""Qwen2 and Qwen2.5: a Llama block with a bias on q, k and v (hard-coded in transformers' Qwen2Attention; none on
o_proj). The small ones (0.5B-3B) tie the embedding. Sliding-window attention only with use_sliding_window:
true (no released Qwen2.5 checkpoint sets it): refused. llama.cpp arch `qwen2`, q/k rows not permuted."""

from __future__ import annotations

from typing import Any

from .base import K_PROJ, LLAMA_PAIRS, Q_PROJ, V_PROJ, Family

_BASE: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
                         "bos_token_id": 151643, "eos_token_id": 151643}

FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    bias=(Q_PROJ, K_PROJ, V_PROJ),
    sliding_window="flag",
    # yarn is how Qwen2.5 documents 128K context (a rope_scaling added by the user): a fixed frequency rescaling
    # with an attention factor, which transformers applies; dynamic and longrope are refused.
    rope_types=("default", "yarn"),
    smoothing=LLAMA_PAIRS,
    gguf_arch="qwen2",
    shapes={
        # Qwen/Qwen2.5-7B config.json
        "qwen2.5-7b": {**_BASE, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                       "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                       "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 28,
                       "tie_word_embeddings": False},
        "qwen2-tiny": {**_BASE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                       "max_position_embeddings": 2048, "tie_word_embeddings": True},
    },
)
