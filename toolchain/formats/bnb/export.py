"""IR (NF4 layers) -> a bitsandbytes 4-bit checkpoint: what transformers (`BitsAndBytesConfig`, pre-quantized) and
vLLM (`quantization: bitsandbytes`) load, and Xinference's `bnb` model format.

The layout is the one transformers' own `save_pretrained` writes for a 4-bit model (checked by tests against a
real transformers + bitsandbytes save of the same weights): per quantized linear `<name>`
  <name>.weight                                   uint8 (ceil(out*in/2), 1)  the packed NF4 indices
  <name>.weight.absmax                            float32 (n_blocks,), uint8 with double quant
  <name>.weight.quant_map                         float32 (16,)
  <name>.weight.nested_absmax / .nested_quant_map double quant only
  <name>.weight.quant_state.bitsandbytes__nf4     uint8: JSON of quant_type, blocksize, dtype, shape (+ nested_*)
written from bitsandbytes' own `QuantState.as_dict(packed=True)`, and config.json's quantization_config from
transformers' own `BitsAndBytesConfig` (quant_method bitsandbytes, load_in_4bit, bnb_4bit_quant_type nf4).
Each layer is read back through bitsandbytes (`QuantState.from_dict` + `dequantize_4bit`) before it ships.

Plan-time limits (`plan_check`), from bitsandbytes 0.50 on CPU, where we validate:
- blocks that straddle rows (in_features not a multiple of blocksize) are refused where the installed CPU
  dequantize kernel misreads them, which a probe measures (`straddle_misread`). Why it depends on the machine:
  bitsandbytes' csrc/cpu_ops.cpp (dequantizeBlockwise4bitCpu, 0.50.x) takes an AVX512 path when the CPU has
  AVX512F at run time (and in_features % 16 == 0), which indexes absmax per row (row * (n / blocksize) + k /
  blocksize) and so reads the wrong scale once a block crosses a row: errors of ~2 on N(0,1) weights at
  blocksize 128 with in_features 576. Its scalar path, taken on CPUs without AVX512F, indexes flat blocks and is
  exact. So a build refused on one machine of our kind can pass on another; the export re-reads every layer
  through bitsandbytes either way;
- its AVX512-BF16 matmul repacks weights in tiles of 32 output rows (out_features % 32 == 0);
- vLLM keeps lm_head unquantized for bitsandbytes checkpoints, so a quantized lm_head is refused.
This module is imported at plan time (plan_check): heavy imports stay inside the functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from typing import TYPE_CHECKING, Any

from ...errors import BuildError
from .spec import _bnb

if TYPE_CHECKING:
    from ...stage import StageContext


def quantization_config(dtype: str, double_quant: bool, skip: list[str]) -> dict[str, Any]:
    """config.json's quantization_config, as transformers' BitsAndBytesConfig writes it."""
    import torch
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=getattr(torch, dtype), bnb_4bit_quant_storage=torch.uint8,
                             llm_int8_skip_modules=skip)
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def run(ctx: StageContext) -> dict[str, Any]:
    import torch

    from ...arch import linear_shapes
    from ...ir import IRReader, ShardWriter, copy_model_metadata
    from ...quant.nf4 import quant_state

    F = _bnb()
    ir = IRReader(ctx.inputs["quantize"])
    if not ir.layers or any(m["type"] != "nf4" for m in ir.layers.values()):
        raise BuildError("format bnb holds NF4 layers only (quantize.method nf4)")
    writer = ShardWriter(ctx.out, prefix="model")
    kinds: set[tuple[str, bool]] = set()
    with ctx.reporter.task("export bnb", total=len(ir.layers) + 1) as task:
        for name in ir.plain_names():
            writer.add(name, ir.tensors.get(name))
        task.advance()
        for name in ir.layers:
            q = ir.layer(name)
            state = quant_state(q).as_dict(packed=True)
            # Read back as a loader does: bitsandbytes parses the state, then dequantizes.
            back = F.dequantize_4bit(q.codes, F.QuantState.from_dict(dict(state), device=torch.device("cpu")))
            ours = q.dequantize(back.dtype)
            if not torch.equal(back, ours):
                raise BuildError(f"{name}: bitsandbytes reads back weights that differ from ours by "
                                 f"{(back.float() - ours.float()).abs().max().item():.3g}")
            kinds.add((q.meta["dtype"], q.meta["double_quant"]))
            writer.add(f"{name}.weight", q.codes)
            for k, v in state.items():
                writer.add(f"{name}.weight.{k}", v)
            task.advance()
    if len(kinds) != 1:
        raise BuildError(f"one dtype and double-quant setting per bitsandbytes checkpoint; the IR mixes {kinds}")
    dtype, double_quant = kinds.pop()
    writer.close(hf_layout=True)
    copy_model_metadata(ir.directory, ctx.out)
    skip = sorted(n for n, _o, _i in linear_shapes(ir.config) if n not in ir.layers)
    qcfg = quantization_config(dtype, double_quant, skip)
    config = json.loads((ctx.out / "config.json").read_text())
    config["quantization_config"] = qcfg
    (ctx.out / "config.json").write_text(json.dumps(config, indent=2))
    return {"format": "bnb", "layers": len(ir.layers), "quantization_config": qcfg,
            "bitsandbytes": importlib.metadata.version("bitsandbytes")}
