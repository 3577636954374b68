"""The format registry: canonical quantized form -> the files a serving stack loads, one package per format.

toolchain/formats/<format>/ holds spec.py (torch-free: options, plan checks, methods; its FORMATS entries),
export.py (the export stage), check.py (the validate stage: an independent loader) and what only it needs.
This registry is read at plan time, so it imports the spec modules only. Adding a format: its folder, and its
spec on the import line and in the tuple below.
"""

from __future__ import annotations

from .base import FormatSpec, NoOptions

# Bound under *_spec names: `gguf` etc. stay the packages (import toolchain.formats.gguf.export works).
from .bnb import spec as bnb_spec
from .compressed_tensors import spec as compressed_tensors_spec
from .gguf import spec as gguf_spec
from .gptq import spec as gptq_spec
from .ollama import spec as ollama_spec
from .onnx import spec as onnx_spec
from .trtllm import spec as trtllm_spec
from .xinference import spec as xinference_spec

EXPORTERS: dict[str, FormatSpec] = {
    f.name: f for spec in (compressed_tensors_spec, trtllm_spec, gptq_spec, gguf_spec, ollama_spec, xinference_spec,
                           onnx_spec, bnb_spec)
    for f in spec.FORMATS
}

__all__ = ["EXPORTERS", "FormatSpec", "NoOptions"]
