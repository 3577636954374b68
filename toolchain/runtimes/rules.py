"""What each serving runtime imposes on the artifacts we build: a table, read at plan time.

A rule is data: the runtime, the target formats it concerns, the recipe facts under which that runtime will not
load the artifact (`refuses`) or loads it but computes something other than what we validated (`degrades`), the
fix, and the loader source file it was read from (repository, path, the commit read, what in it). The plan
computes the facts of each target once (`recipe_facts`) and matches every rule against them (`judge`); nothing
here branches on a runtime's name. README's formats table is rendered from the same table (`formats_table`).

Sources were read in the stored snapshots named below (autumn 2026); the commit is the one read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats import EXPORTERS
from ..formats.xinference import spec as xinference_spec

VLLM = "vllm-project/vllm"
SGLANG = "sgl-project/sglang"
TRTLLM = "NVIDIA/TensorRT-LLM"
XINFERENCE = "xorbitsai/inference"


@dataclass(frozen=True)
class Runtime:
    name: str
    version: str  # what the rules below were read from / what is checked here
    site: str


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("vllm", "main, autumn 2026 (vllm-project/vllm@00161ce0)", "https://github.com/vllm-project/vllm"),
    Runtime("sglang", "main, autumn 2026 (sgl-project/sglang@000659ae)", "https://github.com/sgl-project/sglang"),
    Runtime("trtllm", ">= 1.0 PyTorch backend (NVIDIA/TensorRT-LLM@21156a7a)", "https://github.com/NVIDIA/TensorRT-LLM"),
    Runtime("trtllm-build", "TensorRT-LLM <= 1.2.1 (legacy engine build)", "https://github.com/NVIDIA/TensorRT-LLM"),
    Runtime("transformers", "5.17 (the reload check runs it here)", "https://github.com/huggingface/transformers"),
    Runtime("llama.cpp", "gguf-py / llama-cpp-python (checked here when installed)",
            "https://github.com/ggml-org/llama.cpp"),
    Runtime("ollama", "main, autumn 2026 (ollama/ollama@fb307609)", "https://github.com/ollama/ollama"),
    Runtime("xinference", "4.1 (xorbitsai/inference@7ecec16b; its pydantic model runs here)",
            "https://github.com/xorbitsai/inference"),
    Runtime("onnxruntime", "1.2x CPU (runs here)", "https://github.com/microsoft/onnxruntime"),
)}

# Which runtimes each target format is for (the default of a target's `runtimes:`), and how each loads it: declared
# by each format's spec (toolchain.formats).
FORMAT_RUNTIMES: dict[str, dict[str, str]] = {name: f.runtimes for name, f in EXPORTERS.items()}


# -- conditions on facts: a plain value means equality, these mean what they say ---------------------------

@dataclass(frozen=True)
class OneOf:
    values: tuple[Any, ...]

    def __call__(self, v: Any) -> bool:
        return v in self.values


@dataclass(frozen=True)
class NoneOf:
    values: tuple[Any, ...]

    def __call__(self, v: Any) -> bool:
        return v is not None and v not in self.values


@dataclass(frozen=True)
class AtLeast:
    bound: int

    def __call__(self, v: Any) -> bool:
        return v is not None and v >= self.bound


@dataclass(frozen=True)
class NonEmpty:
    def __call__(self, v: Any) -> bool:
        return bool(v)


NOT_SEEN = "read from source, not seen"


@dataclass(frozen=True)
class Rule:
    id: str
    runtime: str
    formats: tuple[str, ...]
    when: dict[str, Any]  # fact -> value or condition; the rule applies when every one holds
    says: str
    fix: str
    source: str
    effect: str = "refuses"  # refuses | degrades (loads, but computes other numbers than we validated)
    # Whether the runtime itself was seen doing what the rule says: "confirmed on GPU (vLLM x.y, date: what)" from
    # scripts/gpu_vllm.py's runs (BENCHMARKS.md), else NOT_SEEN.
    seen: str = NOT_SEEN

    def applies(self, fmt: str, facts: dict[str, Any]) -> bool:
        return fmt in self.formats and all(
            cond(facts.get(k)) if callable(cond) else facts.get(k) == cond for k, cond in self.when.items())


INT_METHODS = ("rtn", "gptq", "awq")

RULES: tuple[Rule, ...] = (
    # vLLM upgrades GPTQ checkpoints to gptq_marlin: GPTQMarlinConfig.TYPE_MAP holds (4, sym) and (8, sym) only;
    # an asymmetric checkpoint is not Marlin-compatible and drops to the legacy fp16-only exllama kernel.
    # None of the vLLM rules has been seen on a GPU yet (seen: NOT_SEEN): scripts/gpu_vllm.py is ready to load the
    # artifacts in vLLM 0.23.0, but no device machine was lent when it was to run (issue 30, 2026-12-08).
    # Read in the vllm 0.23.0 and 0.26.0 wheels (the releases that run on the GPU image's torch 2.11), not seen:
    # gptq_marlin.py is gone; every `quant_method: gptq` checkpoint goes to AutoGPTQConfig
    # (quantization/auto_gptq.py: override_quantization_method), whose TYPE_MAP is still {(4, True), (8, True)} and
    # whose __init__ raises ValueError "Unsupported quantization config: bits=4, sym=False": the symmetric and bits
    # rules hold, as refusals at load. Its scales are still created in params_dtype (scale-dtype rule holds). Group
    # sizes: Marlin keeps MARLIN_SUPPORTED_GROUP_SIZES [-1, 32, 64, 128], but 0.23's kernel list also has
    # TritonW4A16LinearKernel (bf16/fp16, groups -1, 32, 64, 128, 256) and ExllamaLinearKernel (fp16, any group
    # dividing K), so the group-size rule refuses more than 0.23 does.
    Rule("vllm-gptq-symmetric", "vllm", ("gptq",), {"symmetric": False},
         "vLLM's GPTQ path (gptq_marlin) takes symmetric 4/8-bit weights only (TYPE_MAP {(4, True), (8, True)})",
         "set quantize.symmetric: true",
         f"{VLLM} vllm/model_executor/layers/quantization/gptq_marlin.py@00161ce0 (GPTQMarlinConfig.TYPE_MAP)"),
    Rule("vllm-gptq-bits", "vllm", ("gptq",), {"bits": NoneOf((4, 8))},
         "vLLM's GPTQ path (gptq_marlin) takes 4 or 8 bits only", "set quantize.bits: 4 or 8",
         f"{VLLM} vllm/model_executor/layers/quantization/gptq_marlin.py@00161ce0 (GPTQMarlinConfig.TYPE_MAP)"),
    Rule("vllm-gptq-group-size", "vllm", ("gptq",), {"group_size": NoneOf((-1, 32, 64, 128))},
         "vLLM's Marlin kernels take group sizes -1 (per channel), 32, 64 and 128 only",
         "set quantize.group_size to 32, 64 or 128 (or strategy: channel)",
         f"{VLLM} vllm/model_executor/layers/quantization/utils/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)"),
    Rule("vllm-gptq-scale-dtype", "vllm", ("gptq",), {"model_dtype": NoneOf(("float16",))},
         "vLLM creates GPTQ scales in the model dtype (params_dtype), so the checkpoint's float16 scales are "
         "rounded again to the config.json dtype, and the served numbers differ from those validated here",
         "source a float16 checkpoint (config.json torch_dtype float16) to serve exactly what was validated",
         f"{VLLM} vllm/model_executor/layers/quantization/gptq_marlin.py@00161ce0 (create_weights: scales "
         "dtype=params_dtype)", effect="degrades"),
    # SGLang: same Marlin TYPE_MAP in its own GPTQMarlinConfig.
    Rule("sglang-gptq-symmetric", "sglang", ("gptq",), {"symmetric": False},
         "SGLang's GPTQ path (gptq_marlin) takes symmetric 4/8-bit weights only (TYPE_MAP {(4, True), (8, True)})",
         "set quantize.symmetric: true",
         f"{SGLANG} python/sglang/srt/layers/quantization/gptq.py@006d0961 (GPTQMarlinConfig.TYPE_MAP)"),
    Rule("sglang-gptq-group-size", "sglang", ("gptq",), {"group_size": NoneOf((-1, 32, 64, 128))},
         "SGLang's Marlin kernels take group sizes -1, 32, 64 and 128 only",
         "set quantize.group_size to 32, 64 or 128 (or strategy: channel)",
         f"{SGLANG} python/sglang/srt/layers/quantization/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)"),
    # SGLang's compressed-tensors scheme selection: _is_wNa16_group_channel requires weight_quant.symmetric.
    Rule("sglang-ct-w4a16-symmetric", "sglang", ("compressed-tensors",),
         {"method": OneOf(INT_METHODS), "symmetric": False},
         "SGLang's compressed-tensors W4A16/W8A16 scheme requires symmetric weights (_is_wNa16_group_channel); "
         "an asymmetric checkpoint raises 'No compressed-tensors compatible scheme was found'",
         "set quantize.symmetric: true",
         f"{SGLANG} python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py@000659ae "
         "(_is_wNa16_group_channel)"),
    # TensorRT-LLM's compressed-tensors reader maps one config group to a QuantAlgo: it reads
    # input_activations["strategy"] for every non-MXFP4 group (a weight-only group has null there) and takes
    # 8-bit weights only per channel with per-token activations, or per block.
    Rule("trtllm-ct-weight-only", "trtllm", ("compressed-tensors",), {"weight_only": True},
         "TensorRT-LLM's compressed-tensors reader has no weight-only INT path (it reads input_activations, null "
         "in a W4A16 checkpoint)",
         "use the trtllm target (ModelOpt W4A16_AWQ, symmetric) for TensorRT-LLM, or method: fp8 with strategy: "
         "channel",
         f"{TRTLLM} tensorrt_llm/models/quant_config_utils.py@21156a7a (_quant_config_from_config_group)"),
    # ... and it never reads weights.type: an 8-bit per-channel group is FP8_PER_CHANNEL_PER_TOKEN, so int8
    # codes would be taken for E4M3 bytes.
    Rule("trtllm-ct-int8", "trtllm", ("compressed-tensors",), {"method": "smoothquant"},
         "TensorRT-LLM's compressed-tensors reader maps every 8-bit per-channel group to FP8_PER_CHANNEL_PER_TOKEN "
         "without reading weights.type, so a W8A8 INT8 checkpoint's int8 codes would be read as FP8",
         "serve W8A8 INT8 with vLLM or SGLang, or use method: fp8 for TensorRT-LLM",
         f"{TRTLLM} tensorrt_llm/models/quant_config_utils.py@21156a7a (_quant_config_from_config_group)"),
    Rule("trtllm-ct-fp8-per-tensor", "trtllm", ("compressed-tensors",), {"method": "fp8", "strategy": "tensor"},
         "TensorRT-LLM's compressed-tensors reader takes FP8 weights per channel (with per-token activations) or "
         "per block only, not per tensor",
         "set quantize.strategy: channel",
         f"{TRTLLM} tensorrt_llm/models/quant_config_utils.py@21156a7a (_quant_config_from_config_group)"),
    # compressed-tensors `ignore`: exact module names or `re:` patterns (vLLM should_ignore_layer /
    # find_matching_patterns; TensorRT-LLM _matches_target). A bare last name ("down_proj") matches nothing.
    Rule("ct-ignore-exact-names", "vllm", ("compressed-tensors",), {"ignore_not_exact": NonEmpty()},
         "vLLM matches compressed-tensors `ignore` entries as exact module names or re: patterns only",
         "write resolved module names (the exporter does; this fires only if it did not)",
         f"{VLLM} vllm/model_executor/layers/quantization/compressed_tensors/utils.py (should_ignore_layer)"),
    Rule("ct-ignore-exact-names-trtllm", "trtllm", ("compressed-tensors",), {"ignore_not_exact": NonEmpty()},
         "TensorRT-LLM matches compressed-tensors `ignore` entries as exact module names or re: patterns only",
         "write resolved module names (the exporter does; this fires only if it did not)",
         f"{TRTLLM} tensorrt_llm/models/quant_config_utils.py@21156a7a (_matches_target)"),
    # Legacy checkpoint: exclude_modules names layers by their index within a pipeline stage's rank file, while
    # our exclusions are global layer indices; with pp_size > 1 they cannot be expressed.
    Rule("trtllm-legacy-pp-exclusions", "trtllm-build", ("trtllm-ckpt",),
         {"pp_size": AtLeast(2), "decoder_exclusions": NonEmpty()},
         "a legacy checkpoint split into pipeline stages cannot express a per-layer exclusion (exclude_modules "
         "uses stage-local layer indices, ours are global)",
         "set pp_size: 1 (tensor parallelism only), or quantize every decoder layer (ignore: [lm_head])",
         f"{TRTLLM} tensorrt_llm/models/modeling_utils.py (QuantConfig.is_module_excluded_from_quantization: "
         "fnmatch on the rank's module names, whose layer indices are local to its pipeline stage)"),
    # Xinference's vLLM engine sets quantization="fp8" for model_format fp8, which vLLM then refuses against a
    # compressed-tensors quantization_config: a compressed-tensors payload must say model_format pytorch.
    Rule(xinference_spec.CT_FP8_RULE, "xinference", ("xinference",), xinference_spec.CT_FP8_WHEN,
         xinference_spec.CT_FP8_SAYS,
         "declare model_format: pytorch (the exporter does; this fires only if it did not)",
         f"{XINFERENCE} xinference/model/llm/vllm/core.py@7ecec16b (model_format == 'fp8' -> quantization fp8)"),
    # vllm 0.23.0 and 0.26.0 (wheels read 2026-12-08, not run) still ship quantization/bitsandbytes.py with
    # BitsAndBytesConfig registered in get_quantization_config: for those releases this rule refuses what they
    # would load (given the bitsandbytes package). Not changed without a load seen; see issue 30's report.
    # Stock vLLM dropped its in-tree bitsandbytes loader (issue 9's reading of vLLM main; the vLLM copies
    # readable here still carry quantization/bitsandbytes.py, so this is not rechecked against the newest source).
    Rule("vllm-bnb-plugin", "vllm", ("bnb",), {"method": "nf4"},
         "stock vLLM has no bitsandbytes loader: this checkpoint needs a bitsandbytes plugin for vLLM",
         "serve it with transformers (or install a vLLM bitsandbytes plugin), or quantize with method: gptq/awq "
         "for vLLM",
         f"{VLLM} vllm/model_executor/layers/quantization/bitsandbytes.py (removed from stock vLLM)"),
)


# -- the facts of a target's recipe -----------------------------------------------------------------------

def recipe_facts(q: Any, fmt: str, options: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """What the rules look at, derived once from the quantize section, the target and the model's config."""
    from .. import arch

    shapes = arch.linear_shapes(cfg) if cfg else []
    group = q.group_size if q.strategy == "group" else (-1 if q.strategy == "channel" else None)
    excluded = [n for n, _o, _i in shapes if n != "lm_head" and arch.is_ignored(n, q.ignore)]
    names = {n for n, _o, _i in shapes}
    written_ignore = arch.resolved_ignore(cfg, q.ignore) if cfg else list(q.ignore)
    facts = {
        "format": fmt, "method": q.method, "bits": q.bits, "symmetric": q.symmetric, "strategy": q.strategy,
        "group_size": group if q.method in INT_METHODS else None,
        "weight_only": q.method in INT_METHODS,
        "model_dtype": cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
        "pp_size": options.get("pp_size", 1), "decoder_exclusions": excluded,
        "ignore_not_exact": [e for e in written_ignore if not e.startswith("re:") and e not in names],
    }
    if fmt == "xinference":
        from ..formats.xinference.spec import format_and_quantization

        of = options.get("of", "gguf")
        facts["of"] = of
        if of != "gguf":
            facts["xinference_model_format"] = format_and_quantization(of, {}, {"method": q.method, "bits": q.bits})[0]
    return facts


def judge(fmt: str, facts: dict[str, Any]) -> list[dict[str, Any]]:
    """For each runtime the format is for: will it load the artifact, and by which rules not."""
    out = []
    for name, how in FORMAT_RUNTIMES[fmt].items():
        hits = [r for r in RULES if r.runtime == name and r.applies(fmt, facts)]
        refusals = [r for r in hits if r.effect == "refuses"]
        out.append({
            "runtime": name, "version": RUNTIMES[name].version, "how": how, "loads": not refusals,
            "rules": [{"id": r.id, "effect": r.effect, "says": r.says, "fix": r.fix, "source": r.source}
                      for r in hits],
        })
    return out


def refusal_message(label: str, fmt: str, verdict: dict[str, Any], named: bool = True) -> str:
    """Exit-2 text: the YAML path, the runtime with its version, the rule with its source, and the fix."""
    r = next(x for x in verdict["rules"] if x["effect"] == "refuses")
    what = (f"{verdict['runtime']} ({verdict['version']}), named in runtimes, will not load this {fmt} artifact"
            if named else f"no runtime {fmt} is for would load this artifact; {verdict['runtime']} "
                          f"({verdict['version']}) will not")
    alternative = f"; or drop {verdict['runtime']} from runtimes" if named else ""
    return (f"targets{label}.runtimes: {what}: {r['says']} [rule {r['id']}, source {r['source']}]. "
            f"Fix: {r['fix']}{alternative}")


def summary(verdicts: list[dict[str, Any]]) -> str:
    """One line: `vllm, transformers load it; sglang will not (rule ...)`."""
    yes = [v["runtime"] for v in verdicts if v["loads"]]
    no = [v for v in verdicts if not v["loads"]]
    parts = []
    if yes:
        parts.append(f"{', '.join(yes)} load it")
    for v in no:
        r = next(x for x in v["rules"] if x["effect"] == "refuses")
        parts.append(f"{v['runtime']} will not: {r['says']} (fix: {r['fix']})")
    for v in verdicts:
        for r in v["rules"]:
            if r["effect"] == "degrades":
                parts.append(f"{v['runtime']} caveat: {r['says']}")
    return "; ".join(parts)


# -- README -------------------------------------------------------------------------------------------------

def formats_table() -> str:
    """README's "Runtimes and their rules" table, rendered from this module (tests check they agree)."""
    lines = ["| target | runtimes (default `runtimes:`) | what a runtime refuses or changes (rule id: source) |",
             "|---|---|---|"]
    for fmt, runtimes in FORMAT_RUNTIMES.items():
        rules = [r for r in RULES if fmt in r.formats]
        text = "<br>".join(f"{r.runtime} {'refuses' if r.effect == 'refuses' else 'changes'}: {r.says} "
                           f"(`{r.id}`: {r.source.split('@')[0].split(' (')[0]})" for r in rules) or "none known"
        lines.append(f"| `{fmt}` | {', '.join(runtimes)} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":  # regenerate README's table: python -m toolchain.runtimes.rules
    print(formats_table())
