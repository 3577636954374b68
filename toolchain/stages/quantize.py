"""The quantize stage: source safetensors -> canonical quantized form (toolchain.ir).

RTN and FP8 go one tensor at a time: memory is one weight plus one output shard (tensors are read lazily and
shards are written as they fill). Calibrated methods (GPTQ, AWQ) go one decoder block at a time through
toolchain.quant.layerwise, fed with calibration samples from toolchain.quant.calibration.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from ..arch import is_ignored, linear_shapes
from ..errors import BuildError
from ..ir import IRWriter, TensorReader
from ..methods import METHODS
from ..stage import StageContext
from .source import model_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_dtype_for(q: dict[str, Any], source_dtype: torch.dtype) -> torch.dtype:
    return source_dtype if q["scale_dtype"] == "auto" else DTYPES[q["scale_dtype"]]


def run(ctx: StageContext) -> dict[str, Any]:
    q = ctx.config
    method = METHODS[q["method"]]
    src_dir = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
    if method.calibrated:
        return run_calibrated(ctx, src_dir)
    reader = TensorReader(src_dir)
    # Elementwise IEEE arithmetic (RTN, FP8: min/max, one division, round-half-even, casts): a GPU gives the same
    # bytes, many times faster on a 7B model.
    device = "cuda" if method.same_bytes_on_gpu and torch.cuda.is_available() else "cpu"
    cfg = ctx.model_config
    targets = {f"{n}.weight": n for n, _o, _i in linear_shapes(cfg) if not is_ignored(n, q["ignore"])}
    if method.tensor is None:  # none: every tensor as it is
        targets = {}
    names = reader.keys()
    writer = None
    n_quantized = 0
    errors = []
    with ctx.reporter.task(f"quantize {q['method']}", total=len(names)) as task:
        for name in names:
            t = reader.get(name)
            if writer is None:
                scale_dtype = scale_dtype_for(q, t.dtype)
                scheme = {**q, "scale_dtype": str(scale_dtype).removeprefix("torch."),
                          "source_dtype": str(t.dtype).removeprefix("torch.")}
                writer = IRWriter(ctx.out, scheme)
            if name in targets:
                task.describe(f"quantize {q['method']} {targets[name]}")
                ql = _to_cpu(method.tensor(t.to(device), q, scale_dtype))
                writer.add_quantized(targets[name], ql)
                errors.append(layer_error(targets[name], t, ql))
                n_quantized += 1
            else:
                writer.add_plain(name, t)
            task.advance()
    kv = add_kv_scales(ctx, src_dir, writer)
    writer.close(src_dir)
    return {"quantized_layers": n_quantized, "plain_tensors": len(names) - n_quantized, "layer_errors": errors, **kv}


def add_kv_scales(ctx: StageContext, src_dir, writer: IRWriter) -> dict[str, Any]:
    """quantize.kv_cache: fp8 with a calibration section: per-layer K/V scales calibrated on its samples
    (toolchain.quant.kv_cache), kept in the IR as model.layers.i.self_attn.k_scale / v_scale."""
    q = ctx.config
    if q.get("kv_cache") != "fp8" or not q.get("calibration"):
        return {}
    from ..quant import calibration, kv_cache
    from ..validate.streamed import pick_device

    spec = SimpleNamespace(**q["calibration"])
    ids, info = calibration.token_ids(ctx.data["calibration"], spec.text_field, spec.samples, spec.seq_len,
                                      spec.seed, calibration.load_tokenizer(src_dir), ctx.model_config["vocab_size"])
    reader = TensorReader(src_dir)
    device = q.get("device", "auto")
    scales = kv_cache.calibrate(ctx.model_config, reader.get, ids, str(pick_device(device)), ctx.reporter)
    for name, t in scales.items():
        writer.add_plain(name, t)
    return {"kv_cache": {"scales": "calibrated", "how": kv_cache.KV_CALIBRATION,
                         "samples": f"{spec.samples} x {spec.seq_len} ({info.get('sampling', '')})"}}


def layer_error(name: str, w: torch.Tensor, q: Any) -> dict[str, Any]:
    """||W - dequant(Q)|| / ||W|| of one layer, from the bytes written (the report charts the largest)."""
    w = w.to(torch.float32)
    diff = q.dequantize(torch.float32).reshape(w.shape) - w
    return {"layer": name, "rel_err": float(diff.norm() / w.norm().clamp_min(1e-30))}


def _to_cpu(q):
    from dataclasses import replace

    def cpu(t):
        return None if t is None else t.cpu()

    return replace(q, scale=q.scale.cpu(), codes=cpu(q.codes), zero=cpu(q.zero), g_idx=cpu(q.g_idx),
                   weight_fp8=cpu(q.weight_fp8), extras={k: v.cpu() for k, v in q.extras.items()})


def _scheme(q: dict[str, Any], scale_dtype: torch.dtype, source_dtype: torch.dtype) -> dict[str, Any]:
    return {**q, "scale_dtype": str(scale_dtype).removeprefix("torch."),
            "source_dtype": str(source_dtype).removeprefix("torch.")}


def run_calibrated(ctx: StageContext, src_dir) -> dict[str, Any]:
    """GPTQ / AWQ: calibration samples, then the block-by-block runner."""
    from ..errors import MissingToolError
    from ..quant import calibration
    from ..quant.layerwise import run_layerwise

    q = ctx.config
    spec = SimpleNamespace(**q["calibration"])  # the profile's calibration section (its data: ctx.data)
    cal_src = ctx.data["calibration"]
    cfg = ctx.model_config
    ids, cal_info = calibration.token_ids(cal_src, spec.text_field, spec.samples, spec.seq_len, spec.seed,
                                          calibration.load_tokenizer(src_dir), cfg["vocab_size"])
    if "dataset_sha256" in q["calibration"]:
        cal_info["sha256"] = q["calibration"]["dataset_sha256"]
    text = f", {cal_info['text_tokens']:,} tokens of text" if "text_tokens" in cal_info else ""
    ctx.reporter.info(f"  calibration: {cal_src.label}{text} -> {spec.samples} x {spec.seq_len} tokens "
                      f"(seed {spec.seed}, {cal_info['sampling']})")
    if cal_info.get("preview"):
        ctx.reporter.info(f"  calibration text starts: {cal_info['preview']!r}")
    writer: list[IRWriter] = []

    def make_writer(source_dtype: torch.dtype) -> IRWriter:
        scale_dtype = scale_dtype_for(q, source_dtype)
        writer.append(IRWriter(ctx.out, _scheme(q, scale_dtype, source_dtype)))
        return writer[0]

    args = {**q, "ignore": tuple(q["ignore"]), "layerwise_module": METHODS[q["method"]].layerwise}
    # scale_dtype is resolved against the source dtype inside the runner's writer factory.
    source_dtype = _source_dtype(src_dir)
    args["scale_dtype"] = scale_dtype_for(q, source_dtype)
    planned = q.get("device", "auto")  # resolved at plan time (toolchain.quant.device): it is in the key
    if planned.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"quantize: the plan resolved device {planned} (a CUDA torch and a GPU were found), but "
                         "torch sees no usable GPU; set quantize.device: cpu, or fix the CUDA driver")
    try:
        info = run_layerwise(src_dir, make_writer, ids, args, ctx.reporter, device=planned)
    except ModuleNotFoundError as e:
        if e.name == "toolchain.quant.awq":
            raise MissingToolError("quantize.method awq: toolchain.quant.awq is not in this checkout") from None
        raise
    kv = add_kv_scales(ctx, src_dir, writer[0])
    writer[0].close(src_dir)
    return {**info, "calibration": cal_info, **kv}


def _source_dtype(src_dir) -> torch.dtype:
    """The checkpoint's dtype, from the embedding's safetensors header (no tensor is read)."""
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    with safe_open(str(src_dir / TensorReader(src_dir).weight_map[name]), framework="pt") as h:
        code = h.get_slice(name).get_dtype()
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]
