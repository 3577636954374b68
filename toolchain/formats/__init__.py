"""The format registry: canonical quantized form -> the files a serving stack loads, one package per format.

toolchain/formats/<format>/ holds spec.py (torch-free: options, plan checks, methods; its FORMATS entries),
export.py (the export stage), check.py (the validate stage: an independent loader) and what only it needs.
This registry is read at plan time, so it imports the spec modules only. Adding a format: its folder, and its
spec on the import line and in the tuple below.
"""

from __future__ import annotations

from .base import FormatSpec, NoOptions
from .bnb import spec as bnb
from .compressed_tensors import spec as compressed_tensors
from .gguf import spec as gguf
from .gptq import spec as gptq
from .ollama import spec as ollama
from .onnx import spec as onnx
from .trtllm import spec as trtllm
from .xinference import spec as xinference

EXPORTERS: dict[str, FormatSpec] = {
    f.name: f for spec in (compressed_tensors, trtllm, gguf, ollama, xinference, onnx, gptq, bnb)
    for f in spec.FORMATS
}

__all__ = ["EXPORTERS", "FormatSpec", "NoOptions"]
