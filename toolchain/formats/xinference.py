"""IR -> an Xinference custom model: another target's artifact plus the `model.json` that registers it
(`xinference register --model-type LLM --file model.json --persist`, custom model JSON v2).

The payload is written by the wrapped exporter itself (option `of:`, with its own options under `payload:`),
into this same directory, and model.json points at it:
  of: gguf                model_format ggufv2, quantization = the GGUF type (Q4_1, ...), model_file_name_template
                          model.gguf: Xinference's llama.cpp engine
  of: gptq                model_format gptq, quantization Int4/Int8: vLLM, SGLang, transformers engines
  of: compressed-tensors  model_format pytorch (quantization none), FP8 included: Xinference has no
                          compressed-tensors format; its vLLM/SGLang engines read the checkpoint's
                          quantization_config themselves (vllm/core.py leaves `quantization` unset for pytorch,
                          but sets quantization=fp8 for model_format fp8, which vLLM then refuses)
model_uri is file://<this artifact's absolute path in the store> (Xinference refuses relative URIs): register
the file where the store lives, or rewrite model_uri after moving the directory.
The chat template, stop strings and stop token ids come from the source tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BuildError, InputError, MissingToolError
from ..stage import load_entry

if TYPE_CHECKING:
    from ..stage import StageContext

MODEL_JSON = "model.json"
WRAPS = ("gguf", "gptq", "compressed-tensors")


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
        from . import EXPORTERS

        EXPORTERS[self.of].options.model_validate(self.payload)
        return self


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """The wrapped format's own plan-time checks, so `of: gptq` with fp8 fails before quantizing."""
    from . import EXPORTERS

    of = options.get("of", "gguf")
    wrapped = EXPORTERS[of]
    method = quantize_spec.method
    if "*" not in wrapped.methods and method not in wrapped.methods:
        raise InputError(f"targets: xinference (of: {of}) cannot hold quantize.method {method} "
                         f"({of} holds {', '.join(wrapped.methods)})")
    if wrapped.plan_check:
        load_entry(wrapped.plan_check)(quantize_spec, model_config, options.get("payload", {}))


# -- model.json --------------------------------------------------------------------------------------------

def size_in_billions(cfg: dict[str, Any]) -> int | str:
    """Parameters in billions as Xinference spells them: an int, or "0_135" for 0.135."""
    from ..arch import linear_shapes

    h = cfg["hidden_size"]
    n = sum(o * i for _n, o, i in linear_shapes(cfg))
    if cfg.get("tie_word_embeddings"):
        n -= cfg["vocab_size"] * h  # lm_head is the embedding
    n += cfg["vocab_size"] * h + (2 * cfg["num_hidden_layers"] + 1) * h
    b = n / 1e9
    b = round(b) if b >= 10 else round(b, 1) if b >= 1 else round(b, 3)  # measured, not the marketing name
    return int(b) if b == int(b) and b >= 1 else str(b).replace(".", "_")


def format_and_quantization(of: str, payload_info: dict[str, Any], scheme: dict[str, Any]) -> tuple[str, str]:
    if of == "gguf":
        return "ggufv2", payload_info["type"]
    if of == "gptq":
        return "gptq", f"Int{scheme['bits']}"
    # compressed-tensors, FP8 included, is `pytorch`: Xinference's vLLM engine turns model_format fp8 into
    # quantization=fp8, which vLLM refuses for a compressed-tensors checkpoint (rule xinference-ct-fp8-format).
    return "pytorch", "none"


def stops(ir_dir: Path) -> tuple[list[str], list[int], str | None]:
    """Stop strings and ids: the chat family's end-of-turn markers and the model's eos ids; and the template."""
    from transformers import AutoTokenizer

    from .gguf import chat_template_of
    from .ollama import match_family

    template = chat_template_of(ir_dir)
    if not (ir_dir / "tokenizer.json").is_file() and not (ir_dir / "tokenizer.model").is_file():
        return [], [], template
    tok = AutoTokenizer.from_pretrained(ir_dir)
    eos_ids: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        f = ir_dir / fname
        v = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
        eos_ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
    strings = [tok.convert_ids_to_tokens(i) for i in dict.fromkeys(eos_ids)]
    found = match_family(tok) if template else None
    if found:
        strings += [s for s in found[0].stops if s in tok.get_vocab()]
    strings = list(dict.fromkeys(strings))
    return strings, [tok.convert_tokens_to_ids(s) for s in strings], template


def model_json(opts: XinferenceOptions, ir_dir: Path, uri_dir: Path, payload_info: dict[str, Any],
               label: str) -> dict[str, Any]:
    from ..ir import IRReader

    ir = IRReader(ir_dir)
    cfg = ir.config
    fmt, quant = format_and_quantization(opts.of, payload_info, ir.scheme)
    stop, stop_ids, template = stops(ir_dir)
    name = opts.model_name or re.sub(r"[^A-Za-z0-9._-]", "-", label)
    spec: dict[str, Any] = {"model_format": fmt, "model_size_in_billions": size_in_billions(cfg),
                            "quantization": quant, "model_uri": f"file://{uri_dir}"}
    if fmt == "ggufv2":
        spec["model_file_name_template"] = payload_info["file"]
    return {
        "version": 2,
        "context_length": opts.context_length or int(cfg.get("max_position_embeddings", 2048)),
        "model_name": name,
        "model_lang": list(opts.model_lang),
        "model_ability": ["generate", "chat"] if template else ["generate"],
        "model_description": f"{cfg.get('model_type')} quantized by toolchain ({ir.scheme.get('method')}), "
                             f"served from {opts.of}",
        "model_family": opts.model_family or name,
        "architectures": cfg.get("architectures"),
        "model_specs": [spec],
        "chat_template": template,
        "stop_token_ids": stop_ids,
        "stop": stop,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    from . import EXPORTERS

    opts = XinferenceOptions.model_validate(ctx.config.get("options", {}))
    wrapped_cfg = {"format": opts.of, "name": ctx.config.get("name"), "options": opts.payload}
    wrapped_ctx = dataclasses.replace(ctx, stage=dataclasses.replace(ctx.stage, config=wrapped_cfg))
    payload_info = load_entry(EXPORTERS[opts.of].export.runner)(wrapped_ctx) or {}
    if (ctx.out / MODEL_JSON).exists():
        raise BuildError(f"the {opts.of} payload already has a {MODEL_JSON}")
    doc = model_json(opts, ctx.inputs["quantize"], ctx.final, payload_info, ctx.stage.target)
    (ctx.out / MODEL_JSON).write_text(json.dumps(doc, indent=2))
    return {**payload_info, "format": "xinference", "payload_format": opts.of,
            "xinference": {k: doc[k] for k in ("model_name", "model_family", "model_ability", "stop")} |
            {"model_format": doc["model_specs"][0]["model_format"],
             "quantization": doc["model_specs"][0]["quantization"], "model_uri": doc["model_specs"][0]["model_uri"],
             "register": f"xinference register --model-type LLM --file {MODEL_JSON} --persist"}}


# -- validation ---------------------------------------------------------------------------------------------

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
    from ..oracles import venv_python

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
