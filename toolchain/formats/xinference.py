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
import importlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BuildError, InputError, MissingToolError

if TYPE_CHECKING:
    from ..run import StageContext

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


def _entry(ref: str) -> Any:
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn)


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
        _entry(wrapped.plan_check)(quantize_spec, model_config, options.get("payload", {}))


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


def final_dir(ctx: StageContext) -> Path:
    """Where this stage's artifact will live once committed (the store renames tmp/<key>.* to objects/..)."""
    from ..store import Store

    if ctx.out.parent.name != "tmp":
        raise BuildError(f"xinference export: unexpected staging directory {ctx.out}")
    return Store(ctx.out.parent.parent).object_dir(ctx.stage.key)


def run(ctx: StageContext) -> dict[str, Any]:
    from . import EXPORTERS

    opts = XinferenceOptions.model_validate(ctx.config.get("options", {}))
    wrapped_cfg = {"format": opts.of, "name": ctx.config.get("name"), "options": opts.payload}
    wrapped_ctx = dataclasses.replace(ctx, stage=dataclasses.replace(ctx.stage, config=wrapped_cfg))
    payload_info = _entry(EXPORTERS[opts.of].runner)(wrapped_ctx) or {}
    if (ctx.out / MODEL_JSON).exists():
        raise BuildError(f"the {opts.of} payload already has a {MODEL_JSON}")
    doc = model_json(opts, ctx.inputs["quantize"], final_dir(ctx), payload_info, ctx.stage.name.split(":")[-1])
    (ctx.out / MODEL_JSON).write_text(json.dumps(doc, indent=2))
    return {**payload_info, "format": "xinference", "payload_format": opts.of,
            "xinference": {k: doc[k] for k in ("model_name", "model_family", "model_ability", "stop")} |
            {"model_format": doc["model_specs"][0]["model_format"],
             "quantization": doc["model_specs"][0]["quantization"], "model_uri": doc["model_specs"][0]["model_uri"],
             "register": f"xinference register --model-type LLM --file {MODEL_JSON} --persist"}}


# -- validation ---------------------------------------------------------------------------------------------

ABILITIES = {"embed", "generate", "chat", "tools", "vision", "audio", "omni", "reasoning", "hybrid"}
FORMATS = {"pytorch", "gptq", "awq", "fp4", "fp8", "bnb", "ggufv2", "mlx"}

_XINFERENCE_CHECK = """
import json, sys
from xinference.model.llm.llm_family import CustomLLMFamilyV2
fam = CustomLLMFamilyV2.parse_raw(sys.stdin.read())
spec = fam.model_specs[0]
print(json.dumps({"model_format": spec.model_format, "quantization": spec.quantization,
                  "model_uri": spec.model_uri, "model_family": fam.model_family}))
"""


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


def schema_check(doc: dict[str, Any], expected_checker: str | None = None) -> dict[str, Any]:
    """model.json against Xinference's own pydantic model (CustomLLMFamilyV2.parse_raw, what `xinference
    register` runs); against the documented fields only when the plan chose that fallback."""
    import subprocess

    python = xinference_python()
    if expected_checker is not None and expected_checker != FIELD_CHECK and not python:
        return {"checked_by": None, "parsed": None,
                "problems": [f"the plan chose {expected_checker}, but xinference is no longer importable"]}
    if python:
        r = subprocess.run([python, "-c", _XINFERENCE_CHECK], input=json.dumps(doc), capture_output=True,
                           text=True, timeout=300)
        problems = [] if r.returncode == 0 else [" | ".join(r.stderr.strip().splitlines()[-4:]) or
                                                  f"exit {r.returncode}"]
        parsed = json.loads(r.stdout) if r.returncode == 0 else None
        return {"checked_by": f"xinference CustomLLMFamilyV2 ({python})", "problems": problems, "parsed": parsed}
    problems = []
    if doc.get("version") != 2:
        problems.append("version must be 2")
    for key in ("model_name", "model_family"):
        if not isinstance(doc.get(key), str):
            problems.append(f"{key} must be a string")
    if not set(doc.get("model_ability", [])) <= ABILITIES:
        problems.append(f"model_ability {doc.get('model_ability')} outside {sorted(ABILITIES)}")
    if not isinstance(doc.get("model_lang"), list):
        problems.append("model_lang must be a list")
    specs = doc.get("model_specs") or []
    if not specs:
        problems.append("model_specs is empty")
    for s in specs:
        if s.get("model_format") not in FORMATS:
            problems.append(f"model_format {s.get('model_format')!r}")
        if not isinstance(s.get("quantization"), str) or not isinstance(s.get("model_size_in_billions"), int | str):
            problems.append("quantization must be a string, model_size_in_billions an int or a string")
        if s.get("model_format") == "ggufv2" and not isinstance(s.get("model_file_name_template"), str):
            problems.append("ggufv2 needs model_file_name_template")
    if not all(isinstance(i, int) for i in doc.get("stop_token_ids") or []):
        problems.append("stop_token_ids must be integers")
    return {"checked_by": FIELD_CHECK, "problems": problems, "parsed": None}


def model_json_check(export_dir: Path, ir_dir: Path, info: dict[str, Any], expected_checker: str | None = None
                     ) -> dict[str, Any]:
    """Schema, then what it must say about this artifact: its URI, file, format/quantization and stops."""
    from transformers import AutoTokenizer

    from .gguf import chat_template_of

    doc = json.loads((export_dir / MODEL_JSON).read_text())
    result = schema_check(doc, expected_checker)
    problems = result["problems"]
    spec = doc["model_specs"][0]
    from ..runtimes.rules import RULES

    facts = {"of": info.get("payload_format"), "xinference_model_format": spec.get("model_format")}
    problems += [f"{r.says} [rule {r.id}]" for r in RULES
                 if r.runtime == "xinference" and r.applies("xinference", facts)]
    uri = spec.get("model_uri", "")
    target = Path(uri.removeprefix("file://"))
    if not uri.startswith("file:///") or not target.is_dir() or not target.samefile(export_dir):
        problems.append(f"model_uri {uri} is not this artifact ({export_dir})")
    if spec["model_format"] == "ggufv2":
        if not (export_dir / spec.get("model_file_name_template", "")).is_file():
            problems.append(f"model_file_name_template {spec.get('model_file_name_template')} is not a file")
    elif not (export_dir / "config.json").is_file():
        problems.append("no config.json beside model.json for a pytorch-style format")
    from ..ir import IRReader

    want = format_and_quantization(info["payload_format"], info, IRReader(ir_dir).scheme)
    if (spec["model_format"], spec["quantization"]) != want:
        problems.append(f"model_format/quantization {spec['model_format']}/{spec['quantization']} "
                        f"do not describe the payload ({want[0]}/{want[1]})")
    if doc.get("chat_template") != chat_template_of(ir_dir):
        problems.append("chat_template differs from the source's")
    if doc.get("stop"):
        tok = AutoTokenizer.from_pretrained(ir_dir)
        ids = [tok.convert_tokens_to_ids(s) for s in doc["stop"]]
        if ids != doc.get("stop_token_ids"):
            problems.append(f"stop_token_ids {doc.get('stop_token_ids')} are not the ids of stop {doc['stop']}")
    return result


def run_validate(ctx: StageContext) -> dict[str, Any]:
    """model.json checked (by Xinference's own model where installed), then the payload by its own validator."""
    from . import EXPORTERS

    info = ctx.input_manifests["export"].get("info", {})
    check = model_json_check(ctx.inputs["export"], ctx.inputs["quantize"], info, ctx.config.get("checker"))
    if check["problems"]:
        return {"format": ctx.config["format"], "model_json": check, "passed": False, "status": "failed",
                "reason": "model.json: " + "; ".join(check["problems"])[:500]}
    result = _entry(EXPORTERS[info["payload_format"]].validator)(ctx)
    return {**result, "model_json": check}
