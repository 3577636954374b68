"""What every quantization method shares: the profile fields common to all of them (`quantize:` in YAML) and the
entry a method registers (toolchain.methods). Torch-free: profiles and plans import it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class CalibrationSpec(BaseModel):
    """Token samples that calibrated methods (GPTQ, AWQ) measure activations on (toolchain.quant.calibration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # A .txt file, a .jsonl file (with `text_field`), `hf:<dataset>[:<config>]:<split>` from the local HF
    # datasets cache, or `random` (uniform token ids: speed runs on synthetic models only).
    dataset: str
    text_field: str = "text"
    samples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=8)
    seed: int = 0


class QuantizeBase(BaseModel):
    """The `quantize:` fields every method has. A method's own model adds its `method: Literal[...]` and its own
    options (they sit flat beside these in the YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 4
    group_size: int | None = Field(default=128, description="None with strategy channel/tensor")
    symmetric: bool = True
    strategy: Literal["group", "channel", "tensor"] = "group"
    ignore: tuple[str, ...] = ("lm_head",)
    kv_cache: Literal["fp8"] | None = None
    # Data type the scales are stored in; `auto` follows the source checkpoint's dtype, so that every
    # exporter writes exactly the values the quantizer chose.
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    calibration: CalibrationSpec | None = None
    # Where calibrated methods compute: auto = CUDA when available.
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+", device):
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
        return device

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns_compile(cls, ignore: tuple[str, ...]) -> tuple[str, ...]:
        for entry in ignore:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as e:
                    raise ValueError(f"{entry!r} is not a valid regular expression ({e}); fix the pattern, or give "
                                     "an exact module name") from None
        return ignore

    @model_validator(mode="before")
    @classmethod
    def _no_groups_without_groups(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("strategy") in ("channel", "tensor") and "group_size" not in data:
            data = {**data, "group_size": None}
        return data

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """The options only this method has (beside `method`)."""
        return tuple(f for f in cls.model_fields if f not in QuantizeBase.model_fields and f != "method")


def check_int_recipe(q: QuantizeBase, method: str) -> None:
    """Integer codes in groups or channels: what RTN, GPTQ and AWQ share."""
    if q.bits not in (4, 8):
        raise ValueError(f"{method} supports bits 4 or 8, not {q.bits}")
    if q.strategy == "group" and not q.group_size:
        raise ValueError("strategy group needs group_size (e.g. 64), or use strategy: channel")
    if q.strategy == "group" and (q.group_size or 0) < 8:
        raise ValueError(f"group_size {q.group_size} is too small; use 32, 64 or 128")


def check_calibrated(q: QuantizeBase, method: str) -> None:
    if q.calibration is None:
        raise ValueError(f"method {method} needs a `calibration:` section, e.g. "
                         "calibration: {dataset: data/tinyshakespeare/input.txt, samples: 128, seq_len: 512}")
    if q.strategy == "tensor":
        raise ValueError(f"{method} quantizes per group or per channel, not per tensor")
    check_int_recipe(q, method)


@dataclass(frozen=True)
class Method:
    """A quantization method as the registry knows it: its profile model and how the quantize stage runs it.
    One of `tensor` (one weight at a time) or `layerwise` (block by block on calibration samples)."""

    name: str
    spec: type[QuantizeBase]
    label: str  # how messages name its options: "GPTQ options (method: gptq)"
    # (weight, quantize config, scale dtype) -> QuantizedLinear; imports its numerics when called.
    tensor: Callable[..., Any] | None = None
    layerwise: str = ""  # module of the block-by-block method (toolchain.quant.layerwise's contract)
    # Calibrated methods' code version, in the quantize key as method_version (bump when the output changes);
    # the others are versioned by the quantize stage itself.
    version: str | None = None
    # Libraries that write the quantized bytes themselves: their versions go in the key (quantized_with).
    key_libs: tuple[str, ...] = ()
    # Elementwise IEEE arithmetic: a GPU gives the same bytes, so the quantize stage uses one when present.
    same_bytes_on_gpu: bool = False
    # ModelPack's `precision` of the weights; empty: int<bits>.
    precision: str = ""

    @property
    def calibrated(self) -> bool:
        return bool(self.layerwise)
