"""Exporters: canonical quantized form -> the files a serving stack loads, one module per format.

This registry is read at plan time, so it must stay light (no torch): each entry names its runner and its
validator by import path, the libraries that shape its bytes (part of the cache key), and a pydantic model
of the options a profile's target may set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..stage import StageCode
from . import gguf as _gguf
from . import modelopt as _modelopt
from . import ollama as _ollama
from . import xinference as _xinference


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Exporter:
    export: StageCode  # the export stage: its version (bump when the output changes), libraries, runner
    validator: str  # "module:function" reading it back with an independent loader
    options: type[BaseModel] = NoOptions
    # Quantization schemes the format can hold; checked at plan time. Keys: method names; "*" = any.
    methods: tuple[str, ...] = ("*",)
    notes: str = ""
    # "module:function(quantize_spec, model_config, options)" raising InputError when the format cannot hold the
    # recipe on this model (checked at plan time; must not import torch).
    plan_check: str = ""
    # "module:function(label, options, export_key) -> (Stage, notes)": a stage compiling the export (an engine).
    engine: str = ""
    # "module:function(options) -> dict": which independent checker the validator will run (with its version),
    # put in the validate key so a weaker fallback check never shares a key with the real one.
    checker: str = ""

    @property
    def libs(self) -> tuple[str, ...]:
        return self.export.libs


def check_compressed_tensors(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """compressed-tensors has no tensor for AWQ's unfolded pre-quant scale: such a checkpoint would load and
    silently compute a different model."""
    from ..errors import InputError

    if quantize_spec.method == "awq" and not getattr(quantize_spec, "awq_fold", True):
        raise InputError("targets: format compressed-tensors has no place for AWQ's pre_quant_scale; set "
                         "quantize.awq_fold: true (scales folded into the preceding norm/linear), or use format "
                         "trtllm, which keeps it")


EXPORTERS: dict[str, Exporter] = {
    "compressed-tensors": Exporter(
        # 2: `ignore` written as resolved module names
        export=StageCode("2", ("torch", "safetensors", "compressed-tensors"),
                         "toolchain.formats.compressed_tensors:run"),
        validator="toolchain.validate.accuracy:run_validate",
        methods=("rtn", "fp8", "gptq", "awq"),
        notes="vLLM, SGLang, TensorRT-LLM (PyTorch backend), transformers",
        plan_check="toolchain.formats:check_compressed_tensors",
    ),
    "trtllm": Exporter(
        export=StageCode("1", ("torch", "safetensors"),
                         "toolchain.formats.trtllm:run_hf"),
        validator="toolchain.validate.modelopt:run_validate_hf",
        options=_modelopt.HFOptions,
        methods=("rtn", "awq", "fp8"),
        notes="TensorRT-LLM >= 1.0 PyTorch backend (LLM(model=dir), trtllm-serve): ModelOpt's HF checkpoint",
        plan_check="toolchain.formats.modelopt:check_hf",
    ),
    "trtllm-ckpt": Exporter(
        export=StageCode("1", ("torch", "safetensors"),
                         "toolchain.formats.trtllm:run_ckpt"),
        validator="toolchain.validate.modelopt:run_validate_ckpt",
        options=_modelopt.CkptOptions,
        methods=("rtn", "awq", "fp8"),
        notes="trtllm-build (TensorRT-LLM <= 1.2): the legacy checkpoint, rank{N}.safetensors",
        plan_check="toolchain.formats.modelopt:check_ckpt",
        engine="toolchain.engines.trtllm_build:engine_stage",
    ),
    "gguf": Exporter(
        # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
        export=StageCode("2", ("torch", "gguf", "transformers"),
                         "toolchain.formats.gguf:run"),
        validator="toolchain.validate.gguf:run_validate",
        options=_gguf.GGUFOptions,
        # int codes map onto Q4_0/Q4_1/Q8_0 blocks; fp8 and nf4 are dequantized (F16) or re-quantized.
        methods=("none", "rtn", "fp8", "gptq", "awq", "nf4"),
        notes="llama.cpp, ollama, LM Studio: one .gguf (F16/BF16/Q8_0/Q4_0/Q4_1, our codes when they map)",
        plan_check="toolchain.formats.gguf:plan_check",
    ),
    "ollama": Exporter(
        # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
        export=StageCode("2", ("torch", "gguf", "transformers"),
                         "toolchain.formats.ollama:run"),
        validator="toolchain.validate.gguf:run_validate_ollama",
        options=_ollama.OllamaOptions,
        methods=("none", "rtn", "fp8", "gptq", "awq", "nf4"),
        notes="ollama: model.gguf + Modelfile (TEMPLATE in Go syntax, SYSTEM, PARAMETER stop, LICENSE)",
        plan_check="toolchain.formats.gguf:plan_check",
    ),
    "xinference": Exporter(
        # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
        export=StageCode("2", ("torch", "gguf", "transformers", "safetensors", "compressed-tensors"),
                         "toolchain.formats.xinference:run"),
        validator="toolchain.validate.xinference:run_validate",
        options=_xinference.XinferenceOptions,
        methods=("*",),  # the wrapped format's own methods, checked by plan_check
        notes="Xinference custom model: model.json (v2) beside a gguf, gptq or compressed-tensors artifact",
        plan_check="toolchain.formats.xinference:plan_check",
        checker="toolchain.formats.xinference:checker",
    ),
    "onnx": Exporter(
        export=StageCode("1", ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"),
                         "toolchain.formats.onnx:run"),
        validator="toolchain.validate.onnx:run_validate",
        methods=("rtn", "gptq", "awq"),  # 4-bit power-of-two groups, AWQ folded: plan_check
        notes="onnxruntime: model.onnx with com.microsoft MatMulNBits (INT4) built from our codes; no KV cache",
        plan_check="toolchain.formats.onnx:plan_check",
    ),
    "gptq": Exporter(
        export=StageCode("1", ("torch", "safetensors"),
                         "toolchain.formats.gptq:run"),
        validator="toolchain.validate.gptq:run_validate",
        # Integer codes only (not fp8/nf4); act-order g_idx included; AWQ only with folded scales (plan_check).
        methods=("rtn", "gptq", "gptq-g_idx", "awq"),
        notes="GPTQ v1 (quant_method gptq): vLLM, SGLang, transformers (optimum + GPTQModel), Xinference `gptq`",
        plan_check="toolchain.formats.gptq:plan_check",
    ),
    "bnb": Exporter(
        export=StageCode("1", ("torch", "safetensors", "bitsandbytes", "transformers"),
                         "toolchain.formats.bnb:run"),
        validator="toolchain.validate.bnb:run_validate",
        methods=("nf4",),
        notes="bitsandbytes NF4 (quant_method bitsandbytes, load_in_4bit): transformers, vLLM, Xinference `bnb`",
        plan_check="toolchain.formats.bnb:plan_check",
    ),
}
