#!/usr/bin/env python
"""Build, check and time bf16 / FP8 / INT4 on a synthetic Llama-2-7B with our built-in GPU runtime, transformers'
eager generate beside it, in one process on one card. Prints a table last; writes JSON to --out.

  python scripts/bench_gpu.py --out $OUT/bench.json                 # the acceptance run (one H200 call)
  python scripts/bench_gpu.py --kernels-only --out $OUT/k.json      # kernel checks + microbenchmarks only

Build: random bf16 weights of the Llama-2-7B shape (std 0.02) made on the GPU; each mode quantized by the quantize
stage's own functions (toolchain.quant.rtn / fp8) and packed by compressed-tensors exactly as the compressed-tensors
exporter writes it (pack_to_int32); the runtime then reads those tensors as stored (toolchain.engine.weights).
Checks: every kernel against a float64 reference on fresh random inputs; each model's logits against its float32
reference from the same bytes. Times: batch-1 and batch-16 decode (input 128, output 128), TTFT, effective
bandwidth over the card's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from toolchain import arch  # noqa: E402
from toolchain.engine import kernels  # noqa: E402

DEVICE = "cuda"  # the CPU smoke test of the build path sets "cpu"
LINEAR_SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def log(msg: str) -> None:
    print(msg, flush=True)


# -- build ----------------------------------------------------------------------------------------------------

def synthetic_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from toolchain.stages.source import synthetic_tensor_shapes

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = {}
    for name, shape in synthetic_tensor_shapes(cfg):
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
        else:
            out[name] = (torch.randn(shape, generator=g, device=DEVICE) * 0.02).to(torch.bfloat16)
    return out


def packed_checkpoint(state: dict[str, torch.Tensor], cfg: dict, mode: str) -> dict[str, torch.Tensor]:
    """The tensors the compressed-tensors exporter would write for `mode`, built in memory."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from toolchain.quant.fp8 import quantize_fp8
    from toolchain.quant.rtn import quantize_rtn

    if mode == "bf16":
        return state
    out = {}
    quantized = {n for n, _o, _i in arch.linear_shapes(cfg) if n != "lm_head"}
    for name, t in state.items():
        layer = name.removesuffix(".weight")
        if layer not in quantized:
            out[name] = t
            continue
        if mode == "fp8":
            q = quantize_fp8(t, "channel", torch.bfloat16)
            out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = q.weight_fp8, q.scale
        else:
            group, sym = (128, True) if mode == "int4-g128" else (int(mode.split("g")[1].split("-")[0]), False)
            q = quantize_rtn(t, 4, group, sym, "group", torch.bfloat16)
            out[f"{layer}.weight_packed"] = pack_to_int32(q.codes, 4)
            out[f"{layer}.weight_scale"] = q.scale
            out[f"{layer}.weight_shape"] = torch.tensor(q.shape)
            if q.zero is not None:
                out[f"{layer}.weight_zero_point"] = pack_to_int32(q.zero, 4, packed_dim=0)
    return out


def quantization_config(mode: str) -> dict | None:
    if mode == "bf16":
        return None
    if mode == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}
    group, sym = (128, True) if mode == "int4-g128" else (int(mode.split("g")[1].split("-")[0]), False)
    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


# -- kernels --------------------------------------------------------------------------------------------------

def kernel_checks() -> list[dict]:
    """Every kernel path against float64 on fresh random inputs, poisoned outputs excluded by construction
    (the kernels allocate and fully write their outputs; a NaN anywhere fails)."""
    rows = []
    torch.manual_seed(1)
    for (n, k), m, kind, group, asym in [((4096, 4096), 1, "int4", 128, False), ((4096, 11008), 1, "int4", 128, True),
                                          ((12288, 4096), 16, "int4", 128, False), ((4096, 4096), 1, "int4", 32, True),
                                          ((4096, 4096), 3, "int4", 64, True), ((4096, 4096), 100, "int4", 128, True),
                                          ((4096, 11008), 1, "fp8", 0, False), ((22016, 4096), 16, "fp8", 0, False)]:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        if kind == "int4":
            packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=DEVICE, dtype=torch.int32)
            scale = (torch.rand(n, k // group, device=DEVICE) * 0.01 + 1e-3).to(torch.bfloat16)
            zero = torch.randint(0, 16, (n, k // group), device=DEVICE, dtype=torch.uint8) if asym else None
            y = kernels.int4_matmul(x, packed, scale, zero, group)
            ref = x.double() @ kernels.dequantize_int4(packed, scale, zero, group, torch.float64).T
        else:
            w = (torch.randn(n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
            scale = torch.rand(n, 1, device=DEVICE) * 0.01
            y = kernels.fp8_matmul(x, w, scale)
            ref = x.double() @ kernels.dequantize_fp8(w, scale, torch.float64).T
        err = float((y.double() - ref).norm() / ref.norm())
        ok = bool(torch.isfinite(y).all()) and err < 1e-2
        rows.append({"kind": kind, "m": m, "n": n, "k": k, "group": group, "asym": asym, "rel_err": err, "ok": ok})
        log(f"  check {kind} M={m} N={n} K={k} g{group} {'asym' if asym else 'sym'}: rel err {err:.2e} "
            f"{'ok' if ok else 'FAIL'}")
    return rows


def microbench(copy_gbs: float) -> list[dict]:
    """Each 7B linear alone: bf16 (cuBLAS), INT4 g128 kernel, FP8 weight-only kernel, FP8 _scaled_mm (W8A8)."""
    from triton.testing import do_bench_cudagraph

    rows = []
    for name, (n, k) in LINEAR_SHAPES.items():
        wb = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=DEVICE, dtype=torch.int32)
        s4 = (torch.rand(n, k // 128, device=DEVICE) * 0.01).to(torch.bfloat16)
        w8 = wb.to(torch.float8_e4m3fn)
        s8 = torch.rand(n, 1, device=DEVICE)
        for m in (1, 16):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            variants = {  # the lambdas run within this iteration (bound loop variables)
                "bf16": (lambda: torch.nn.functional.linear(x, wb), n * k * 2),  # noqa: B023
                "int4-g128": (lambda: kernels.int4_matmul(x, packed, s4, None, 128),  # noqa: B023
                              n * k // 2 + s4.numel() * 2),
                "fp8-wo": (lambda: kernels.fp8_matmul(x, w8, s8), n * k + n * 4),  # noqa: B023
                "fp8-w8a8": (lambda: kernels.fp8_scaled_mm(x, w8, s8), n * k + n * 4),  # noqa: B023
            }
            for vname, (fn, nbytes) in variants.items():
                try:
                    fn()  # autotunes outside the graph
                    us = do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
                except Exception as e:  # noqa: BLE001  (report, keep going)
                    rows.append({"linear": name, "m": m, "variant": vname, "error": f"{type(e).__name__}: {e}"})
                    continue
                gbs = nbytes / (us / 1e6) / 1e9
                rows.append({"linear": name, "m": m, "variant": vname, "us": us, "gbs": gbs,
                             "ratio": gbs / copy_gbs})
                log(f"  {name:8s} M={m:<3d} {vname:10s} {us:8.1f} us  {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:.0f}%)")
    return rows


# -- transformers eager ---------------------------------------------------------------------------------------

def transformers_eager(state: dict, cfg: dict, input_len: int, new_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(state, assign=True, strict=False)
    model = model.to(torch.bfloat16).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg).to(DEVICE)
    ids = torch.randint(0, cfg["vocab_size"], (1, input_len), device=DEVICE)

    def sync() -> None:
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def gen(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t

    with torch.inference_mode():
        gen(4)
        first = statistics.median(gen(1) for _ in range(3))
        whole = statistics.median(gen(new_tokens) for _ in range(2))
    step_ms = (whole - first) * 1e3 / (new_tokens - 1)
    return {"ttft_ms": first * 1e3, "itl_ms": step_ms, "decode_tok_s": 1e3 / step_ms,
            "method": f"transformers {__import__('transformers').__version__} generate, eager, dynamic cache, bf16"}


# -- main -----------------------------------------------------------------------------------------------------

class Quiet:
    def info(self, msg: str) -> None:
        log(msg)

    def warn(self, msg: str) -> None:
        log("warning: " + msg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--modes", default="bf16,int4-g128,fp8")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--eager-tokens", type=int, default=32, help="0: no transformers eager baseline")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true", help="no kernel checks and microbenchmarks")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from toolchain.engine.graph import blocks_after, compile_blocks, compile_fallbacks
    from toolchain.engine.measure import card_info, copy_bandwidth_gbs, logits_check, time_batch
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    device = torch.device("cuda")
    card = card_info(device)
    copy_gbs = copy_bandwidth_gbs(device)
    log(f"card {card['name']} (cc {card['compute_capability']}, driver {card['driver']}), torch {torch.__version__}, "
        f"triton {kernels.triton.__version__}; copy bandwidth {copy_gbs:.0f} GB/s")
    doc: dict = {"card": card, "copy_bandwidth_gbs": copy_gbs, "torch": torch.__version__,
                 "triton": kernels.triton.__version__}
    if not a.skip_kernels:
        log("kernel checks against float64:")
        doc["kernel_checks"] = kernel_checks()
        log("microbenchmarks (median of triton do_bench_cudagraph: launches replayed from a CUDA graph):")
        doc["microbench"] = microbench(copy_gbs)
        Path(a.out).write_text(json.dumps(doc, indent=2))
    if a.kernels_only:
        return 0 if all(r["ok"] for r in doc["kernel_checks"]) else 1

    cfg = arch.synthetic_config(a.arch, None, "bfloat16")
    state = synthetic_state(cfg)
    settings = {"batch_sizes": [int(b) for b in a.batch_sizes.split(",")], "input_len": a.input_len,
                "output_len": a.output_len, "iterations": a.iterations}
    doc["settings"], doc["modes"] = settings, {}
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        tensors = packed_checkpoint(state, cfg, mode)
        qc = quantization_config(mode)
        ckpt = Checkpoint({**cfg, **({"quantization_config": qc} if qc else {})}, tensors.__getitem__,
                          tensors.__contains__)
        model = Model(ckpt, device, torch.bfloat16, use_kernels=True)
        del tensors
        build_s = time.perf_counter() - t0
        check = logits_check(model)
        log(f"{mode} ({model.mode}): built in {build_s:.1f} s, {model.weight_bytes_per_step(1) / 1e9:.2f} GB per "
            f"step; logits vs float32: prefill {check['prefill_rel_err']:.2e}, decode {check['decode_rel_err']:.2e}"
            f" (tol {check['tolerance']:.0e}); worst block vs float32 on the same input: prefill "
            f"{check['blocks']['prefill_max_rel_err']:.2e}, decode {check['blocks']['decode_max_rel_err']:.2e}")
        t0 = time.perf_counter()
        how = compile_blocks(model)
        fallbacks = compile_fallbacks()
        rows = []
        for b in settings["batch_sizes"]:
            try:
                r = time_batch(model, b, a.input_len, a.output_len, a.iterations, copy_gbs)
            except Exception as e:  # noqa: BLE001  (a compiler failure: time the eager blocks, and say so)
                log(f"  batch {b}: compiled blocks failed ({type(e).__name__}: {str(e)[:300]}); eager blocks")
                model.block, how = model._block, f"eager (compile failed: {type(e).__name__})"
                r = time_batch(model, b, a.input_len, a.output_len, a.iterations, copy_gbs)
            r["blocks"] = how = blocks_after(how, fallbacks)
            rows.append(r)
            log(f"  batch {b}: decode {r['decode_tok_s']:.1f} tok/s, ITL p50 {r['itl_ms_p50']:.3f} ms p99 "
                f"{r['itl_ms_p99']:.3f}, TTFT {r['ttft_ms']:.1f} ms, {r['effective_bandwidth_gbs']:.0f} GB/s "
                f"({100 * r['bandwidth_ratio']:.1f}% of copy)")
        doc["modes"][mode] = {"runtime_mode": model.mode, "logits_check": check, "blocks": how, "fp8_w8a8": model.w8a8,
                              "compile_and_time_s": time.perf_counter() - t0, "per_batch": rows}
        del model
        torch.cuda.empty_cache()
        if "transformers_eager" not in doc and a.eager_tokens > 0:  # early: a run cut short still has it
            log("transformers eager (batch 1):")
            try:
                doc["transformers_eager"] = transformers_eager(state, cfg, a.input_len, a.eager_tokens)
                log(f"  decode {doc['transformers_eager']['decode_tok_s']:.1f} tok/s")
            except Exception as e:  # noqa: BLE001
                doc["transformers_eager"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  failed: {doc['transformers_eager']['error'][:300]}")
        Path(a.out).write_text(json.dumps(doc, indent=2))
        print_table(doc)
    return 0


def print_table(doc: dict) -> None:
    eager = doc.get("transformers_eager", {}).get("decode_tok_s", float("nan"))
    modes = doc["modes"]
    bf16 = {r["batch_size"]: r["decode_tok_s"] for r in modes.get("bf16", {}).get("per_batch", [])}
    log("")
    log(f"{doc['card']['name']}, copy bandwidth {doc['copy_bandwidth_gbs']:.0f} GB/s, input "
        f"{doc['settings']['input_len']}, output {doc['settings']['output_len']}")
    log("| mode | batch | decode tok/s | x bf16 | x eager | ITL p50 / p99 ms | TTFT ms | GB/s | % copy | worst block "
        "(gated) | logits err |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, m in modes.items():
        err = max(m["logits_check"]["prefill_rel_err"], m["logits_check"]["decode_rel_err"])
        blocks = m["logits_check"]["blocks"]
        block = f"{max(blocks['prefill_max_rel_err'], blocks['decode_max_rel_err']):.1e} / {blocks['tolerance']:.2g}"
        for r in m["per_batch"]:
            b = r["batch_size"]
            log(f"| {mode} | {b} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / bf16.get(b, float('nan')):.2f} | "
                f"{r['decode_tok_s'] / eager:.1f} | {r['itl_ms_p50']:.3f} / {r['itl_ms_p99']:.3f} | "
                f"{r['ttft_ms']:.1f} | {r['effective_bandwidth_gbs']:.0f} | {100 * r['bandwidth_ratio']:.1f} | "
                f"{block} | {err:.1e} |")
    te = doc.get("transformers_eager", {})
    if "itl_ms" in te:
        log(f"| transformers eager | 1 | {eager:.1f} | | 1.0 | {te['itl_ms']:.2f} | {te['ttft_ms']:.1f} | | | | |")


if __name__ == "__main__":
    sys.exit(main())
