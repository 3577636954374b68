"""What the speed stage runs on the built-in runtime: the gates (each block against its float32 twin, the
logits), the copy bandwidth, and the timing of prefill and CUDA-graph decode steps."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BuildError
from . import kernels
from .config import EngineConfig
from .graph import DecodeGraph, blocks_after, compile_blocks, compile_fallbacks
from .model import Model, reference_of, rms_norm
from .weights import Checkpoint

# The runtime's arithmetic is gated block by block (block_errors): each decoder block, and the head, on the fast
# model's own input against a float32 twin that rounds FP8 activations where the model does. Measured on a
# random-weight Llama-2-7B on the H200 (2026-11-30, BENCHMARKS.md), worst block, relative to its update: bf16 and
# INT4 1.4e-2, FP8 decode (weight-only) 1.5e-2, FP8 prefill (W8A8) 5.9e-2: there a one-ulp bf16 difference moves
# an activation to the neighbouring E4M3 value (a 6-12% step) in a few percent of elements. BLOCK_TOLERANCE is
# about twice those. The logits of the whole model are reported against the same twin and against the
# checkpoint's own scheme (FP8: W8A8 everywhere, as transformers computes it) but not gated: through 32 blocks of
# random weights rounding differences grow (bf16 alone: 6.7e-2; FP8: 0.47 where every block is within 6e-2).
BLOCK_TOLERANCE = {"dense": 3e-2, "int4": 3e-2, "fp8": 1.2e-1}
LOGITS_TOLERANCE = {"dense": 1e-1, "int4": 1e-1, "fp8": 1.5e-1}  # reported: whether the whole model is within


# -- measurement ----------------------------------------------------------------------------------------------

def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """A device-to-device copy, counting bytes read plus bytes written (median of `reps`)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def card_info(device: torch.device) -> dict[str, Any]:
    from ..runtimes.select import cuda_card

    props = torch.cuda.get_device_properties(device)
    smi = cuda_card() or {}
    return {"kind": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "driver": smi.get("driver"), "memory_mib": props.total_memory >> 20,
            "multiprocessors": props.multi_processor_count}


def block_errors(model: Model, seed: int = 0, tokens: int = 96) -> dict[str, float]:
    """Each decoder block of `model` against its float32 plain-torch twin on the same input (the fast model's own
    hidden state), for a prefill of `tokens` and one decode step after it: the error of the block's update
    (output - input), relative to that update, worst block. Unlike the logits, this does not grow through the
    depth of the model, so it isolates the kernels' arithmetic from the amplification of rounding differences
    that random-weight models show (bf16 alone: 6.7e-2 in the logits of a random Llama-2-7B)."""
    ref = reference_of(model, same_rounding=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (1, tokens + 1), generator=g).to(model.device)
    model.alloc_cache(1, tokens + 1)
    ref.alloc_cache(1, tokens + 1)

    def rel(out, want, h_in):
        want = want.double()
        return float((out.double() - want).norm() / (want - h_in.double()).norm().clamp_min(1e-30))

    def head(m, h):
        return m._lin(rms_norm(h, m.parts["norm"], m.eps), m.parts["lm_head"]).double()

    def head_rel(h):
        got, want = head(model, h), head(ref, h.float())
        return float((got - want).norm() / want.norm())

    worst = {"prefill": 0.0, "decode": 0.0}
    h = model.parts["embed"][ids[:, :tokens]].reshape(tokens, model.hidden).to(model.dtype)
    for i in range(model.n_layers):
        out = model.prefill_block(i, h, 1, tokens)
        want = ref.prefill_block(i, h.float(), 1, tokens)
        worst["prefill"] = max(worst["prefill"], rel(out, want, h))
        h = out
    head_prefill = head_rel(h)
    for i in range(model.n_layers):  # the reference decodes on the fast model's cache, in float32
        ref.caches[0][i].copy_(model.caches[0][i])
        ref.caches[1][i].copy_(model.caches[1][i])
    pos = torch.tensor(tokens, device=model.device)
    h = F.embedding(ids[:, tokens], model.parts["embed"]).to(model.dtype)
    mask = model.positions <= pos
    for i, lay in enumerate(model.parts["layers"]):
        out = model.block_output(h, model.caches[0][i], model.caches[1][i], pos, model.cos, model.sin, mask,
                                 lay["ln1"], lay["ln2"], *model._flat(lay))
        want = ref.block_output(h.float(), ref.caches[0][i], ref.caches[1][i], pos, ref.cos, ref.sin, mask,
                                lay["ln1"], lay["ln2"], *model._flat(lay))
        worst["decode"] = max(worst["decode"], rel(out, want, h))
        h = out
    head_decode = head_rel(h)
    model.caches = ref.caches = None
    return {"prefill_max_rel_err": worst["prefill"], "decode_max_rel_err": worst["decode"],
            "head_prefill_rel_err": head_prefill, "head_decode_rel_err": head_decode}


def logits_check(model: Model, seed: int = 0, tokens: int = 96) -> dict[str, Any]:
    """Prefill and one decode step against float32 references from the same bytes: the same dataflow in plain
    torch (the kernels' error), and the checkpoint's own scheme (for FP8: W8A8 everywhere, as transformers and
    the accuracy stage compute it; the weight-only decode path skips the activation rounding). 96 prompt tokens:
    FP8 prefill takes the W8A8 path, its decode step the weight-only one."""
    refs = {"same_dataflow": reference_of(model, same_rounding=True), "checkpoint_scheme": reference_of(model, 0)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (1, tokens), generator=g).to(model.device)
    outs = {}
    for name, m in (("fast", model), *refs.items()):
        m.alloc_cache(1, tokens + 1)
        pre = m.prefill(ids, all_logits=True).float()
        step = m.decode(ids[:, -1:], torch.tensor(tokens, device=model.device)).float()
        outs[name] = (pre, step)
        m.caches = None

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    kind = model.parts["layers"][0]["o"].kind
    result = {"tolerance": LOGITS_TOLERANCE[kind], "tokens": tokens,
              "reference": "float32 plain-torch forward of the same stored bytes (tests/test_speed.py checks it "
                           "against transformers loading the checkpoint)"}
    for name in refs:
        result[name] = {"prefill_rel_err": rel(outs["fast"][0], outs[name][0]),
                        "decode_rel_err": rel(outs["fast"][1], outs[name][1])}
    result["prefill_rel_err"] = result["checkpoint_scheme"]["prefill_rel_err"]
    result["decode_rel_err"] = result["checkpoint_scheme"]["decode_rel_err"]
    result["logits_within_tolerance"] = max(result["prefill_rel_err"], result["decode_rel_err"]) <= \
        result["tolerance"]
    blocks = block_errors(model, seed, tokens)
    result["blocks"] = {**blocks, "tolerance": BLOCK_TOLERANCE[kind]}
    result["passed"] = max(blocks.values()) <= BLOCK_TOLERANCE[kind]
    return result


def time_batch(model: Model, batch: int, input_len: int, output_len: int, iterations: int, copy_gbs: float,
               seed: int = 0) -> dict[str, Any]:
    from ..runtimes.speed import batch_result, mean_context

    model.alloc_cache(batch, input_len + output_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (batch, input_len), generator=g).to(model.device)
    model.prefill(ids)  # warm-up (autotuning of the prefill shapes)
    graph = DecodeGraph(model, batch)
    ttfts, itls = [], []
    for _ in range(iterations + 1):
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(output_len + 1)]
        events[0].record()
        first = model.prefill(ids).argmax(-1)
        events[1].record()
        graph.start(first, input_len)
        for t in range(output_len - 1):
            graph.replay()
            events[t + 2].record()
        torch.cuda.synchronize()
        ttfts.append(events[0].elapsed_time(events[1]))
        itls.append([events[i].elapsed_time(events[i + 1]) for i in range(1, output_len)])
    ttfts, itls = ttfts[1:], itls[1:]  # the first round warms the graph and the allocator
    step_bytes = model.weight_bytes_per_step(batch) + batch * mean_context(input_len, output_len) * \
        model.kv_bytes_per_token()
    res = batch_result(batch, input_len, output_len, statistics.median(ttfts), [x for r in itls for x in r],
                       step_bytes, copy_gbs, "per decode step, CUDA events around each graph replay")
    del graph
    model.caches = None
    return res


def measure(export: Path, settings: dict[str, Any], reporter, ckpt: Checkpoint | None = None,
            engine: EngineConfig | None = None) -> dict[str, Any]:
    """The speed stage's figures for a checkpoint on the first CUDA device, under `engine` (the stage passes the
    one in its key; None: EngineConfig.from_env())."""
    if not torch.cuda.is_available():
        raise BuildError("the built-in runtime needs a CUDA GPU (torch sees none)")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    ckpt = ckpt or Checkpoint.open(export)
    model = Model(ckpt, device, torch.bfloat16, use_kernels=kernels.available(device), engine=engine)
    load_s = time.perf_counter() - t0
    copy_gbs = copy_bandwidth_gbs(device)
    check = logits_check(model)
    blocks = check["blocks"]
    reporter.info(f"  {model.mode}: each block vs its float32 twin: prefill {blocks['prefill_max_rel_err']:.2e}, "
                  f"decode {blocks['decode_max_rel_err']:.2e} (tolerance {blocks['tolerance']:.0e}); whole-model "
                  f"logits vs float32: prefill {check['prefill_rel_err']:.2e}, decode {check['decode_rel_err']:.2e};"
                  f" copy bandwidth {copy_gbs:.0f} GB/s")
    compiled = compile_blocks(model)
    fallbacks = compile_fallbacks()
    per_batch = []
    for b in settings["batch_sizes"]:
        try:
            per_batch.append(time_batch(model, b, settings["input_len"], settings["output_len"],
                                        settings["iterations"], copy_gbs))
        except torch.cuda.OutOfMemoryError as e:
            model.caches = None
            torch.cuda.empty_cache()
            per_batch.append({"batch_size": b, "skipped": f"out of GPU memory: {str(e).splitlines()[0]}"})
        except Exception as e:
            if not compiled.startswith("torch.compile"):
                raise
            reporter.warn(f"torch.compile failed ({type(e).__name__}: {e}); timing eager blocks instead")
            model.block, compiled = model._block, f"eager (torch.compile failed: {type(e).__name__})"
            per_batch.append(time_batch(model, b, settings["input_len"], settings["output_len"],
                                        settings["iterations"], copy_gbs))
    compiled = blocks_after(compiled, fallbacks)
    result = {
        "mode": model.mode, "card": card_info(device), "copy_bandwidth_gbs": copy_gbs,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": getattr(kernels.triton, "__version__", None)},
        "method": {"kv_cache": "static", "decode": "one CUDA graph per step", "blocks": compiled,
                   "linears": "Triton W4A16 / FP8 weight-only kernels" if model.use_kernels else "torch",
                   "fp8_weight_only_max_m": model.wo_max_m, "fp8_w8a8": model.w8a8,
                   "load_seconds": round(load_s, 2),
                   "bytes_per_step": "linears as stored + norms + embedding rows + K/V of the mean context"},
        "engine": model.engine.canonical(), "logits_check": check, "per_batch": per_batch,
    }
    if not check["passed"]:
        worst = max(check["blocks"][k] for k in check["blocks"] if k != "tolerance")
        result["failed"] = (f"the runtime's blocks differ from their float32 twin on the same input beyond "
                            f"{check['blocks']['tolerance']:.0e} (worst {worst:.2e}): its kernels are wrong here")
    return result
