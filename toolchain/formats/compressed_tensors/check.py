"""validate:<compressed-tensors target>: the checkpoint reloaded by compressed-tensors (file by file, or through
transformers), compared weight by weight with the IR, then scored against the reference
(toolchain.validate.accuracy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...arch import fits_in_memory
from ...stage import StageContext
from ...validate.accuracy import (
    finish_validation,
    hf_logits,
    hf_model_weights,
    load_hf_model,
    loader_dense_weight,
    scoring_device,
)


def weight_conformance(model, ir_dir: Path, device: str | None = None,
                       keep: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Every quantized layer's weight as the loader materialised it vs our own dequantization, both in the
    arithmetic compressed-tensors uses (the scale's dtype; the model loaded in its checkpoint dtype), bit for bit."""
    from ...ir import IRReader
    from ...validate.compare import WeightComparison
    from .export import ARITHMETIC, consumer_dtype

    ir = IRReader(ir_dir)
    modules = dict(model.named_modules())
    check = WeightComparison(ARITHMETIC.format(dtype=ir.scheme.get("scale_dtype", "float32")))
    for name in ir.layers:
        q = ir.layer(name)
        theirs = loader_dense_weight(modules[name], device)
        check.add(name, theirs, q.dequantize(consumer_dtype(q)).to(theirs.device))
        if keep is not None:  # the runner reuses them (fidelity, scoring) instead of decompressing again
            keep[f"{name}.weight"] = theirs
    return check.result()


def file_conformance(export_dir: Path, ir_dir: Path, reporter) -> dict[str, Any]:
    """Layer by layer, memory bounded: compressed-tensors decompresses each layer from the files on disk."""
    from compressed_tensors.quantization import QuantizationConfig

    from ...ir import IRReader, TensorReader
    from ...validate.compare import WeightComparison
    from .export import ARITHMETIC, consumer_dtype, decompress_layer

    ir = IRReader(ir_dir)
    qc = QuantizationConfig.model_validate(json.loads((export_dir / "config.json").read_text())["quantization_config"])
    if len(qc.config_groups) != 1:
        raise ValueError("file-level check supports one config group")
    scheme = next(iter(qc.config_groups.values()))
    files = TensorReader(export_dir)
    check = WeightComparison(ARITHMETIC.format(dtype=ir.scheme.get("scale_dtype", "float32")))
    with reporter.task("checking layers from the files", total=len(ir.layers)) as task:
        for name in ir.layers:
            q = ir.layer(name)
            stored = {k[len(name) + 1 :]: files.get(k) for k in files.keys() if k.startswith(name + ".")}
            check.add(name, decompress_layer(stored, scheme.model_copy(deep=True), q.shape),
                      q.dequantize(consumer_dtype(q)))
            task.advance()
    return check.result(method="compressed-tensors decompression of each layer read from the files")


def run_validate(ctx: StageContext) -> dict[str, Any]:
    """compressed-tensors: transformers (with its compressed-tensors integration) is the independent loader; its
    weights are compared with ours layer by layer, then scored by the block-streamed runner. A model too large to
    hold (packed) in memory is decompressed layer by layer from the files by the compressed-tensors library
    instead, for the comparison and for the runner alike."""
    if not fits_in_memory(ctx.model_config, bytes_per_param=1):
        conformance = file_conformance(ctx.inputs["export"], ctx.inputs["quantize"], ctx.reporter)
        weights = file_weights(ctx.inputs["export"], ctx.inputs["quantize"], scoring_device(ctx))
        return finish_validation(ctx, "compressed-tensors (per layer, from the files)", conformance, None, weights,
                                 stream_scoring=not _fp8_activations(ctx))
    # In the checkpoint's dtype: transformers would otherwise cast the scales to float32 and decompress in float32,
    # which no runtime does with a bf16/fp16 checkpoint.
    model = load_hf_model(ctx.inputs["export"], dtype="auto")
    # Small models keep the decompressed weights for the runner (a 7B's would not fit beside the model).
    kept = {} if fits_in_memory(ctx.model_config, bytes_per_param=4, fraction=0.1) else None
    conformance = weight_conformance(model, ctx.inputs["quantize"], scoring_device(ctx), kept)
    kv = kv_conformance(model, ctx.inputs["quantize"])
    emulated = vllm_int8_activations(model, ctx.inputs["quantize"])
    if kv is not None:
        conformance = {**conformance, "kv_scales": kv}
        if kv["max_abs_err"] != 0:  # judged a failure by finish_validation
            missing = f"; missing {kv['missing'][0]}" if kv["missing"] else ""
            conformance.update(max_abs_err=kv["max_abs_err"],
                               worst_layer=f"the FP8 KV scales (self_attn.k_scale / v_scale{missing})")
    loader = "transformers" + (f" (W8A8: {emulated} linears' int8 activations rounded as vLLM rounds them)"
                               if emulated else "")
    return finish_validation(ctx, loader, conformance, hf_logits(model),
                             hf_model_weights(model, scoring_device(ctx), kept),
                             stream_scoring=not (_fp8_activations(ctx) or kv is not None))


def vllm_int8_activations(model, ir_dir: Path) -> int:
    """W8A8 INT8 layers: compressed-tensors' forward quantizes their inputs per token with scale amax / 127.5
    (its calculate_qparams: range 255 / 2); vLLM's dynamic_scaled_int8_quant uses amax / 127, and the two models
    differ by about as much as the activation rounding itself on a tiny llama (tests/test_smoothquant.py). So its
    own input quantization is switched off and vLLM's arithmetic put in front of those linears. Returns how many."""
    from ...ir import IRReader
    from ...quant.smoothquant import ACTIVATIONS, fake_act_int8

    ir = IRReader(ir_dir)
    names = [n for n, meta in ir.layers.items() if meta.get("activations") == ACTIVATIONS]
    for name in names:
        module = model.get_submodule(name)
        module.quantization_enabled = False  # weights are already decompressed: this only drops the input quant
        module.register_forward_pre_hook(lambda _m, args: (fake_act_int8(args[0]), *args[1:]))
    return len(names)


def kv_conformance(model, ir_dir: Path) -> dict[str, Any] | None:
    """The FP8 KV scales as the loader holds them (compressed-tensors' self_attn.k_scale / v_scale, which its
    attention hook applies to K and V in the forward, as vLLM does in its cache) vs the IR's; None without."""
    from ...ir import IRReader

    ir = IRReader(ir_dir)
    names = [n for n in ir.plain_names() if n.endswith((".self_attn.k_scale", ".self_attn.v_scale"))]
    if not names:
        return None
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    err = max((float((params[n].float().reshape(-1) - ir.tensors.get(n).float().reshape(-1)).abs().max())
               for n in names if n in params), default=0.0)
    return {"scales": len(names), "missing": missing, "max_abs_err": float("inf") if missing else err,
            "scored_by": "the loader's forward (K and V cast to E4M3 with these scales by compressed-tensors' "
                         "attention hook)"}


def _fp8_activations(ctx: StageContext) -> bool:
    """FP8 and W8A8 INT8 checkpoints quantize activations per token at run time: the loader's own forward
    emulates that, the streamed runner does not, so their accuracy is scored by the loader."""
    from ...ir import IRReader

    ir = IRReader(ctx.inputs["quantize"])
    return ir.scheme.get("method") == "fp8" or any(m.get("activations") for m in ir.layers.values())


def file_weights(export_dir: Path, ir_dir: Path, device: str | None = None) -> Any:
    """A compressed-tensors checkpoint on disk as a weight source: each quantized layer decompressed from its
    stored tensors by the library, the rest read as stored (one tensor in memory at a time)."""
    from compressed_tensors.quantization import QuantizationConfig

    from ...ir import IRReader, TensorReader
    from .export import decompress_layer

    ir = IRReader(ir_dir)
    qc = QuantizationConfig.model_validate(json.loads((export_dir / "config.json").read_text())["quantization_config"])
    scheme = next(iter(qc.config_groups.values()))
    files = TensorReader(export_dir)

    def get(name: str) -> torch.Tensor:
        layer = name.removesuffix(".weight")
        if layer in ir.layers:
            stored = {k[len(layer) + 1 :]: files.get(k).to(device or "cpu") for k in files.keys()
                      if k.startswith(layer + ".")}
            return decompress_layer(stored, scheme.model_copy(deep=True), tuple(ir.layers[layer]["shape"]))
        return files.get(name)

    return get
