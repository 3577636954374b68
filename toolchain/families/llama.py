"""Llama (1, 2, 3, 3.1; SmolLM2 and other Llama-shaped models): the reference family. attention_bias from the
config puts a bias on all four attention projections; llama.cpp permutes q/k rows (its rotary pairs are
interleaved, HF's are split in halves)."""

from __future__ import annotations

from typing import Any

from .base import LLAMA_PAIRS, Family

_BASE: dict[str, Any] = {
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

FAMILY = Family(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    bias="config",
    # linear and llama3 (Llama-3.1/3.2) are position-independent frequency rescalings that transformers and every
    # loader here apply from the config; dynamic NTK and longrope change with the sequence length: refused.
    rope_types=("default", "linear", "llama3"),
    smoothing=LLAMA_PAIRS,
    gguf_arch="llama",
    gguf_permute_qk=True,
    # Shapes of real models (from their published config.json), for synthetic sources.
    shapes={
        "llama-2-7b": {**_BASE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                       "max_position_embeddings": 4096, "rope_theta": 10000.0},
        "llama-2-70b": {**_BASE, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                        "max_position_embeddings": 4096, "rope_theta": 10000.0},
        "llama-2-13b": {**_BASE, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                        "max_position_embeddings": 4096, "rope_theta": 10000.0},
        "llama-3-8b": {**_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                       "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                       "eos_token_id": 128001, "rms_norm_eps": 1e-5},
        "smollm2-135m": {**_BASE, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                         "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                         "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
        # Small enough for unit tests: every code path of a Llama in a few MB.
        "llama-tiny": {**_BASE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                       "max_position_embeddings": 2048, "rope_theta": 10000.0},
        # The same in whole 128x128 blocks (k/v_proj 128 rows: head_dim 64): block-scaled FP8 needs them.
        "llama-tiny-b128": {**_BASE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                            "max_position_embeddings": 2048, "rope_theta": 10000.0},
    },
)
