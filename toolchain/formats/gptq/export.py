"""IR -> GPTQ v1 checkpoint (Hugging Face `quant_method: gptq`, `checkpoint_format: gptq`): what vLLM, SGLang,
transformers (through optimum + GPTQModel) and Xinference's `gptq` model format load.

Per quantized linear `<name>` (b bits, pack factor pf = 32 / b, G groups, weights transposed to (in, out)):
  qweight int32 (in / pf, out)  pf consecutive input rows per word; row j of a word at bits [b*j, b*j + b)
  qzeros  int32 (G, out / pf)   unsigned zero point MINUS ONE (the v1 convention; v2 stores it as is), packed
                                along the output dim the same way
  scales  float16 (G, out)
  g_idx   int32 (in,)           group of each input row: column // group_size, or GPTQ's act-order permutation
  w[i, o] = (q[i, o] - (z[g_idx[i], o])) * scales[g_idx[i], o],  z = stored zero + 1
From our IR (signed codes and zero in [-2^(b-1), 2^(b-1) - 1]): unsigned q = code + 2^(b-1), unsigned z = zero +
2^(b-1); symmetric layers have no zero, so z = 2^(b-1). Per channel and per tensor become one group
(group_size -1).

Two things the format forces:
- Scales are float16. IR scales of another dtype are rounded to float16 here; every check downstream (read-back,
  validator) compares against our dequantization *with those float16 scales*, and the export reports how far
  the rounding moved the weights from the IR (`fp16_scale_max_abs_err`, 0 when the IR's scales are float16).
- v1 cannot store an unsigned zero point of 0 (zero - 1 = -1 borrows from the neighbouring field in loaders that
  add 1 per packed word, and reads as 16 in loaders that add it per field). Such a layer fails the export, naming
  it; symmetric quantization never produces it.
Holds int4/int8 RTN, GPTQ (act-order g_idx included) and AWQ with folded scales; not FP8 or NF4 (the registry's
`methods` refuses those at plan time) and not AWQ's unfolded pre_quant_scale (refused by `plan_check`).

This module is imported at plan time (plan_check): heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError
from .spec import FORMAT_BITS

if TYPE_CHECKING:
    import torch

    from ...ir import IRReader, QuantizedLinear
    from ...stage import StageContext


# -- the numerics of one layer ---------------------------------------------------------------------------------

@dataclass
class GPTQLayer:
    """One layer in GPTQ's unsigned terms, still unpacked; (out, ...) orientation as in the IR."""

    bits: int
    codes: torch.Tensor  # int32 (out, in), unsigned [0, 2^b - 1]
    zeros: torch.Tensor  # int32 (out, G), unsigned
    scales: torch.Tensor  # float16 (out, G)
    g_idx: torch.Tensor  # int32 (in,)
    group_size: int  # -1: one group per output channel

    def dequantize(self) -> torch.Tensor:
        """The weight every GPTQ loader should reconstruct, float32 (out, in): exact, as (q - z) * fp16 scale
        needs at most 8 + 11 significant bits."""
        g = self.g_idx.long()
        return (self.codes - self.zeros[:, g]).float() * self.scales.float()[:, g]


def to_gptq(q: QuantizedLinear, check: bool = True) -> GPTQLayer:
    """Our IR layer in GPTQ's unsigned convention (the scales rounded to float16). `check` refuses scales that
    float16 cannot hold (validators pass False: a corrupt IR must show up as their own non-finite failure)."""
    import torch

    from ...ir import default_g_idx

    if q.type != "int":
        raise BuildError(f"format gptq holds integer layers, not {q.type}")
    if q.extras.get("pre_quant_scale") is not None:
        raise BuildError("format gptq has no place for AWQ's pre_quant_scale (set quantize.awq_fold: true)")
    bits = q.meta["bits"]
    if bits not in FORMAT_BITS:
        raise BuildError(f"format gptq: bits {bits} is not supported here (4 or 8)")
    out_f, in_f = q.shape
    offset = 2 ** (bits - 1)
    strategy = q.meta.get("strategy", "group")
    grouped = strategy == "group"
    # Per channel (out, 1) and per tensor (1,) both become one group per output channel.
    scale = q.scale.reshape(-1, q.scale.shape[-1] if q.scale.dim() == 2 else 1).expand(out_f, -1)
    zeros = torch.full_like(scale, offset, dtype=torch.int32)
    if q.zero is not None:
        zeros = q.zero.to(torch.int32).reshape(-1, scale.shape[1]).expand(out_f, -1) + offset
    if q.g_idx is not None:
        g_idx = q.g_idx.to(torch.int32)
    else:
        g_idx = default_g_idx(in_f, q.meta.get("group_size") if grouped else None).to(torch.int32)
    scales16 = scale.to(torch.float16)
    if check:
        from ...validate.compare import check_finite

        check_finite("gptq export", "of the IR", scale=scale)
        if not torch.isfinite(scales16).all():
            raise BuildError("a scale overflows float16, which the gptq format stores scales in")
    return GPTQLayer(bits=bits, codes=q.codes.to(torch.int32) + offset, zeros=zeros.contiguous(),
                     scales=scales16.contiguous(), g_idx=g_idx,
                     group_size=q.meta["group_size"] if grouped else -1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32 (two's complement)."""
    import torch

    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned values -> int32 (rows * bits / 32, cols): 32/bits consecutive rows per word, row j of
    a word at bit bits*j."""
    import torch

    pf = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // pf, pf, values.shape[1])
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    return _to_int32((v << shifts).sum(dim=1))


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned values -> int32 (rows, cols * bits / 32), packed along the columns alike."""
    return pack_rows(values.t(), bits).t().contiguous()


def pack_layer(layer: GPTQLayer, name: str) -> dict[str, torch.Tensor]:
    """The four tensors of one layer, in the v1 convention."""
    import torch

    stored_zeros = layer.zeros - 1
    if (stored_zeros < 0).any():
        n = int((stored_zeros < 0).sum())
        raise BuildError(f"{name}: {n} group(s) have unsigned zero point 0, which GPTQ v1 cannot store (it stores "
                         "zero - 1); quantize symmetric, or use format compressed-tensors")
    return {
        "qweight": pack_rows(layer.codes.t().contiguous(), layer.bits),
        "qzeros": pack_cols(stored_zeros.t().contiguous(), layer.bits),
        "scales": layer.scales.t().contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }


# -- the checkpoint ---------------------------------------------------------------------------------------------

def quantize_config(ir: IRReader, bits: int, group_size: int, sym: bool, desc_act: bool) -> dict[str, Any]:
    """quantize_config.json, also embedded in config.json as quantization_config: the fields vLLM's GPTQConfig,
    transformers' GPTQConfig and GPTQModel's QuantizeConfig read."""
    from ... import __version__

    s = ir.scheme
    cfg: dict[str, Any] = {
        "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "static_groups": bool(s.get("static_groups", False)),
        "true_sequential": bool(s.get("true_sequential", True)),
        "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": [f"toolchain:{__version__}"], "method": s.get("method")},
    }
    if s.get("method") == "gptq" and s.get("damp") is not None:
        cfg["damp_percent"] = s["damp"]  # transformers' GPTQConfig rejects null
    return cfg


def unpack_layer(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dense float32 weight (out, in) of one v1 layer from qweight/qzeros/scales/g_idx."""
    import torch

    mask = (1 << bits) - 1
    per_word = 32 // bits
    qweight, qzeros = t["qweight"].to(torch.int64) & 0xFFFFFFFF, t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    rows = [(qweight >> (bits * j)) & mask for j in range(per_word)]  # row j of each word
    q = torch.stack(rows, dim=1).reshape(qweight.shape[0] * per_word, qweight.shape[1])  # (in, out)
    cols = [(qzeros >> (bits * j)) & mask for j in range(per_word)]
    z = torch.stack(cols, dim=2).reshape(qzeros.shape[0], qzeros.shape[1] * per_word) + 1  # v1: stored + 1
    g = t["g_idx"].long()
    w = (q - z[g]).float() * t["scales"].float()[g]
    return w.t().contiguous()


ARITHMETIC = "{compute}: (q - z) * float16 scale, one rounding to {compute} (runtimes serve this model in {dtype})"


def arithmetic(ir_dir: Path, compute: str = "float32") -> str:
    from ...ir import IRReader

    return ARITHMETIC.format(compute=compute, dtype=runtime_dtype(IRReader(ir_dir).config))


def runtime_dtype(config: dict[str, Any]) -> str:
    """The dtype GPTQ kernels serve this model in: its own when half precision, else float16."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float16") else "float16"


def run(ctx: StageContext) -> dict[str, Any]:
    import torch

    from ...ir import IRReader, ShardWriter, copy_model_metadata

    ir = IRReader(ctx.inputs["quantize"])
    if not ir.layers:
        raise BuildError("gptq export needs a quantized model (quantize.method is 'none')")
    writer = ShardWriter(ctx.out, prefix="model")
    kinds: set[tuple[int, int, bool, bool]] = set()
    fp16_err = 0.0
    # Runtimes serving a bf16 model hold the scales in bf16: float16 scales that bf16 cannot hold are rounded again.
    served_dtype = getattr(torch, runtime_dtype(ir.config))
    rescaled: list[str] = []
    with ctx.reporter.task("export gptq", total=len(ir.layers) + 1) as task:
        for name in ir.plain_names():
            writer.add(name, ir.tensors.get(name))
        task.advance()
        for name in ir.layers:
            q = ir.layer(name)
            layer = to_gptq(q)
            packed = pack_layer(layer, name)
            # Read back with the validator's unpacker (written apart from the packer above).
            expect = layer.dequantize()
            back = unpack_layer(packed, layer.bits)
            # Exact float32 products on both sides (ARITHMETIC above); any difference is a packing bug.
            if not torch.equal(back, expect):
                raise BuildError(f"{name}: gptq read-back differs from our weights by "
                                 f"{(back - expect).abs().max().item():.3g}")
            fp16_err = max(fp16_err, (expect - q.dequantize()).abs().max().item())
            served = layer.scales.to(served_dtype)
            if not torch.equal(served.float(), layer.scales.float()):
                rescaled.append(name)
            kinds.add((layer.bits, layer.group_size, q.zero is None, q.g_idx is not None))
            for k, v in packed.items():
                writer.add(f"{name}.{k}", v)
            task.advance()
    if len(kinds) != 1:
        raise BuildError(f"format gptq has one bits/group_size/sym/desc_act for the model; the IR mixes {kinds}")
    bits, group_size, sym, desc_act = kinds.pop()
    writer.close(hf_layout=True)
    copy_model_metadata(ir.directory, ctx.out)
    qcfg = quantize_config(ir, bits, group_size, sym, desc_act)
    (ctx.out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    config = json.loads((ctx.out / "config.json").read_text())
    config["quantization_config"] = qcfg
    (ctx.out / "config.json").write_text(json.dumps(config, indent=2))
    if rescaled:
        ctx.reporter.info(f"  note: {len(rescaled)} layers have float16 scales that {served_dtype} runtimes round "
                          f"again (e.g. {rescaled[0]}); quantize with scale_dtype auto to avoid it")
    return {"format": "gptq", "checkpoint_format": "gptq (v1)", "layers": len(ir.layers),
            "fp16_scale_max_abs_err": fp16_err, "runtime_dtype": str(served_dtype).removeprefix("torch."),
            "scales_rounded_again_by_runtime": rescaled, "arithmetic": arithmetic(ir.directory),
            "quantization_config": qcfg}
