"""Comparing a loader's weights with ours: like with like, and never fooled by NaN.

Every export self-check and every validator reads weights back through some loader and compares them with the IR.
Two rules, shared here:
- The comparison is made in the arithmetic the consuming loader uses, named in the result (`arithmetic`). For an
  integer layer a loader computes (codes - zero) * scale in some dtype: compressed-tensors in the scale's dtype,
  GPTQ kernels in the activation dtype, llama.cpp in float32. Our `QuantizedLinear.dequantize(dtype)` forms the
  exact product in float32 (a half-precision scale has 8 or 11 significant bits, a code at most 9: the product
  fits float32's 24) and rounds it once to `dtype`, which is what one IEEE multiply in `dtype` gives. So the two
  sides must be equal bit for bit; no tolerance.
- A non-finite value (NaN, inf) on either side is a failure of its own. `max |a - b|` over a NaN is NaN, and a
  loop that keeps `err >= worst` or tests `err > 0` lets a NaN through as "no difference".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no inf in `t`. A sum is NaN or inf when any element is (or when it overflows, which the exact
    test then settles): one reduction, where `isfinite(t).all()` writes a boolean tensor first (13x slower on
    SmolLM2's embedding, CPU)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def non_finite_side(theirs: torch.Tensor, ours: torch.Tensor) -> str | None:
    """Which side holds a NaN or an inf: "loaded", "ours", "both", or None."""
    bad_theirs, bad_ours = not all_finite(theirs), not all_finite(ours)
    if bad_theirs and bad_ours:
        return "both"
    return "loaded" if bad_theirs else "ours" if bad_ours else None


def max_abs_diff(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """max |theirs - ours| in float64 (exact for any two float32 values); inf for a shape mismatch or a
    non-finite value on either side."""
    if theirs.shape != ours.shape:
        return float("inf")
    if non_finite_side(theirs, ours):
        return float("inf")
    return _finite_max_abs_diff(theirs, ours)


def _finite_max_abs_diff(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    if theirs.numel() == 0:
        return 0.0
    if theirs.dtype == ours.dtype and torch.equal(theirs, ours):  # the usual case: no float64 copies (20x faster)
        return 0.0
    return (theirs.double() - ours.double()).abs().max().item()


def check_finite(name: str, what: str, **tensors: torch.Tensor) -> None:
    """Raise BuildError naming the tensor when one holds a NaN or an inf (for the exporters' own checks)."""
    from ..errors import BuildError

    for label, t in tensors.items():
        if not all_finite(t):
            n = int((~torch.isfinite(t)).sum())
            raise BuildError(f"{name}: non-finite values (NaN or inf) in {label} ({n} of {t.numel()}) {what}; "
                             "the IR or the export is corrupt")


@dataclass
class WeightComparison:
    """Accumulates per-layer comparisons; `result()` is the validator's conformance record."""

    arithmetic: str  # how both sides were computed, e.g. "bfloat16: (codes - zero) * scale rounded once"
    tolerance: float = 0.0
    layers_checked: int = 0
    max_abs_err: float = 0.0
    worst_layer: str | None = None
    non_finite: list[dict[str, str]] = field(default_factory=list)

    def add(self, name: str, theirs: torch.Tensor, ours: torch.Tensor) -> float:
        self.layers_checked += 1
        side = non_finite_side(theirs, ours)
        if side:
            self.non_finite.append({"layer": name, "side": side})
        if theirs.shape != ours.shape or side:
            err = float("inf")
        else:
            err = _finite_max_abs_diff(theirs, ours)
        if self.worst_layer is None or err > self.max_abs_err:
            self.max_abs_err, self.worst_layer = err, name
        return err

    def failure(self) -> str | None:
        """Why this comparison fails, or None."""
        return conformance_failure(self.result())

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"layers_checked": self.layers_checked, "max_abs_err": self.max_abs_err,
                "worst_layer": self.worst_layer, "tolerance": self.tolerance, "arithmetic": self.arithmetic,
                "non_finite": self.non_finite, **extra}


def conformance_failure(conformance: dict[str, Any]) -> str | None:
    """Why a validator's conformance record fails (non-finite values first, then any difference), or None."""
    bad = conformance.get("non_finite") or []
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"non-finite values (NaN or inf) in {first['layer']}{more} ({first['side']})"
    err = conformance["max_abs_err"]
    if err != err or err > conformance.get("tolerance", 0.0):  # NaN compares false: fail it explicitly
        return f"reloaded weights differ from ours (max {err:.3g} in {conformance['worst_layer']})"
    return None
