"""The onnx format as plans see it (torch-free): its options, the checks a recipe must pass before any work, and its
entry in the format registry (toolchain.formats)."""

from __future__ import annotations

from typing import Any

from ...errors import InputError, MissingToolError
from ...stage import StageCode
from ..base import FormatSpec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


MODULES = ("onnx", "onnxscript", "onnxruntime")  # exporter (torch.onnx's dynamo path needs onnxscript), checker


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    missing = [m for m in MODULES if not _importable(m)]
    if missing:
        raise MissingToolError(f"targets: the onnx target needs {', '.join(missing)} (missing here): "
                               f"pip install {' '.join(MODULES)}")
    q = quantize_spec
    gs = q.group_size or 0
    if q.bits != 4 or q.strategy != "group" or gs < 16 or gs & (gs - 1):
        raise InputError("targets: onnx (MatMulNBits) needs 4-bit groups of a power-of-two size >= 16 "
                         f"(got bits {q.bits}, strategy {q.strategy}, group_size {q.group_size})")
    if getattr(q, "act_order", False) and not getattr(q, "static_groups", False):
        raise InputError("targets: onnx cannot hold act-order groups (g_idx); set quantize.static_groups: true")
    if q.method == "awq" and not getattr(q, "awq_fold", True):
        raise InputError("targets: onnx has no place for AWQ's pre_quant_scale; set quantize.awq_fold: true")
    if model_config.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3"):
        raise InputError(f"targets: onnx export supports Llama-style decoders, not {model_config.get('model_type')}")


FORMATS = (FormatSpec(
    "onnx",
    export=StageCode("1", ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"),
                     "toolchain.formats.onnx.export:run"),
    validator="toolchain.formats.onnx.check:run_validate",
    methods=("rtn", "gptq", "awq"),  # 4-bit power-of-two groups, AWQ folded: plan_check
    notes="onnxruntime: model.onnx with com.microsoft MatMulNBits (INT4) built from our codes; no KV cache",
    runtimes={"onnxruntime": "InferenceSession(model.onnx)"},
    plan_check=plan_check,
),)
