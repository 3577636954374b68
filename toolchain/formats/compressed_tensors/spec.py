"""The compressed-tensors format as plans see it (torch-free): the checks a recipe must pass before any work, and
its entry in the format registry (toolchain.formats)."""

from __future__ import annotations

from typing import Any

from ...errors import InputError
from ...stage import StageCode
from ..base import FormatSpec


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """compressed-tensors has no tensor for AWQ's unfolded pre-quant scale: such a checkpoint would load and
    silently compute a different model."""
    if quantize_spec.method == "awq" and not getattr(quantize_spec, "awq_fold", True):
        raise InputError("targets: format compressed-tensors has no place for AWQ's pre_quant_scale; set "
                         "quantize.awq_fold: true (scales folded into the preceding norm/linear), or use format "
                         "trtllm, which keeps it")



FORMATS = (FormatSpec(
    "compressed-tensors",
    # 2: `ignore` written as resolved module names
    export=StageCode("2", ("torch", "safetensors", "compressed-tensors"),
                     "toolchain.formats.compressed_tensors.export:run"),
    validator="toolchain.formats.compressed_tensors.check:run_validate",
    methods=("rtn", "fp8", "gptq", "awq", "smoothquant"),
    notes="vLLM, SGLang, TensorRT-LLM (PyTorch backend), transformers",
    runtimes={"vllm": "LLM(model=dir)", "sglang": "--model-path dir",
              "trtllm": "LLM(model=dir) / trtllm-serve", "transformers": "from_pretrained(dir)"},
    plan_check=plan_check,
),)
