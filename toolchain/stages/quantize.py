"""The quantize stage: source safetensors -> canonical quantized form (toolchain.ir), one tensor at a time.

Memory is bounded by one weight plus one output shard: tensors are read lazily and shards are written as they
fill. Calibrated methods (GPTQ, AWQ) plug in here through toolchain.quant.
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch import is_ignored, linear_shapes
from ..ir import IRWriter, TensorReader
from ..run import StageContext
from .source import model_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_dtype_for(q: dict[str, Any], source_dtype: torch.dtype) -> torch.dtype:
    return source_dtype if q["scale_dtype"] == "auto" else DTYPES[q["scale_dtype"]]


def quantize_tensor(w: torch.Tensor, q: dict[str, Any], scale_dtype: torch.dtype):
    from ..quant.fp8 import quantize_fp8
    from ..quant.rtn import quantize_rtn

    if q["method"] == "rtn":
        return quantize_rtn(w, q["bits"], q["group_size"], q["symmetric"], q["strategy"], scale_dtype)
    if q["method"] == "fp8":
        return quantize_fp8(w, q["strategy"], scale_dtype)
    raise ValueError(f"unsupported method {q['method']}")


def run(ctx: StageContext) -> dict[str, Any]:
    q = ctx.config
    src_dir = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
    reader = TensorReader(src_dir)
    cfg = ctx.plan.model_config
    targets = {f"{n}.weight": n for n, _o, _i in linear_shapes(cfg) if not is_ignored(n, q["ignore"])}
    if q["method"] == "none":
        targets = {}
    names = reader.keys()
    writer = None
    n_quantized = 0
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
                writer.add_quantized(targets[name], quantize_tensor(t, q, scale_dtype))
                n_quantized += 1
            else:
                writer.add_plain(name, t)
            task.advance()
    writer.close(src_dir)
    return {"quantized_layers": n_quantized, "plain_tensors": len(names) - n_quantized}
