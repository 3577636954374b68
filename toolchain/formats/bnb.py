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

import functools
import importlib.metadata
import importlib.util
import json
from typing import TYPE_CHECKING, Any

from ..errors import BuildError, InputError, MissingToolError

if TYPE_CHECKING:
    from ..stage import StageContext

CPU_TILE_ROWS = 32  # bitsandbytes' _convert_weight_packed_for_cpu block_n
INSTALL = "pip install bitsandbytes==0.50.2"


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    from ..arch import is_ignored, linear_shapes

    q = quantize_spec
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingToolError(f"quantize.method nf4 and format bnb need bitsandbytes: {INSTALL}")
    quantized = [(n, o, i) for n, o, i in linear_shapes(model_config) if not is_ignored(n, q.ignore)]
    if any(n == "lm_head" for n, _o, _i in quantized):
        raise InputError("targets: format bnb: vLLM keeps lm_head unquantized in bitsandbytes checkpoints; add "
                         "lm_head to quantize.ignore")
    for n, o, i in quantized:
        if i % q.blocksize and (err := straddle_misread(i, q.blocksize)):
            fits = [b for b in (32, 64, 128, 256) if all(ii % b == 0 for _n, _o, ii in quantized)]
            raise InputError(
                f"quantize.blocksize: {q.blocksize} does not divide in_features {i} of {n}, and the installed "
                f"bitsandbytes' CPU NF4 dequantize misreads blocks that straddle rows (off by up to {err:.3g} on a "
                f"probe here: its AVX512 path), so the artifact could not be validated (or run) on this CPU; "
                f"blocksizes that divide every layer: {', '.join(map(str, fits)) or 'none'}")
        if o % CPU_TILE_ROWS:
            raise InputError(f"targets: format bnb: out_features {o} of {n} is not a multiple of {CPU_TILE_ROWS}, "
                             "which bitsandbytes 0.50's AVX512-BF16 CPU matmul needs")


@functools.cache
def straddle_misread(in_features: int, blocksize: int) -> float:
    """How far the installed bitsandbytes' CPU dequantize is from the true NF4 weights on a probe whose blocks
    straddle rows (4 rows of N(0,1), this in_features and blocksize); 0.0 where the kernel reads them right.
    The truth is our plain-torch dequantization, bit-exact to bitsandbytes wherever blocks stay within rows."""
    import torch

    from ..quant.nf4 import quant_state, quantize_nf4

    F = _bnb()
    q = quantize_nf4(torch.randn(4, in_features, generator=torch.Generator().manual_seed(0)), blocksize, False)
    return (F.dequantize_4bit(q.codes, quant_state(q)) - q.dequantize()).abs().max().item()


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise MissingToolError(f"the bnb target needs bitsandbytes: {INSTALL}") from None
    return F


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

    from ..arch import linear_shapes
    from ..ir import IRReader, ShardWriter, copy_model_metadata
    from ..quant.nf4 import quant_state

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
