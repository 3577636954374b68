"""Hugging Face decoder blocks one at a time: build a block from the config with transformers' own class, load its
weights from any `name -> tensor` source, run it, free it. Calibration (toolchain.quant.layerwise) and the
block-streamed validation runner (toolchain.validate.streamed) both stream a model through these functions, so
whatever a family's block computes (Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's layout) is
transformers' code, the same in both.

    hf_config(config)                       transformers config from a config.json dict or a model directory
    load_block(cfg, weights, i, dev, dt)    decoder layer i with its weights (every parameter must be found)
    block_kwargs(cfg, seq, dev, dt)         what block(x, **kwargs) needs: RoPE (cos, sin), positions, no mask
    final_norm(cfg, weight, dev, dt)        the model's last RMSNorm
    run_block(block, x, kwargs)             the block's output hidden states
    free(dev)                               give a freed block's memory back to the device

Attention runs through sdpa with no mask: causal (is_causal), plain attention. That is what every family we accept
computes (toolchain.families refuses sliding windows shorter than the context at plan time).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

WeightSource = Callable[[str], torch.Tensor]


def modeling(model_type: str) -> Any:
    """transformers' modeling module of a model type (e.g. transformers.models.qwen3.modeling_qwen3)."""
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def class_ending(module: Any, suffix: str) -> type:
    found = [getattr(module, n) for n in dir(module) if n.endswith(suffix) and not n.startswith("_")]
    if not found:
        raise ValueError(f"{module.__name__} has no *{suffix} class")
    return min(found, key=lambda c: len(c.__name__))  # Qwen3DecoderLayer, not a subclass with a longer name


def hf_config(config: dict[str, Any] | Path) -> Any:
    """The transformers config of a config.json (a dict, or the directory holding it), set for sdpa attention."""
    from transformers import AutoConfig

    if isinstance(config, Path):
        cfg = AutoConfig.from_pretrained(config)
    else:
        d = {k: v for k, v in config.items() if k != "quantization_config"}  # the weights we feed are dense
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    cfg._attn_implementation = "sdpa"  # with no mask, sdpa is causal (is_causal) and needs no (seq, seq) mask
    return cfg


def load_block(cfg: Any, weights: WeightSource, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Decoder layer `index` built by transformers' class for cfg.model_type, with every parameter from
    `weights("model.layers.{index}.<name>")`, on `device` in `dtype`, in eval mode."""
    layer_cls = class_ending(modeling(cfg.model_type), "DecoderLayer")
    with torch.device("meta"):
        block = layer_cls(cfg, index)
    prefix = f"model.layers.{index}."
    state = {k: weights(prefix + k).to(device=device, dtype=dtype) for k, _ in block.named_parameters()}
    block.load_state_dict(state, assign=True, strict=True)
    return block.eval()


def rotary(cfg: Any, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for positions 0..seq_len-1, shaped (1, seq, head_dim): broadcast over the batch. The family's
    own rotary class, so rope scaling (llama3, yarn) is transformers'."""
    rope_cls = class_ending(modeling(cfg.model_type), "RotaryEmbedding")
    rope = rope_cls(config=cfg).to(device)
    pos = torch.arange(seq_len, device=device)[None]
    cos, sin = rope(torch.empty(1, device=device, dtype=dtype), pos)
    return cos, sin


def block_kwargs(cfg: Any, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of block(x, ...) for windows of seq_len tokens starting at position 0."""
    return {"position_embeddings": rotary(cfg, seq_len, device, dtype), "attention_mask": None,
            "position_ids": torch.arange(seq_len, device=device)[None]}


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def final_norm(cfg: Any, weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> nn.Module:
    norm_cls = class_ending(modeling(cfg.model_type), "RMSNorm")
    norm = norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps).to(device=device, dtype=dtype)
    norm.weight.data = weight.to(device=device, dtype=dtype)
    return norm


def head_weight_name(cfg: Any) -> str:
    """Where lm_head's weight is: the embedding's when tied."""
    return "model.embed_tokens.weight" if getattr(cfg, "tie_word_embeddings", False) else "lm_head.weight"


def pick_device(device: str | None, field: str = "device") -> torch.device:
    """`auto`: CUDA when torch sees a GPU, else the CPU. An explicit cuda without one is bad input (`field` says
    which setting asked for it)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from .errors import MissingToolError

        raise MissingToolError(f"{field}: {device}, but torch sees no CUDA device here; use auto or cpu")
    return torch.device(device)


def free(dev: torch.device, collect: bool = False) -> None:
    """Return a freed block's memory to the device. Tensors go by reference counting; a full gc.collect() per block
    cost 0.4 s with a transformers model loaded beside (35 s of the CPU demo's validation), so it runs on CUDA
    (where the cached blocks must be released for the memory bound to hold) or when asked (`collect`: calibration,
    whose hooks and method state may hold cycles)."""
    if collect or dev.type == "cuda":
        gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
