"""Decode-step variants of the built-in runtime side by side, one process, on a synthetic Llama-2-7B (GPU only).

Each variant is an EngineConfig (toolchain.engine.config) given as changes to the defaults, e.g. split_norm=0,
int4_tiles=0, tiled_groups_per_slice=8+norm_block=256; each model is built and compiled with its own config (the
environment's TOOLCHAIN_<SETTING> variables set the defaults the changes apply to). The variants run in
interleaved rounds, so a card's drift shows as the spread between rounds.
Per variant: the block check against the float32 twin (first round), the step time (median of three runs of 64
CUDA-graph replays after a 128-token prompt, CUDA events), and the kernel profile (first round). A table last.

    python3 scripts/bench_decode_variants.py --modes int4-g128 \\
        --variant tiled_groups_per_slice=8 --variant tiled_groups_per_slice=4 --out $OUT/variants.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def engine_of(variant: str):
    """The EngineConfig of a variant: NAME=VALUE[+NAME=VALUE...] over the defaults (bad names or values: exit 2)."""
    from toolchain.engine.config import EngineConfig
    from toolchain.errors import InputError

    try:
        return EngineConfig.from_env().with_text(variant)
    except InputError as e:
        raise SystemExit(f"--variant {variant!r}: {e}") from None


def step_ms(model, batch: int, prompt: int = 128, replays: int = 64) -> tuple[float, list]:
    import torch

    from toolchain.engine.graph import DecodeGraph

    model.alloc_cache(batch, prompt + 2 * replays)
    ids = torch.randint(0, model.vocab, (batch, prompt), device=model.device)
    first = model.prefill(ids).argmax(-1)
    graph = DecodeGraph(model, batch)
    times = []
    for _ in range(3):
        graph.start(first, prompt)
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    profile = kernel_profile(graph, first, prompt)
    model.caches = None
    return statistics.median(times), profile


def kernel_profile(graph, first, prompt: int, replays: int = 20) -> list[tuple[str, float, float]]:
    import torch

    graph.start(first, prompt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    by = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[e.name][0] += e.device_time / replays
            by[e.name][1] += 1 / replays
    return sorted(((n, us, count) for n, (us, count) in by.items()), key=lambda r: -r[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--modes", default="int4-g128,bf16")
    ap.add_argument("--variant", action="append", default=[],
                    help="EngineConfig changes NAME=VALUE[+NAME=VALUE...], e.g. split_norm=0; repeat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    variants = args.variant or [""]
    engines = {v: engine_of(v) for v in variants}  # all checked before any work

    import bench_gpu
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from toolchain import arch
    from toolchain.engine.graph import compile_blocks
    from toolchain.engine.measure import block_errors
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    # each variant compiled afresh: no timing rides on a graph another variant left in a cache
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    cfg = arch.synthetic_config(args.arch, None, "bfloat16")
    state = bench_gpu.synthetic_state(cfg)
    rows, profiles, checks = [], {}, {}
    for mode in args.modes.split(","):
        tensors = bench_gpu.packed_checkpoint(state, cfg, mode)
        qc = bench_gpu.quantization_config(mode)
        ckpt = Checkpoint({**cfg, **({"quantization_config": qc} if qc else {})}, tensors.__getitem__,
                          tensors.__contains__)
        for rnd in range(args.rounds):
            for variant in variants:
                torch._dynamo.reset()
                model = Model(ckpt, torch.device("cuda"), torch.bfloat16, use_kernels=True, engine=engines[variant])
                name = f"{mode} {variant or '(defaults)'}"
                if rnd == 0:
                    checks[name] = block_errors(model)
                compile_blocks(model)
                ms, profile = step_ms(model, args.batch)
                if rnd == 0:
                    profiles[name] = profile
                rows.append((name, rnd, ms))
                print(f"{name}: round {rnd} {ms:.4f} ms per step", flush=True)
                del model
                torch.cuda.empty_cache()
        del tensors, ckpt
    Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "batch": args.batch,
                                          "engines": {v or "(defaults)": e.canonical() for v, e in engines.items()},
                                          "rows": rows, "block_checks": checks, "profiles": profiles}, indent=1))
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, ms per decode step by round")
    print("| variant | " + " | ".join(f"round {r}" for r in range(args.rounds)) + " | worst block |")
    print("|---|" + "---|" * (args.rounds + 1))
    for name in dict.fromkeys(n for n, _, _ in rows):
        worst = max(checks[name].values())
        print(f"| {name} | " + " | ".join(f"{ms:.4f}" for n, _, ms in rows if n == name) + f" | {worst:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
