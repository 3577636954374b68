"""validate:<xinference target>: model.json checked by Xinference's own model (CustomLLMFamilyV2, in the interpreter
that has xinference) or, where the profile allows it, against the documented fields; then what it must say about
this artifact (URI, file, format/quantization, stops); then the payload by its own format's validator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...stage import StageContext, load_entry
from . import spec
from .spec import CT_FP8_RULE, CT_FP8_SAYS, CT_FP8_WHEN, FIELD_CHECK, MODEL_JSON, format_and_quantization

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


def schema_check(doc: dict[str, Any], expected_checker: str | None = None) -> dict[str, Any]:
    """model.json against Xinference's own pydantic model (CustomLLMFamilyV2.parse_raw, what `xinference
    register` runs); against the documented fields only when the plan chose that fallback."""
    import subprocess

    python = spec.xinference_python()  # through the module: tests stand in for it there
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

    from ..gguf.export import chat_template_of

    doc = json.loads((export_dir / MODEL_JSON).read_text())
    result = schema_check(doc, expected_checker)
    problems = result["problems"]
    spec = doc["model_specs"][0]
    facts = {"of": info.get("payload_format"), "xinference_model_format": spec.get("model_format")}
    if all(facts[k] == v for k, v in CT_FP8_WHEN.items()):  # the rule runtimes.rules cites, from our spec
        problems.append(f"{CT_FP8_SAYS} [rule {CT_FP8_RULE}]")
    uri = spec.get("model_uri", "")
    target = Path(uri.removeprefix("file://"))
    if not uri.startswith("file:///") or not target.is_dir() or not target.samefile(export_dir):
        problems.append(f"model_uri {uri} is not this artifact ({export_dir})")
    if spec["model_format"] == "ggufv2":
        if not (export_dir / spec.get("model_file_name_template", "")).is_file():
            problems.append(f"model_file_name_template {spec.get('model_file_name_template')} is not a file")
    elif not (export_dir / "config.json").is_file():
        problems.append("no config.json beside model.json for a pytorch-style format")
    from ...ir import IRReader

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
    from .. import EXPORTERS

    info = ctx.input_manifests["export"].get("info", {})
    check = model_json_check(ctx.inputs["export"], ctx.inputs["quantize"], info, ctx.config.get("checker"))
    if check["problems"]:
        return {"format": ctx.config["format"], "model_json": check, "passed": False, "status": "failed",
                "reason": "model.json: " + "; ".join(check["problems"])[:500]}
    result = load_entry(EXPORTERS[info["payload_format"]].validator)(ctx)
    return {**result, "model_json": check}
