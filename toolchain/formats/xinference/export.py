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

from ...errors import BuildError
from ...stage import load_entry
from .spec import MODEL_JSON, XinferenceOptions, format_and_quantization

if TYPE_CHECKING:
    from ...stage import StageContext


# -- model.json --------------------------------------------------------------------------------------------

def size_in_billions(cfg: dict[str, Any]) -> int | str:
    """Parameters in billions as Xinference spells them: an int, or "0_135" for 0.135."""
    from ...arch import linear_shapes

    h = cfg["hidden_size"]
    n = sum(o * i for _n, o, i in linear_shapes(cfg))
    if cfg.get("tie_word_embeddings"):
        n -= cfg["vocab_size"] * h  # lm_head is the embedding
    n += cfg["vocab_size"] * h + (2 * cfg["num_hidden_layers"] + 1) * h
    b = n / 1e9
    b = round(b) if b >= 10 else round(b, 1) if b >= 1 else round(b, 3)  # measured, not the marketing name
    return int(b) if b == int(b) and b >= 1 else str(b).replace(".", "_")


def stops(ir_dir: Path) -> tuple[list[str], list[int], str | None]:
    """Stop strings and ids: the chat family's end-of-turn markers and the model's eos ids; and the template."""
    from transformers import AutoTokenizer

    from ..gguf.export import chat_template_of
    from ..ollama.export import match_family

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
    from ...ir import IRReader

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
    from .. import EXPORTERS

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
