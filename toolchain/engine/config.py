"""The built-in runtime's variant switches as one frozen object: which kernels run, how K is split, how wide the
norm programs are. A model is built from one (`Model(..., config=...)`), and the speed stage writes its canonical
dict into its key, so a figure timed under one variant is never served as cached under another.

Environment variables only set defaults (`EngineConfig.from_env`): TOOLCHAIN_<FIELD> in upper case, e.g.
TOOLCHAIN_SPLIT_NORM=0 or TOOLCHAIN_TILED_GROUPS_PER_SLICE=8; what they set is then in the key like any other
field. Torch-free: planning reads it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import InputError

ENV_PREFIX = "TOOLCHAIN_"


@dataclass(frozen=True)
class EngineConfig:
    """Defaults are the settings measured fastest on the H200 (BENCHMARKS.md, runtime v5)."""

    kernels: bool = True  # the Triton kernels (off: plain torch everywhere, as on a card without Triton)
    int4_tiles: bool = True  # INT4 of groups of 128k as mma tiles, the tiled tensor-core GEMV (kernels.tile_int4)
    dense_gemv: bool = True  # bf16 / fp16 linears of few rows by the Triton GEMV rather than cuBLAS
    split_norm: bool = True  # the decode step's norms by residual_norm, 1 / rms applied by the consumer
    tiled_groups_per_slice: int = 4  # groups of 128 per program of the tiled INT4 kernel (its split of K)
    tiled_max_m: int = 16  # up to this many rows the tiled kernel runs; above, the stored layout's kernels
    norm_block: int = 128  # columns per program of residual_norm
    silu_block: int = 128  # columns per program of silu_product
    attention_warps: int = 4  # warps per program of the decode-attention kernel
    fp8_weight_only_max_m: int = 64  # FP8 weight-only up to this many rows, W8A8 (torch._scaled_mm) above

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise InputError(f"engine setting {f.name}: {value!r} is not a boolean (true/false, 1/0)")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"engine setting {f.name}: {value!r} is not a positive integer")
        for name in ("norm_block", "silu_block"):  # Triton blocks: powers of two
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise InputError(f"engine setting {name}: {value} is not a power of two of at least 16")
        if self.attention_warps not in (1, 2, 4, 8, 16):
            raise InputError(f"engine setting attention_warps: {self.attention_warps} is not 1, 2, 4, 8 or 16")

    def canonical(self) -> dict[str, Any]:
        """The stage-key material: every field, by name."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> EngineConfig:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise InputError(f"no engine setting {', '.join(unknown)} (settings: {', '.join(field_names())})")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineConfig:
        return cls().replace(**dict(data))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """The defaults, each overridden by TOOLCHAIN_<FIELD> where that is set (bad values: InputError)."""
        env = os.environ if environ is None else environ
        changes = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                changes[f.name] = parse_value(f.name, env[name], f"${name}")
        return cls().replace(**changes)

    def with_text(self, text: str) -> EngineConfig:
        """`name=value[+name=value...]` applied to this config (scripts/bench_decode_variants.py's variants)."""
        changes = {}
        for item in filter(None, text.split("+")):
            name, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"engine variant {item!r}: write name=value")
            changes[name.strip()] = parse_value(name.strip(), value.strip(), item)
        return self.replace(**changes)


def field_names() -> list[str]:
    return [f.name for f in fields(EngineConfig)]


def parse_value(name: str, text: str, where: str) -> bool | int:
    """A field's value from text: booleans 1/0/true/false, integers as written (where: what to name in errors)."""
    types = {f.name: f.type for f in fields(EngineConfig)}
    if name not in types:
        raise InputError(f"{where}: no engine setting {name!r} (settings: {', '.join(field_names())})")
    low = text.strip().lower()
    if types[name] == "bool":
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InputError(f"{where}: {text!r} is not a boolean; write 1 or 0")
    try:
        value = float(low)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise InputError(f"{where}: {text!r} is not an integer")
    return int(value)
