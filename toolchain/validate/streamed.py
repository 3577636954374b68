"""Scoring a model one decoder block at a time: memory bounded by one block plus the windows' activations.

The same runner design as calibration (toolchain.quant.layerwise): the evaluation windows' token ids go through
the embedding table; then, for each decoder block, its weights are fetched from a weight source, loaded into a
transformers decoder layer on the device, every window's hidden states go through it, and the block is freed.
After the last block, the final norm and lm_head give the logits of each window, computed in float32 (hidden
states and head weight widened), then float32 log-softmax.

Matmuls inside the blocks run in `dtype`: the checkpoint's own (bf16/fp16) by default, so a GPU scores the model as
it will be served; float32 on the CPU for a float32 checkpoint (the demo), as before.
Resident: one block's weights, the hidden states of all windows ((tokens, hidden) in `dtype`), one window's logits.
A weight source is any `name -> tensor` function: the source checkpoint's safetensors (the reference), a loader's
dequantized weights (the artifact as loaded), or our IR's dequantization (toolchain.validate.fidelity).
The result equals whole-model scoring by transformers in the same dtype (tests/test_streamed.py: SmolLM2's
perplexity to 1e-4 relative).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import blocks
from ..blocks import WeightSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    return blocks.pick_device(device, "validate.accuracy.device")


def pick_dtype(dtype: str | None, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """`auto` = the checkpoint's own dtype (what it is served in)."""
    return checkpoint_dtype if dtype in (None, "auto") else DTYPES[dtype]


@dataclass
class StreamStats:
    device: str
    dtype: str
    blocks: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    per_block_seconds: list[float] = field(default_factory=list)

    def protocol(self) -> dict[str, Any]:
        out = {"device": self.device, "dtype": self.dtype, "runner": "toolchain block-streamed (one decoder block "
               "resident), float32 logits and log-softmax"}
        if self.peak_device_bytes is not None:
            out["peak_device_bytes"] = self.peak_device_bytes
        return out


class StreamedModel:
    """A Llama-style causal LM scored block by block from a weight source."""

    def __init__(self, config: dict[str, Any], weights: WeightSource, device: str | None = "auto",
                 dtype: str | None = "auto", checkpoint_dtype: torch.dtype = torch.float32):
        self.cfg = blocks.hf_config(config)
        self.weights = weights
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, checkpoint_dtype)
        self.stats = StreamStats(str(self.device), str(self.dtype).removeprefix("torch."))

    @torch.inference_mode()
    def run(self, windows: list[torch.Tensor], reporter: Any = None) -> None:
        """Every window of token ids (L,) through every block; the final hidden states stay on the device for
        `window_logits`."""
        t_start = time.perf_counter()
        dev, dt = self.device, self.dtype
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        embed = self.weights("model.embed_tokens.weight")
        hidden = [embed[w.long()].to(device=dev, dtype=dt)[None] for w in windows]
        del embed
        kwargs: dict[int, dict[str, Any]] = {}  # per window length: RoPE tables, positions
        label = f"scoring block by block ({dev.type}, {self.stats.dtype})"
        with _task(reporter, label, self.cfg.num_hidden_layers) as task:
            for i in range(self.cfg.num_hidden_layers):
                t0 = time.perf_counter()
                block = blocks.load_block(self.cfg, self.weights, i, dev, dt)
                for j, x in enumerate(hidden):
                    seq = x.shape[1]
                    if seq not in kwargs:
                        kwargs[seq] = blocks.block_kwargs(self.cfg, seq, dev, dt)
                    hidden[j] = blocks.run_block(block, x, kwargs[seq])
                del block
                blocks.free(dev)
                self.stats.per_block_seconds.append(round(time.perf_counter() - t0, 3))
                self.stats.blocks += 1
                task.advance()
        self.norm = blocks.final_norm(self.cfg, self.weights("model.norm.weight"), dev, dt)
        self.head = self.weights(blocks.head_weight_name(self.cfg)).to(device=dev, dtype=torch.float32)
        self.hidden = hidden
        self.stats.seconds = round(time.perf_counter() - t_start, 3)

    @torch.inference_mode()
    def window_logits(self, j: int) -> torch.Tensor:
        """Float32 logits (L, vocab) of window j (its hidden states are released)."""
        h = self.norm(self.hidden[j])[0].float()
        self.hidden[j] = None  # type: ignore[call-overload]
        logits = h @ self.head.T
        if self.device.type == "cuda":
            self.stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        return logits


class _NoTask:
    def advance(self, n: float = 1) -> None:
        pass


def _task(reporter: Any, label: str, total: int):
    from contextlib import nullcontext

    return reporter.task(label, total=total) if reporter is not None else nullcontext(_NoTask())


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)
