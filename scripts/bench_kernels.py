#!/usr/bin/env python
"""The built-in runtime's kernels alone on the Llama-2-7B shapes, side by side with what else does the same job, in
one process on one CUDA card. Prints one line per measurement; writes JSON to --out.

  python scripts/bench_kernels.py --out $OUT/kernels.json

Linears (M = 1 and 16 rows, bf16 activations): cuBLAS bf16 and our bf16 GEMV (M = 1); our INT4 g128 kernels,
each path forced (gemv, tc, dot); torch's tinygemm (`_weight_int4pack_mm`); GemLite's A16W4 when `gemlite` is
importable; our FP8 weight-only kernels and `torch._scaled_mm` (W8A8). Decode attention (batch 1 and 16, 160
cached positions): our kernel and the torch path it replaced (rotary, `index_copy_`, SDPA), eager. Every time is
the median of `triton.testing.do_bench_cudagraph` (launches replayed from a CUDA graph); our outputs are checked
against float64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toolchain.engine import kernels as K  # noqa: E402
from toolchain.engine.measure import copy_bandwidth_gbs  # noqa: E402
from toolchain.engine.model import rotate  # noqa: E402

DEVICE = "cuda"
LINEARS = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def log(msg: str) -> None:
    print(msg, flush=True)


def timed(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()  # autotuning and compilation outside the graph
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def int4_baselines(packed: torch.Tensor, scale: torch.Tensor, k: int, n: int) -> dict:
    """The same symmetric INT4 g128 weights in tinygemm's and GemLite's layouts (None where unavailable)."""
    out = {}
    codes = K.unpack_int4(packed).to(torch.uint8)  # unsigned, zero point 8
    try:
        tiny = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), 8)
        scale_zero = torch.stack([scale.T.float(), torch.zeros_like(scale.T.float())], -1).to(torch.bfloat16)
        out["int4-tinygemm"] = lambda x: torch._weight_int4pack_mm(x, tiny, 128, scale_zero.contiguous())
    except (RuntimeError, AttributeError) as e:
        log(f"  tinygemm unavailable: {type(e).__name__}: {str(e)[:200]}")
    try:
        from gemlite import DType, GemLiteLinearTriton

        gl = GemLiteLinearTriton(W_nbits=4, group_size=128, in_features=k, out_features=n, input_dtype=DType.BF16,
                                 output_dtype=DType.BF16)
        gl.pack(codes, scale, torch.full_like(scale, 8.0), None, fma_mode=False)
        out["int4-gemlite"] = gl
    except ImportError:
        log("  gemlite not installed (pip install gemlite): left out")
    return out


def linears(copy_gbs: float) -> list[dict]:
    rows = []
    for name, (n, k) in LINEARS.items():
        torch.manual_seed(0)
        wb = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=DEVICE, dtype=torch.int32)
        s4 = (torch.rand(n, k // 128, device=DEVICE) * 0.01 + 1e-3).to(torch.bfloat16)
        w8, s8 = wb.to(torch.float8_e4m3fn), torch.rand(n, 1, device=DEVICE) * 0.01
        w4_ref = K.dequantize_int4(packed, s4, None, 128, torch.float64)
        w8_ref = K.dequantize_fp8(w8, s8, torch.float64)
        b4, b8 = n * k // 2 + s4.numel() * 2, n * k + n * 4
        others = int4_baselines(packed, s4, k, n)
        for m in (1, 16):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            variants = {"bf16-cublas": (lambda: F.linear(x, wb), n * k * 2, None)}  # noqa: B023
            if m <= K.GEMV_MAX_M:
                variants["bf16-gemv"] = (lambda: K.dense_partials(x, wb), n * k * 2, wb.double())  # noqa: B023
            for path in ("gemv", "tc", "dot") if m <= K.GEMV_MAX_M else ("tc", "dot"):
                variants[f"int4-{path}"] = (lambda p=path: K.int4_partials(x, packed, s4, None, 128, path=p),  # noqa: B023
                                            b4, w4_ref)
            for vname, fn in others.items():
                variants[vname] = (lambda f=fn: f(x), b4, w4_ref)  # noqa: B023
            variants["fp8-weight-only"] = (lambda: K.fp8_partials(x, w8, s8), b8, w8_ref)  # noqa: B023
            variants["fp8-w8a8-scaled_mm"] = (lambda: K.fp8_scaled_mm(x, w8, s8), b8, None)  # noqa: B023
            for vname, (fn, nbytes, w_ref) in variants.items():
                try:
                    us = timed(fn)
                    y = fn()
                    y = y.sum(0) if y.dim() == 3 else y  # our kernels' partial sums
                    err = rel_err(y, x.double() @ w_ref.T) if w_ref is not None else None
                except Exception as e:  # noqa: BLE001  (report, keep going)
                    rows.append({"linear": name, "m": m, "variant": vname, "error": f"{type(e).__name__}: {e}"})
                    log(f"  {name} M={m} {vname}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                gbs = nbytes / us / 1e3
                rows.append({"linear": name, "m": m, "variant": vname, "us": us, "gbs": gbs,
                             "ratio": gbs / copy_gbs, "rel_err": err})
                log(f"  {name:8s} M={m:<3d} {vname:20s} {us:7.1f} us {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:3.0f}%)"
                    + ("" if err is None else f"  err {err:.1e}"))
    return rows


def attention() -> list[dict]:
    rows = []
    nh = nkv = 32
    hd, length, pos = 128, 192, 160
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    emb = torch.outer(torch.arange(length, dtype=torch.float64), inv).repeat(1, 2)
    cos, sin = emb.cos().to(DEVICE, torch.bfloat16), emb.sin().to(DEVICE, torch.bfloat16)
    at = torch.tensor(pos, device=DEVICE)
    for b in (1, 16):
        for slices in (1, 4):
            qkv = torch.randn(slices, b, (nh + 2 * nkv) * hd, device=DEVICE)
            qkv = qkv.to(torch.bfloat16) if slices == 1 else qkv  # cuBLAS output, or our partial sums
            kc = torch.randn(b, nkv, length, hd, device=DEVICE).to(torch.bfloat16)
            vc = torch.randn_like(kc)
            want = K.decode_attention_reference(qkv, kc.clone(), vc.clone(), cos, sin, pos, nh, nkv)

            def ours():
                return K.decode_attention(qkv, kc, vc, cos, sin, at, nh, nkv)  # noqa: B023

            def torch_path():
                x = qkv.sum(0).to(torch.bfloat16)  # noqa: B023
                q = x[:, : nh * hd].view(b, nh, 1, hd)  # noqa: B023
                k = x[:, nh * hd : 2 * nh * hd].view(b, nkv, 1, hd)  # noqa: B023
                v = x[:, 2 * nh * hd :].view(b, nkv, 1, hd)  # noqa: B023
                c, s = cos.index_select(0, at.view(1))[0], sin.index_select(0, at.view(1))[0]
                q, k = rotate(q, c, s), rotate(k, c, s)
                kc.index_copy_(2, at.view(1), k)  # noqa: B023
                vc.index_copy_(2, at.view(1), v)  # noqa: B023
                mask = torch.arange(length, device=DEVICE) <= at
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.view(1, 1, 1, -1))  # noqa: B023

            err = rel_err(ours(), want)
            for vname, fn in (("ours", ours), ("torch rotary+index_copy+SDPA", torch_path)):
                us = timed(fn)
                rows.append({"batch": b, "slices": slices, "variant": vname, "us": us,
                             "rel_err": err if vname == "ours" else None})
                log(f"  attention batch {b:2d}, {slices} slice(s), {vname:30s} {us:6.2f} us"
                    + (f"  err {err:.1e}" if vname == "ours" else ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs(torch.device(DEVICE))
    log(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s, torch {torch.__version__}, "
        f"triton {K.triton.__version__}")
    doc = {"card": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy_gbs, "linears": linears(copy_gbs),
           "attention": attention()}
    Path(a.out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
