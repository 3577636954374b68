"""A checkpoint's linear layers as the built-in runtime computes with them: the stored bytes, not re-quantized.

Reads a compressed-tensors checkpoint (config.json's quantization_config; compressed-tensors'
compressors/pack_quantized/base.py and helpers.py define the layout) or a plain Hugging Face one:
  pack-quantized INT4  weight_packed int32 (N, K/8), code + 8 in 4 bits at bit 4*(k % 8) of word k // 8
                       weight_scale (N, K/group); weight_zero_point int32 (ceil(N/8), K/group) packed the same way
                       along N (asymmetric only); weight_shape
  float-quantized FP8  weight float8_e4m3fn (N, K); weight_scale (N, 1)
  dense                weight (N, K)
The packed INT4 words are used as they are by the kernels (toolchain.engine.kernels), or on a GPU, for groups of
128k, permuted once into mma tiles (Linear.as_tiles: the same values, invertible bit for bit); only the small
zero-point tensor is unpacked. Activation-order checkpoints (weight_g_idx) are refused: the kernels assume groups
in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BuildError


@dataclass
class Linear:
    kind: str  # "dense" | "int4" | "fp8"
    shape: tuple[int, int]  # (out, in)
    weight: torch.Tensor  # dense (N, K) | packed int32 (N, K/8) | float8 (N, K)
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None  # uint8 (N, K/group): zero point + 8
    group: int = 0
    tiled: bool = False  # int4: weight, scale and zero permuted into mma tiles (kernels.tile_int4), same values

    def as_tiles(self) -> Linear:
        """INT4 as mma tiles for the tiled kernel (kernels.tile_int4; a permutation, the same bytes)."""
        from .kernels import tile_int4

        words, scale, zero = tile_int4(self.weight, self.scale, self.zero, self.group)
        return Linear(self.kind, self.shape, words, scale, zero, self.group, tiled=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.zero) if t is not None)

    def to(self, device: torch.device, dtype: torch.dtype) -> Linear:
        """Moved to `device`; dense weights and INT4 scales in the activation dtype `dtype` (the scales are stored
        in the checkpoint's dtype already: bf16 stays bf16), FP8 scales in float32."""
        w = self.weight.to(device, dtype) if self.kind == "dense" else self.weight.to(device)
        scale = None
        if self.scale is not None:
            scale = self.scale.to(device, torch.float32 if self.kind == "fp8" else self.scale.dtype)
        zero = self.zero.to(device) if self.zero is not None else None
        return Linear(self.kind, self.shape, w.contiguous(), scale, zero, self.group, self.tiled)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer stands for, by plain torch (the reference for the kernels)."""
        from .kernels import dequantize_fp8, dequantize_int4, untile_int4, untile_rows

        if self.kind == "int4" and self.tiled:
            zero = untile_rows(self.zero) if self.zero is not None else None
            return dequantize_int4(untile_int4(self.weight), untile_rows(self.scale), zero, self.group, dtype)
        if self.kind == "int4":
            return dequantize_int4(self.weight, self.scale, self.zero, self.group, dtype)
        if self.kind == "fp8":
            return dequantize_fp8(self.weight, self.scale, dtype)
        return self.weight.to(dtype)


def unpack_rows_int4(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """compressed-tensors' zero points: (ceil(rows/8), G) int32 packed along dim 0 -> (rows, G) uint8 (zero + 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (packed.T[:, :, None] >> shifts) & 0xF  # (G, ceil(rows/8), 8)
    return q.reshape(packed.shape[1], -1)[:, :rows].T.contiguous().to(torch.uint8)


def _scheme(cfg: dict[str, Any]) -> dict[str, Any] | None:
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise BuildError(f"the built-in runtime reads compressed-tensors checkpoints, not {qc.get('quant_method')}")
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise BuildError("the built-in runtime supports one compressed-tensors config group")
    w = groups[0]["weights"]
    if w.get("actorder") not in (None, "static"):
        raise BuildError(f"the built-in runtime needs groups in column order (actorder {w['actorder']!r})")
    return {"format": qc.get("format"), "weights": w, "input_activations": groups[0].get("input_activations")}


def load_linear(get, has, name: str, shape: tuple[int, int], scheme: dict[str, Any] | None) -> Linear:
    """One layer from the checkpoint's tensors (`get(name)`, `has(name)`)."""
    if has(f"{name}.weight_packed"):
        w = scheme["weights"]
        if w["num_bits"] != 4 or w["type"] != "int":
            raise BuildError(f"{name}: the built-in runtime runs 4-bit integer packing, not {w['num_bits']}-bit")
        if has(f"{name}.weight_g_idx"):
            raise BuildError(f"{name}: weight_g_idx (activation order) is not supported by the built-in runtime")
        packed, scale = get(f"{name}.weight_packed"), get(f"{name}.weight_scale")
        if packed.shape != (shape[0], shape[1] // 8) or shape[1] % 8:
            raise BuildError(f"{name}: weight_packed {tuple(packed.shape)} does not hold a {shape} weight")
        group = shape[1] // scale.shape[1]
        zero = unpack_rows_int4(get(f"{name}.weight_zero_point"), shape[0]) \
            if has(f"{name}.weight_zero_point") else None
        return Linear("int4", shape, packed, scale, zero, group)
    weight = get(f"{name}.weight")
    if weight.dtype == torch.float8_e4m3fn:
        scale = get(f"{name}.weight_scale")
        if scale.dim() == 2 and scale.shape[1] > 1:
            raise BuildError(f"{name}: block-scaled FP8 (weight_scale {tuple(scale.shape)}) is not run by the "
                             "built-in runtime")
        scale = scale.to(torch.float32).reshape(-1, 1)
        if scale.numel() == 1:
            scale = scale.expand(shape[0], 1).contiguous()
        return Linear("fp8", shape, weight, scale)
    if not weight.is_floating_point():
        raise BuildError(f"{name}: {weight.dtype} weights (W8A8 INT8) are not run by the built-in runtime")
    return Linear("dense", shape, weight)


class Checkpoint:
    """A model's config, its linears (as stored) and its other tensors, read lazily: from a directory
    (`Checkpoint.open`) or from tensors in memory (the benchmark's, packed exactly as the exporter writes them)."""

    def __init__(self, config: dict[str, Any], get, has):
        self.config = config
        self.scheme = _scheme(config)
        self.get, self.has = get, has

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        from ..ir import TensorReader

        tensors = TensorReader(directory)
        return cls(json.loads((directory / "config.json").read_text()), tensors.get, tensors.__contains__)

    @property
    def mode(self) -> str:
        """bf16 | int4-g<group>-<sym|asym> | fp8-w8a8-dynamic."""
        if self.scheme is None:
            return str(self.config.get("torch_dtype") or self.config.get("dtype") or "dense")
        w = self.scheme["weights"]
        if w["type"] == "float":
            return "fp8-w8a8-dynamic" if self.scheme.get("input_activations") else "fp8-weight-only"
        return f"int{w['num_bits']}-g{w.get('group_size')}-{'sym' if w['symmetric'] else 'asym'}"

    def linear(self, name: str, shape: tuple[int, int]) -> Linear:
        return load_linear(self.get, self.has, name, shape, self.scheme)
