"""Exporters: canonical quantized form -> the files a serving stack loads, one module per format.

This registry is read at plan time, so it must stay light (no torch): each entry names its runner and its
validator by import path, the libraries that shape its bytes (part of the cache key), and a pydantic model
of the options a profile's target may set.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Exporter:
    version: str  # bump when the exporter's output changes
    libs: tuple[str, ...]  # distributions whose versions shape the bytes
    runner: str  # "module:function" writing the artifact
    validator: str  # "module:function" reading it back with an independent loader
    options: type[BaseModel] = NoOptions
    # Quantization schemes the format can hold; checked at plan time. Keys: method names; "*" = any.
    methods: tuple[str, ...] = ("*",)
    notes: str = ""


EXPORTERS: dict[str, Exporter] = {
    "compressed-tensors": Exporter(
        version="1",
        libs=("torch", "safetensors", "compressed-tensors"),
        runner="toolchain.formats.compressed_tensors:run",
        validator="toolchain.validate.accuracy:run_validate",
        methods=("rtn", "fp8", "gptq", "awq"),
        notes="vLLM, SGLang, TensorRT-LLM (PyTorch backend), transformers",
    ),
}
