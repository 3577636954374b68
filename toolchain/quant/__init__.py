"""Numerics that turn a weight into the canonical quantized form (toolchain.ir.QuantizedLinear)."""
