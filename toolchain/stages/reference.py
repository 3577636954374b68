"""reference: the unquantized model's statistics on the accuracy dataset (per-token NLL, top-1024 log-probabilities),
scored block by block from the source's safetensors (toolchain.validate.streamed). Cached as its own artifact, keyed
by (source, dataset hash, protocol), so sweeping recipes does not re-run the reference model; every validate stage
compares against it (toolchain.validate.accuracy)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..stage import StageContext
from .source import model_dir


def run(ctx: StageContext) -> dict[str, Any]:
    """The unquantized model's statistics, scored block by block from the source's safetensors."""
    from ..ir import TensorReader
    from ..validate.accuracy import TOPK, protocol_record, score, streamed_logits_fn, streamed_model, tokenize, windows

    cfg = ctx.config
    src = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
    dataset = ctx.data["dataset"]
    ids, tokenizer = tokenize(src, dataset, cfg["max_tokens"])
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(os.cpu_count() or 1)
    model = streamed_model(ctx, json.loads((src / "config.json").read_text()), TensorReader(src).get)
    logits_fn = streamed_logits_fn(model, ids, cfg["seq_len"], cfg["stride"], ctx.reporter)
    positions = [p for _b, e, f in windows(len(ids), cfg["seq_len"], cfg["stride"]) for p in range(f, e)]
    targets = ids[positions]
    nll, top_lp, top_idx = [], [], []
    offset = 0
    for lp in score(logits_fn, ids, cfg["seq_len"], cfg["stride"], ctx.reporter, "reference logits"):
        t = targets[offset : offset + len(lp)].to(lp.device)  # the streamed runner's logits stay on its device
        nll.append(-lp.gather(1, t[:, None])[:, 0].cpu())
        v, i = lp.topk(TOPK, dim=-1)
        top_lp.append(v.half().cpu())  # float16 moves the KL by ~1e-5 (measured), a quarter of the float32 size
        top_idx.append(i.to(torch.int32).cpu())
        offset += len(lp)
    tensors = {"targets": targets.to(torch.int32), "nll": torch.cat(nll), "top_logp": torch.cat(top_lp),
               "top_idx": torch.cat(top_idx)}
    save_file(tensors, str(ctx.out / "reference.safetensors"))
    stats = {**protocol_record(cfg, dataset, len(targets), tokenizer, model.stats),
             "ppl": math.exp(tensors["nll"].mean().item()), "total_tokens": len(ids)}
    (ctx.out / "reference.json").write_text(json.dumps(stats, indent=2))
    ctx.reporter.info(f"  reference perplexity {stats['ppl']:.3f} over {len(targets)} tokens")
    return stats
