"""Mistral (Mistral-7B-v0.3, Ministral): a Llama block without biases; `sliding_window` on every layer. We
implement plain causal attention only, so a window that is null or covers the whole context
(max_position_embeddings) is accepted and a shorter one (Mistral-7B-v0.1's 4096 of 32768) refused. llama.cpp
converts Mistral as `llama` (its LlamaModel, q/k permuted)."""

from __future__ import annotations

from .base import LLAMA_PAIRS, Family

FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    architectures=("MistralForCausalLM",),
    bias=(),  # MistralAttention and MistralMLP: bias=False hard-coded
    sliding_window="whole-context",
    rope_types=("default",),
    smoothing=LLAMA_PAIRS,
    gguf_arch="llama",
    gguf_permute_qk=True,
    shapes={
        # mistralai/Mistral-7B-v0.3 config.json
        "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                       "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
                       "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                       "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
        "mistral-tiny": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                         "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
                         "max_position_embeddings": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                         "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    },
)
