"""The xinference format as plans see it (torch-free): its options, the checks a recipe must pass before any work,
and its entry in the format registry (toolchain.formats)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...errors import InputError, MissingToolError
from ...stage import StageCode
from ..base import FormatSpec

MODEL_JSON = "model.json"
WRAPS = ("gguf", "gptq", "compressed-tensors")


# Xinference's vLLM engine sets quantization="fp8" for model_format fp8, which vLLM refuses against a
# compressed-tensors quantization_config: a compressed-tensors payload must say model_format pytorch. The rule
# (toolchain.runtimes.rules, with its source) and this format's check both read it from here.
CT_FP8_RULE = "xinference-ct-fp8-format"
CT_FP8_WHEN = {"of": "compressed-tensors", "xinference_model_format": "fp8"}
CT_FP8_SAYS = ("Xinference's vLLM engine turns model_format fp8 into quantization=fp8, which vLLM refuses for a "
               "compressed-tensors checkpoint")

class XinferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    of: str = "gguf"  # the target format whose artifact Xinference serves
    payload: dict[str, Any] = {}  # that format's own options
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_family: str | None = None  # Xinference requires one; defaults to model_name
    model_lang: tuple[str, ...] = ("en",)
    context_length: int | None = None  # default: the model's max_position_embeddings
    # Where Xinference is not installed, check model.json against its documented fields instead of Xinference's
    # own model. Off by default: a missing oracle is an error, not a silent weaker pass.
    fallback_check: bool = False

    @model_validator(mode="after")
    def _known_payload(self) -> XinferenceOptions:
        if self.of not in WRAPS:
            raise ValueError(f"of: {self.of!r} is not a format Xinference serves; use one of {', '.join(WRAPS)}")
        from .. import EXPORTERS

        EXPORTERS[self.of].options.model_validate(self.payload)
        return self


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """The wrapped format's own plan-time checks, so `of: gptq` with fp8 fails before quantizing."""
    from .. import EXPORTERS

    of = options.get("of", "gguf")
    wrapped = EXPORTERS[of]
    method = quantize_spec.method
    if "*" not in wrapped.methods and method not in wrapped.methods:
        raise InputError(f"targets: xinference (of: {of}) cannot hold quantize.method {method} "
                         f"({of} holds {', '.join(wrapped.methods)})")
    if wrapped.plan_check:
        wrapped.plan_check(quantize_spec, model_config, options.get("payload", {}))


def format_and_quantization(of: str, payload_info: dict[str, Any], scheme: dict[str, Any]) -> tuple[str, str]:
    if of == "gguf":
        return "ggufv2", payload_info["type"]
    if of == "gptq":
        return "gptq", f"Int{scheme['bits']}"
    # compressed-tensors, FP8 included, is `pytorch`: Xinference's vLLM engine turns model_format fp8 into
    # quantization=fp8, which vLLM refuses for a compressed-tensors checkpoint (rule xinference-ct-fp8-format).
    return "pytorch", "none"


def xinference_python() -> str | None:
    """An interpreter where `xinference` imports: this one, $TOOLCHAIN_XINFERENCE_PYTHON, or the venv scripts/setup
    makes (toolchain.oracles: <venv root>/xinference): Xinference pins a torch of its own."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("xinference") is not None:
        return sys.executable
    if os.environ.get("TOOLCHAIN_XINFERENCE_PYTHON"):
        return os.environ["TOOLCHAIN_XINFERENCE_PYTHON"]
    from ...oracles import venv_python

    python = venv_python("xinference")
    return str(python) if python.is_file() else None


FIELD_CHECK = "the documented custom-model fields (fallback_check: true; Xinference's own model did not run)"


def xinference_version(python: str) -> str:
    import subprocess

    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('xinference'))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else "unknown version"


def checker(options: dict[str, Any]) -> dict[str, Any]:
    """The checker the validate stage will run, part of its key: Xinference's own model (with its version), or,
    only where the profile allows it, the documented-field check. A missing oracle is refused before any work."""
    python = xinference_python()
    if python:
        return {"checker": f"xinference {xinference_version(python)} CustomLLMFamilyV2"}
    if options.get("fallback_check"):
        return {"checker": FIELD_CHECK}
    raise MissingToolError(
        "targets: xinference: model.json is checked by Xinference's own model, and xinference is importable "
        "neither here nor in $TOOLCHAIN_XINFERENCE_PYTHON / ~/.cache/toolchain-venvs/xinference. Run scripts/setup "
        "(it makes that venv: Xinference pins its own torch), or set `fallback_check: true` on the target to "
        "accept the documented-field check instead (the report then says so)")


FORMATS = (FormatSpec(
    "xinference",
    # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
    export=StageCode("2", ("torch", "gguf", "transformers", "safetensors", "compressed-tensors"),
                     "toolchain.formats.xinference.export:run"),
    validator="toolchain.formats.xinference.check:run_validate",
    options=XinferenceOptions,
    methods=("*",),  # the wrapped format's own methods, checked by plan_check
    notes="Xinference custom model: model.json (v2) beside a gguf, gptq or compressed-tensors artifact",
    runtimes={"xinference": "xinference register --model-type LLM --file model.json"},
    plan_check=plan_check,
    families=("llama", "mistral"),
    families_rule="its model.json (chat family, stop tokens, payload) and its check through Xinference's own "
    "model are not yet verified on Qwen models (to be wired with the gguf writer's qwen2/qwen3)",
    checker=checker,
),)
