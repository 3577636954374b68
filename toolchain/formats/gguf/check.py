"""Validate a GGUF artifact: transformers' GGUF loader (gguf-py's dequantizer, its own inverse of llama.cpp's
q/k permutation) reads it back; every weight must equal what the IR says the file holds, the tokenizer must
encode like the source's, then its logits are scored against the reference (finish_validation).

What the file must hold is derived here from the IR alone, not from the exporter's code:
  direct Q4_0/Q8_0   (codes - zero) * fp16(scale)
  direct Q4_1        (codes + 8) * fp16(scale) + fp16(-(zero + 8) * scale)
  F32 / F16 / BF16   our dequantized weight, cast
  re-quantized       gguf-py's quantize -> dequantize of our dequantized weight (the export said so)
and must match bit for bit (tolerance 0); the distance to the IR's exact weights is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...ir import IRReader, QuantizedLinear, default_g_idx
from ...stage import StageContext
from ...validate.accuracy import finish_validation, hf_logits, hf_model_weights
from ...validate.compare import WeightComparison, max_abs_diff
from .spec import BLOCK, FILE_NAME

# llama.cpp and gguf-py dequantize in float32: d (and m) widened from their stored float16, times the code.
ARITHMETIC = ("float32: (codes - zero) * float32(fp16 d) (+ fp16 m for Q4_1), as llama.cpp and gguf-py dequantize; "
              "F16/BF16/F32 tensors widened exactly")

PROBE_TEXT = "Hello world! 1234 numbers, ünïcödé, tabs\tand  spaces.\nNew line: <|im_start|> end."


def expected_weight(q: QuantizedLinear, gtype: str, mode: str) -> torch.Tensor:
    """The dense weight (HF row order) a correct GGUF of this type holds for one IR layer."""
    import gguf

    out_f, in_f = q.shape
    if mode == "direct":
        g = q.g_idx.long() if q.g_idx is not None else default_g_idx(in_f, q.meta.get("group_size"))
        s = q.scale.float()
        s = s[:, g] if s.dim() == 2 else s.reshape(1, 1).expand(out_f, in_f)
        z = torch.zeros_like(s) if q.zero is None else (
            q.zero.float()[:, g] if q.zero.dim() == 2 else q.zero.float().reshape(1, 1).expand(out_f, in_f))
        c = q.codes.float()
        d = s.half().float()
        if gtype == "Q4_1":
            return (c + 8) * d + (-(z + 8) * s).half().float()
        return (c - z) * d
    w = q.dequantize()
    if gtype == "F32":
        return w
    if gtype == "F16":
        return w.half().float()
    if gtype == "BF16":
        return w.bfloat16().float()
    qtype = gguf.GGMLQuantizationType[gtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


def _gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def gguf_conformance(model, ir_dir: Path, gguf_path: Path, export_info: dict[str, Any]) -> dict[str, Any]:
    """Every quantized layer and every plain tensor as loaded vs what the IR says the file must hold."""
    ir = IRReader(ir_dir)
    types = _gguf_types(gguf_path)
    from .export import tensor_name_map
    from .spec import gguf_arch

    tmap = tensor_name_map(gguf_arch(ir.config), ir.config["num_hidden_layers"])
    requantized = set(export_info.get("requantized_layers", []))
    params = dict(model.named_parameters(remove_duplicate=False))
    check = WeightComparison(ARITHMETIC)
    ir_err = 0.0
    for name in ir.layers:
        gname = tmap.get_name(name) + ".weight"
        gtype = types[gname]
        q = ir.layer(name)
        direct = gtype in ("Q4_0", "Q4_1", "Q8_0") and name not in requantized
        if direct and not _aligned(q):
            direct = False
        exp = expected_weight(q, gtype, "direct" if direct else "other")
        got = params[f"{name}.weight"].detach().float()
        check.add(name, got, exp)
        ir_err = max(ir_err, max_abs_diff(got, q.dequantize()))
    for name in ir.plain_names():
        t = ir.tensors.get(name).float()
        gtype = types[tmap.get_name(name, try_suffixes=(".weight", ".bias"))]
        exp = {"F32": t, "F16": t.half().float(), "BF16": t.bfloat16().float()}[gtype]
        check.add(name, params[name].detach().float(), exp)
    return check.result(ir_max_abs_err=ir_err, compared_to="the IR with the GGUF type's stated rounding (fp16 "
                        "d/m, F16 cast, gguf-py requant)")


def _aligned(q: QuantizedLinear) -> bool:
    g = q.g_idx.long() if q.g_idx is not None else default_g_idx(q.shape[1], q.meta.get("group_size"))
    if q.shape[1] % BLOCK:
        return False
    b = g.reshape(-1, BLOCK)
    return bool((b == b[:, :1]).all())


def tokenizer_check(export_dir: Path, ir_dir: Path, dataset: Path | None) -> dict[str, Any] | None:
    """The GGUF's tokenizer (as transformers rebuilds it) must encode like the source's, and carry the same
    chat template. None when the IR has no tokenizer."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from .export import chat_template_of

    if not (ir_dir / "tokenizer.json").is_file() and not (ir_dir / "tokenizer.model").is_file():
        return None
    fields = GGUFReader(str(export_dir / FILE_NAME)).fields
    tmpl = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    if fields["tokenizer.ggml.model"].contents() == "llama":
        return {**spm_check(fields, ir_dir), "chat_template_equal": tmpl == chat_template_of(ir_dir)}
    ours = AutoTokenizer.from_pretrained(ir_dir)
    theirs = AutoTokenizer.from_pretrained(export_dir, gguf_file=FILE_NAME)
    text = PROBE_TEXT + (dataset.read_text(encoding="utf-8")[:20000] if dataset and dataset.is_file() else "")
    a = ours(text, add_special_tokens=False).input_ids
    b = theirs(text, add_special_tokens=False).input_ids
    mismatch = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if mismatch is None and len(a) != len(b):
        mismatch = min(len(a), len(b))
    return {"tokens_compared": len(a), "first_mismatch": mismatch,
            "chat_template_equal": tmpl == chat_template_of(ir_dir)}


def spm_check(fields, ir_dir: Path) -> dict[str, Any]:
    """A SentencePiece vocabulary read back against the sentencepiece library's own view of tokenizer.model
    (pieces and scores by id). transformers' GGUF converter is no oracle here: it drops llama.cpp's
    add_space_prefix and swaps bos/eos in the tokenizer it builds (transformers 5.17)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ir_dir / "tokenizer.model"))
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    n = sp.get_piece_size()
    mismatch = next((i for i in range(n) if tokens[i] != sp.id_to_piece(i) or scores[i] != sp.get_score(i)), None)
    return {"tokens_compared": n, "first_mismatch": mismatch, "compared_to": "sentencepiece (pieces, scores)"}


def load_gguf_model(export_dir: Path, file_name: str = FILE_NAME):
    import os

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(export_dir, gguf_file=file_name, dtype=torch.float32)
    return model.eval()


def validate_gguf(ctx: StageContext, export_dir: Path, export_info: dict[str, Any]) -> dict[str, Any]:
    """Shared by the gguf, ollama and xinference(gguf) validators."""
    import transformers

    ir_dir = ctx.inputs["quantize"]
    model = load_gguf_model(export_dir)
    conformance = gguf_conformance(model, ir_dir, export_dir / FILE_NAME, export_info)
    dataset = ctx.data.get("dataset")
    tok = tokenizer_check(export_dir, ir_dir, dataset)
    if tok is not None:
        conformance["tokenizer"] = tok
        if tok["first_mismatch"] is not None or not tok["chat_template_equal"]:
            return {"format": ctx.config["format"], "conformance": conformance, "passed": False, "status": "failed",
                    "reason": f"GGUF tokenizer differs from the source's (first mismatching token "
                              f"{tok['first_mismatch']}, chat template equal: {tok['chat_template_equal']})"}
    loader = f"transformers {transformers.__version__} GGUF loader (gguf-py dequantize, float32)"
    requantized = export_info.get("requantized_layers") or []
    ungated = (f"{len(requantized)} layers re-quantized by the exporter into the GGUF type (declared in the "
               "export; compared above with that re-quantization)") if requantized else None
    return finish_validation(ctx, loader, conformance, hf_logits(model), hf_model_weights(model),
                             fidelity_ungated=ungated)


def run_validate(ctx: StageContext) -> dict[str, Any]:
    info = ctx.input_manifests["export"].get("info", {})
    result = validate_gguf(ctx, ctx.inputs["export"], info)
    (ctx.out / "gguf_conformance.json").write_text(json.dumps(result.get("conformance"), indent=2))
    return result
