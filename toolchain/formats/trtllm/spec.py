"""NVIDIA ModelOpt's checkpoint layouts, the ones TensorRT-LLM loads: which of our recipes they hold, under which
quant_algo, and the plan-time checks. Light (no torch): the registry and the planner import it.

Two layouts (export.py writes both, check.py reads them back; engine.py compiles the legacy one):
  trtllm       Hugging Face names + hf_quant_config.json + config.json `quantization_config` (quant_method
               "modelopt"): what ModelOpt's `export_hf_checkpoint` writes and TensorRT-LLM's PyTorch backend
               (`LLM(model=dir)`, `trtllm-serve dir`) loads.
  trtllm-ckpt  TensorRT-LLM's legacy checkpoint: config.json + rank{N}.safetensors in TensorRT-LLM's names, split for
               tensor/pipeline parallelism: what `export_tensorrt_llm_checkpoint` writes and `trtllm-build`
               (TensorRT-LLM <= 1.2) compiles into engines.

quant_algo (TensorRT-LLM's QuantAlgo) per recipe:
  fp8 per tensor    FP8                        fp8 weight, one float32 scale; activations quantized per tensor at run
                                               time (dynamic) unless the IR carries a calibrated input_scale
  fp8 per channel   FP8_PER_CHANNEL_PER_TOKEN  one scale per output row; activations per token, dynamic
  fp8 per block     fp8_pb_wo                  float32 scale per 128x128 weight block (weight_scale (out/128,
                                               in/128)); TensorRT-LLM reads it as FP8_BLOCK_SCALES and quantizes
                                               activations in dynamic 1x128 groups (tensorrt_llm/_torch/
                                               model_config.py; ModelOpt's own name is lowercase)
  int4 rtn/awq/gptq W4A16_AWQ                  symmetric codes in [-8, 7], no zero point, float32 scale per (row, group
                                               of 64 or 128), two codes per byte along the OUTPUT dim
`W4A16_AWQ` names TensorRT-LLM's groupwise INT4 weight-only format, not the algorithm that chose the weights:
ModelOpt itself writes it for INT4_BLOCKWISE_WEIGHT_ONLY_CFG (max calibration, no AWQ search), and TensorRT-LLM has
no other name for that format. We write it for RTN too, and record the real method beside it (the `toolchain`
entry of hf_quant_config.json / config.json, and the artifact's manifest).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ... import arch
from ...errors import InputError
from ...stage import StageCode
from ..base import FormatSpec

FP8_MAX = 448.0
# Methods written as groupwise symmetric INT4 (W4A16): GPTQ with static groups has RTN's layout (no g_idx).
INT4_METHODS = ("rtn", "awq", "gptq")
GPTQ_LOADER = "NVIDIA/TensorRT-LLM tensorrt_llm/models/llama/convert.py@0afa06ab load_weights_from_gptq"
# TensorRT-LLM's groupwise INT4 kernels (CUTLASS fpA_intB, FINEGRAINED_SCALE_ONLY) take these group sizes only.
GROUP_SIZES = (64, 128)
# Linears that TensorRT-LLM fuses (one GEMM per group): they share an input, and in the legacy layout one tensor.
FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
INSTALL_TRTLLM = ("install tensorrt_llm<=1.2 from NVIDIA's index on a GPU machine: "
                  "pip install tensorrt_llm==1.2.1 --extra-index-url https://pypi.nvidia.com")


LEGACY_FP8_STATIC = ("targets: trtllm-ckpt: TensorRT-LLM's engine path runs per-tensor FP8 weights with static "
                     "activation scales only (activation_scaling_factor, which trtllm-build requires), and this recipe "
                     "calibrates none; use quantize.strategy: channel (FP8_PER_CHANNEL_PER_TOKEN, dynamic per-token "
                     "activations) or the trtllm target (dynamic per-tensor activations)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Data type of everything that is not quantized (norms, embeddings, lm_head) and of the activations at run time.
# TensorRT-LLM's W4A16 kernels take float16/bfloat16 activations only, so a float32 source is written as
# bfloat16 under `auto` (its norms and embeddings are rounded; the validation measures what that costs).
ExportDtype = Literal["auto", "float16", "bfloat16"]


class HFOptions(_Strict):
    dtype: ExportDtype = "auto"


class EngineOptions(_Strict):
    """`trtllm-build` flags (TensorRT-LLM <= 1.2); all of them are part of the engine's cache key."""

    max_batch_size: int = Field(default=8, ge=1)
    max_input_len: int = Field(default=2048, ge=1)
    max_seq_len: int = Field(default=4096, ge=2)
    max_num_tokens: int = Field(default=8192, ge=1)
    gemm_plugin: str = "auto"
    workers: int = Field(default=1, ge=1)


class CkptOptions(_Strict):
    dtype: ExportDtype = "auto"
    tp_size: int = Field(default=1, ge=1)
    pp_size: int = Field(default=1, ge=1)
    # Given (even `engine: {}`), an engine:<target> stage runs trtllm-build on the checkpoint.
    engine: EngineOptions | None = None


def resolve_dtype(option: str, source_dtype: str) -> str:
    if option != "auto":
        return option
    return source_dtype if source_dtype in ("float16", "bfloat16") else "bfloat16"


def quant_algo(method: str, strategy: str) -> str:
    if method == "fp8":
        return {"channel": "FP8_PER_CHANNEL_PER_TOKEN", "block": "fp8_pb_wo"}.get(strategy, "FP8")
    if method in INT4_METHODS:
        return "W4A16_AWQ"
    raise ValueError(f"no TensorRT-LLM quant_algo for method {method!r}")


# TensorRT-LLM's PyTorch flow has Qwen2/Qwen3 models, but our export and its reload check (ModelOpt's layout) are
# not yet checked on them: q/k/v biases and q/k norms are not written or compared.
HF_FAMILIES_RULE = ("the ModelOpt checkpoint writer and its TensorRT-LLM reload check are wired for Llama-layout "
                    "models only (no q/k/v biases, no q_norm/k_norm yet)")

# -- plan-time checks ------------------------------------------------------------------------------

def check_hf(q: Any, cfg: dict[str, Any], options: dict[str, Any]) -> None:
    """`trtllm` target: can the format hold this recipe on this model?"""
    _check_recipe(q, cfg, "trtllm")


def check_ckpt(q: Any, cfg: dict[str, Any], options: dict[str, Any]) -> None:
    """`trtllm-ckpt` target: the recipe, then the tensor/pipeline split of every layer."""
    _check_recipe(q, cfg, "trtllm-ckpt")
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise InputError(f"targets: trtllm-ckpt writes TensorRT-LLM's Llama layout; model_type "
                         f"{cfg.get('model_type')!r} is not supported (use the trtllm target: HF names)")
    if q.method == "fp8" and q.strategy == "tensor":
        raise InputError(LEGACY_FP8_STATIC)
    if q.method == "fp8" and q.strategy == "block":
        raise InputError("targets: trtllm-ckpt: block-scaled FP8 (FP8_BLOCK_SCALES) is served by TensorRT-LLM's "
                         "PyTorch backend from ModelOpt's HF checkpoint; this toolchain does not write it in the "
                         "legacy trtllm-build layout. Use the trtllm target, or quantize.strategy: channel")
    tp, pp = options.get("tp_size", 1), options.get("pp_size", 1)
    problems = parallel_problems(cfg, q, tp, pp)
    if problems:
        works = [t for t in range(1, 17) if not parallel_problems(cfg, q, t, 1)]
        raise InputError(f"targets: trtllm-ckpt tp_size {tp}, pp_size {pp}: {problems[0]}"
                         f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. "
                         f"tp_size values that work for this model and recipe: {', '.join(map(str, works))}")


def _check_recipe(q: Any, cfg: dict[str, Any], fmt: str) -> None:
    if q.method == "gptq" and q.act_order and not q.static_groups and q.strategy == "group":
        raise InputError(f"targets: {fmt} cannot hold GPTQ act-order groups: TensorRT-LLM's groupwise INT4 "
                         "(W4A16_AWQ, and its GPTQ path W4A16_GPTQ, which reads only qweight/qzeros/scales: "
                         f"{GPTQ_LOADER}) has no per-column group index (g_idx). Set quantize.static_groups: true "
                         "(act-order with groups in column order: the same layout as RTN) or act_order: false")
    if q.method in INT4_METHODS:
        if q.bits != 4:
            raise InputError(f"targets: {fmt} exports INT4 (W4A16) or FP8 weights; INT{q.bits} weight-only is not "
                             "supported: set quantize.bits: 4 or quantize.method: fp8")
        if not q.symmetric:
            raise InputError(f"targets: {fmt} holds symmetric INT4 only (codes in [-8, 7], no zero point: "
                             "has_zero_point false in TensorRT-LLM's W4A16 kernels), so this asymmetric recipe "
                             "cannot be expressed; set quantize.symmetric: true")
        if q.strategy != "group" or q.group_size not in GROUP_SIZES:
            got = f"group_size {q.group_size}" if q.strategy == "group" else f"strategy {q.strategy}"
            raise InputError(f"targets: {fmt} needs INT4 groups of {' or '.join(map(str, GROUP_SIZES))} input "
                             f"columns (TensorRT-LLM's groupwise kernels take no other), got {got}; set "
                             "quantize.strategy: group and quantize.group_size: 64 or 128")
    quantized = [n for n, _o, _i in arch.linear_shapes(cfg) if not arch.is_ignored(n, q.ignore)]
    if "lm_head" in quantized:
        raise InputError(f"targets: {fmt} keeps lm_head unquantized (TensorRT-LLM's ModelOpt formats exclude it); "
                         "add lm_head to quantize.ignore")
    done = set(quantized)
    for i in range(cfg["num_hidden_layers"]):
        for group in FUSED_GROUPS:
            names = [f"model.layers.{i}.{m}" for m in group]
            inside = [n for n in names if n in done]
            if inside and len(inside) != len(names):
                raise InputError(f"targets: {fmt}: TensorRT-LLM runs {', '.join(names)} as one fused GEMM, so they "
                                 f"are quantized together or not at all; quantize.ignore leaves only "
                                 f"{', '.join(inside)} quantized")


def parallel_problems(cfg: dict[str, Any], q: Any, tp: int, pp: int) -> list[str]:
    """Why a tp/pp split of this model does not work (empty: it works). INT4 groups must not straddle ranks: the
    row-parallel layers (o_proj, down_proj: TensorRT-LLM's dense, proj) are split along their input columns."""
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    out = []
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv),
                    ("intermediate_size", cfg["intermediate_size"]), ("vocab_size", cfg["vocab_size"])):
        if n % tp:
            out.append(f"{what} {n} is not divisible by tp_size {tp}")
    if cfg["num_hidden_layers"] % pp:
        out.append(f"num_hidden_layers {cfg['num_hidden_layers']} is not divisible by pp_size {pp}")
    if q.method in INT4_METHODS and q.strategy == "group" and q.group_size:
        for name, _o, in_f in arch.linear_shapes(cfg):
            if arch.is_ignored(name, q.ignore) or not name.endswith(("o_proj", "down_proj")):
                continue
            if in_f % tp or (in_f // tp) % q.group_size:
                fits = [g for g in GROUP_SIZES if in_f % tp == 0 and (in_f // tp) % g == 0]
                out.append(f"{name} has {in_f} input columns, {in_f / tp:g} per rank: not a whole number of "
                           f"INT4 groups of {q.group_size}"
                           f"{f' (group_size {fits[0]} fits)' if fits else ''}")
    return out


def rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 moved rope_theta into rope_parameters; older configs keep it at the top level."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.pop("rope_theta", None)
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind == "default" or not params else params


FORMATS = (
    FormatSpec(
        "trtllm",
        export=StageCode("1", ("torch", "safetensors"), "toolchain.formats.trtllm.export:run_hf"),
        validator="toolchain.formats.trtllm.check:run_validate_hf",
        options=HFOptions,
        methods=("rtn", "awq", "gptq", "fp8"),
        notes="TensorRT-LLM >= 1.0 PyTorch backend (LLM(model=dir), trtllm-serve): ModelOpt's HF checkpoint",
        runtimes={"trtllm": "LLM(model=dir) / trtllm-serve (hf_quant_config.json)"},
        plan_check=check_hf,
        families=("llama", "mistral"),
        families_rule=HF_FAMILIES_RULE,
    ),
    FormatSpec(
        "trtllm-ckpt",
        export=StageCode("1", ("torch", "safetensors"), "toolchain.formats.trtllm.export:run_ckpt"),
        validator="toolchain.formats.trtllm.check:run_validate_ckpt",
        options=CkptOptions,
        methods=("rtn", "awq", "gptq", "fp8"),
        notes="trtllm-build (TensorRT-LLM <= 1.2): the legacy checkpoint, rank{N}.safetensors",
        runtimes={"trtllm-build": "trtllm-build --checkpoint_dir dir"},
        plan_check=check_ckpt,
        families=("llama", "mistral"),
        families_rule="it writes TensorRT-LLM's Llama checkpoint layout (decoder: llama, no biases, no q/k "
        "norms); use the trtllm target (HF names) once it takes the family",
        engine="toolchain.formats.trtllm.engine:engine_stage",
    ),
)
