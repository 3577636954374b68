"""toolchain: reproducible, cached, validated builds of quantized LLM checkpoints."""

__version__ = "0.1.0"
