"""The gguf format as plans see it (torch-free): its options, the checks a recipe must pass before any work, and its
entry in the format registry (toolchain.formats)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ...errors import InputError
from ...stage import StageCode
from ..base import FormatSpec

BLOCK = 32  # every GGUF type used here stores rows in blocks of 32 values
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
FILE_NAME = "model.gguf"


def gguf_arch(model_config: dict[str, Any]) -> str:
    """llama.cpp's general.architecture for this config: its family's (Llama and Mistral `llama`, Qwen2 `qwen2`,
    Qwen3 `qwen3`; llama.cpp's convert_hf_to_gguf.py registers MistralForCausalLM under LlamaModel)."""
    from ...families import family_of

    arch = family_of(model_config).gguf_arch
    if arch is None:
        raise InputError(f"targets: format gguf has no llama.cpp architecture for model_type "
                         f"{model_config.get('model_type')!r}")
    return arch


class GGUFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["auto", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"] = "auto"
    # Refuse anything that is not bit-exact to the IR up to the stated fp16 rounding of d/m.
    exact: bool = False
    # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre); by default the source GGUF's, or detected.
    tokenizer_pre: str | None = None


def exact_types(scheme: dict[str, Any]) -> tuple[str, ...]:
    """GGUF block types that hold every quantized layer of this scheme without re-quantizing, best first.
    act-order (g_idx) can still break the 32-column block alignment; that is checked per layer at export."""
    if scheme.get("method") not in ("rtn", "gptq", "awq"):  # integer codes; fp8 and nf4 are dequantized
        return ()
    strategy, gs = scheme.get("strategy"), scheme.get("group_size")
    if strategy == "group" and (not gs or gs % BLOCK):
        return ()
    bits, symmetric = scheme.get("bits"), scheme.get("symmetric")
    if bits == 4:
        return ("Q4_0", "Q4_1", "Q8_0") if symmetric else ("Q4_1", "Q8_0")
    if bits == 8 and symmetric:
        return ("Q8_0",)
    return ()


def resolve_type(requested: str, scheme: dict[str, Any]) -> str:
    if requested != "auto":
        return requested
    exact = exact_types(scheme)
    return exact[0] if exact else "F16"


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """Fail at plan time for what the GGUF writer would refuse after the quantize stage."""
    quantize = quantize_spec.model_dump(mode="json") if hasattr(quantize_spec, "model_dump") else dict(quantize_spec)
    gguf_arch(model_config)
    from ...arch import linear_shapes
    from ...families import rope_parameters

    rope = rope_parameters(model_config)
    rtype = rope.get("rope_type") or rope.get("type") or "default"
    if rtype != "default":
        # llama.cpp would take yarn as rope.scaling.* keys, but transformers' GGUF loader (our checker) reads none
        # of them back (integrations/ggml.py GGUF_CONFIG_MAPPING): the file could not be verified.
        raise InputError(f"targets: format gguf writes default RoPE only; this model has rope scaling {rtype!r} "
                         "(remove rope_scaling from config.json, or use another format)")

    if quantize.get("method") == "awq" and not quantize.get("awq_fold", True):
        raise InputError("targets: GGUF has no place for AWQ's pre_quant_scale; set quantize.awq_fold: true")
    gtype = resolve_type(options.get("type", "auto"), quantize)
    if gtype in QUANT_TYPES:
        bad = [(n, i) for n, _o, i in linear_shapes(model_config) if i % BLOCK]
        if bad:
            raise InputError(f"targets: GGUF {gtype} stores rows in blocks of {BLOCK}; in_features {bad[0][1]} of "
                             f"{bad[0][0]} is not a multiple (use type: F16)")
    if options.get("exact") and quantize.get("method") not in (None, "none") and gtype != "F32" \
            and gtype not in exact_types(quantize):
        held = ", ".join(exact_types(quantize)) or "none of Q8_0/Q4_0/Q4_1 (use F32, or drop exact)"
        raise InputError(f"targets: gguf type {gtype} cannot hold quantize {quantize.get('method')} "
                         f"bits {quantize.get('bits')} symmetric {quantize.get('symmetric')} group_size "
                         f"{quantize.get('group_size')} exactly (exact: true); types that can: {held}")


FORMATS = (FormatSpec(
    "gguf",
    # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
    export=StageCode("2", ("torch", "gguf", "transformers"), "toolchain.formats.gguf.export:run"),
    validator="toolchain.formats.gguf.check:run_validate",
    options=GGUFOptions,
    # int codes map onto Q4_0/Q4_1/Q8_0 blocks; fp8 and nf4 are dequantized (F16) or re-quantized.
    methods=("none", "rtn", "fp8", "gptq", "awq", "nf4"),
    notes="llama.cpp, ollama, LM Studio: one .gguf (F16/BF16/Q8_0/Q4_0/Q4_1, our codes when they map)",
    runtimes={"llama.cpp": "llama-cli -m model.gguf", "ollama": "FROM ./model.gguf",
              "transformers": "from_pretrained(dir, gguf_file=...) (dequantized on load)"},
    plan_check=plan_check,
),)
