"""Accuracy gates: the profile's limits applied to a validation's metrics, and nothing that can lie.

A comparison with NaN is False, so `ppl > limit` lets a NaN perplexity through; every metric is therefore first
checked to be finite (a non-finite one fails the target with its own message, gates or not). A profile that
measures accuracy must either set a gate or say `gates: none`; only then does "no gates" count as passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# metric key -> what a user reads in the failure
METRICS = {"ppl": "perplexity", "ppl_increase_pct": "perplexity increase", "kl_mean": "KL divergence",
           "top1_agreement": "top-1 agreement"}
NO_GATES = "none"


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.failures)


def non_finite(metrics: dict[str, Any]) -> list[str]:
    """A message per metric that is NaN or infinite (what a NaN scale or NaN logits produce)."""
    out = []
    for key, label in METRICS.items():
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            out.append(f"{label} is {value} (not finite): the quantized model's outputs contain NaN or inf")
    return out


def evaluate(metrics: dict[str, Any], gates: dict[str, Any] | str | None) -> Verdict:
    """Judge a validation. `gates` is the profile's gates (a dict) or "none" (declared ungated)."""
    failures = non_finite(metrics)
    if failures:
        return Verdict(False, failures)
    if gates == NO_GATES:
        return Verdict(True, ["no gates (the profile says gates: none)"])
    if not has_gate(gates):
        return Verdict(False, ["no gates configured: set validate.accuracy.gates, or `gates: none` to measure "
                               "without gating"])
    limits = gates or {}
    if limits.get("max_ppl_increase_pct") is not None and metrics["ppl_increase_pct"] > limits["max_ppl_increase_pct"]:
        failures.append(f"perplexity +{metrics['ppl_increase_pct']:.2f}% > max {limits['max_ppl_increase_pct']}%")
    if limits.get("max_kl") is not None and metrics["kl_mean"] > limits["max_kl"]:
        failures.append(f"KL {metrics['kl_mean']:.4f} > max {limits['max_kl']}")
    if limits.get("min_top1_agreement") is not None and metrics["top1_agreement"] < limits["min_top1_agreement"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < min {limits['min_top1_agreement']}")
    if failures:
        return Verdict(False, failures)
    return Verdict(True, ["all gates passed"])


def has_gate(gates: dict[str, Any] | str | None) -> bool:
    return isinstance(gates, dict) and any(v is not None for v in gates.values())
