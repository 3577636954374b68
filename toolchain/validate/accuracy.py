"""Accuracy of a built checkpoint against its unquantized reference, through an independent loader.

Protocol (named in every result): the dataset file is tokenized whole with the model's own tokenizer, cut to
`max_tokens`, and scored in windows of `seq_len` tokens advancing by `stride` (HF's sliding-window perplexity;
stride == seq_len gives non-overlapping windows). Each token is scored once, from the window that ends with it.
  ppl            exp(mean NLL) over the scored tokens
  kl_mean        mean over scored positions of KL(reference || quantized) computed on the reference's top-1024
                 tokens plus one bucket for the rest of the vocabulary. Lumping outcomes can only lower KL, so
                 this is a lower bound of the full-vocabulary KL; tests/ check it against the exact value.
  top1_agreement fraction of positions whose argmax token is the same as the reference's
The reference statistics (per-token NLL and top-1024 log-probabilities, stored as float16) are cached as their
own artifact, keyed by (source, dataset hash, protocol), so sweeping recipes does not re-run the reference model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..arch import fits_in_memory
from ..errors import BuildError
from ..run import StageContext
from ..stages.source import model_dir
from .compare import conformance_failure

TOPK = 1024  # measured on SmolLM2 INT4 g64: within 4% of the full-vocabulary KL (tests/test_smollm2.py)


def load_hf_model(path: Path, dtype: torch.dtype | str = torch.float32):
    """A transformers causal LM on the CPU. `dtype="auto"` keeps the checkpoint's own dtype: a quantized
    checkpoint's scales then stay as stored, and its weights are decompressed as a runtime does."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


def tokenize(model_path: Path, dataset: Path, max_tokens: int | None) -> tuple[torch.Tensor, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(dataset.read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    return ids, f"{type(tok).__name__} of the source (vocab {len(tok)})"


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; every position 1..n-1 is scored exactly once."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n_tokens:
            break


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def hf_logits(model) -> LogitsFn:
    """A transformers causal LM as a logits function: token ids (L,) -> logits (L, vocab)."""
    return lambda ids: model(ids.unsqueeze(0)).logits[0]


@torch.inference_mode()
def score(logits_fn: LogitsFn, ids: torch.Tensor, seq_len: int, stride: int, reporter, label: str
          ) -> Iterator[torch.Tensor]:
    """Log-probabilities (positions, vocab) predicting each scored token, window by window. Any runtime
    (transformers, onnxruntime, llama.cpp) plugs in as a logits function."""
    spans = list(windows(len(ids), seq_len, stride))
    with reporter.task(label, total=sum(e - f for _b, e, f in spans)) as task:
        for begin, end, first in spans:
            logits = logits_fn(ids[begin:end]).float()
            # logits[i] predicts token begin+i+1; position p is predicted by logits[p-begin-1]
            yield torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
            task.advance(end - first)


def _protocol(cfg: dict[str, Any], dataset: Path, n_scored: int, tokenizer: str) -> dict[str, Any]:
    return {"dataset": str(dataset), "dataset_sha256": cfg["dataset_sha256"], "seq_len": cfg["seq_len"],
            "stride": cfg["stride"], "tokens": n_scored, "tokenizer": tokenizer, "protocol": cfg["protocol"],
            "runtime": f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, "
                       f"float32, {'cuda' if torch.cuda.is_available() else 'cpu'})"}


def run_reference(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    src = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
    dataset = ctx.plan.profile.resolve(ctx.plan.profile.profile.validate_.accuracy.dataset)
    ids, tokenizer = tokenize(src, dataset, cfg["max_tokens"])
    model = load_hf_model(src)
    positions = [p for _b, e, f in windows(len(ids), cfg["seq_len"], cfg["stride"]) for p in range(f, e)]
    targets = ids[positions]
    nll, top_lp, top_idx = [], [], []
    offset = 0
    for lp in score(hf_logits(model), ids, cfg["seq_len"], cfg["stride"], ctx.reporter, "reference logits"):
        t = targets[offset : offset + len(lp)]
        nll.append(-lp.gather(1, t[:, None])[:, 0])
        v, i = lp.topk(TOPK, dim=-1)
        top_lp.append(v.half())  # float16 moves the KL by ~1e-5 (measured), a quarter of the float32 size
        top_idx.append(i.to(torch.int32))
        offset += len(lp)
    tensors = {"targets": targets.to(torch.int32), "nll": torch.cat(nll), "top_logp": torch.cat(top_lp),
               "top_idx": torch.cat(top_idx)}
    save_file(tensors, str(ctx.out / "reference.safetensors"))
    stats = {**_protocol(cfg, dataset, len(targets), tokenizer),
             "ppl": math.exp(tensors["nll"].mean().item()), "total_tokens": len(ids)}
    (ctx.out / "reference.json").write_text(json.dumps(stats, indent=2))
    ctx.reporter.info(f"  reference perplexity {stats['ppl']:.3f} over {len(targets)} tokens")
    return stats


def compare(logits_fn: LogitsFn, ids: torch.Tensor, ref: dict[str, torch.Tensor], seq_len: int, stride: int,
            reporter) -> dict:
    nll_sum = kl_sum = 0.0
    agree = 0
    offset = 0
    for lp in score(logits_fn, ids, seq_len, stride, reporter, "quantized logits"):
        n = len(lp)
        t = ref["targets"][offset : offset + n].long()
        nll_sum += -lp.gather(1, t[:, None]).sum().item()
        top_logp, top_idx = ref["top_logp"][offset : offset + n].float(), ref["top_idx"][offset : offset + n].long()
        kl_sum += topk_kl(top_logp, top_idx, lp).sum().item()
        agree += (lp.argmax(-1) == ref["top_idx"][offset : offset + n, 0].long()).sum().item()
        offset += n
    if offset != len(ref["targets"]):
        raise RuntimeError(f"scored {offset} tokens but the reference has {len(ref['targets'])}")
    return {"ppl": math.exp(nll_sum / offset), "kl_mean": kl_sum / offset, "top1_agreement": agree / offset,
            "tokens": offset}


def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) per position over P's top-k outcomes plus one tail bucket (a lower bound of the full KL)."""
    p = ref_logp.exp()
    q_at = q_logp.gather(1, ref_idx)
    head = (p * (ref_logp - q_at)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - q_at.exp().sum(-1)).clamp(min=1e-30)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-30).log() - q_tail.log()), torch.zeros_like(p_tail))
    return head + tail


def full_kl(ref_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    return (ref_logp.exp() * (ref_logp - q_logp)).sum(-1)


def weight_conformance(model, ir_dir: Path) -> dict[str, Any]:
    """Every quantized layer's weight as the loader materialised it vs our own dequantization, both in the
    arithmetic compressed-tensors uses (the scale's dtype; the model loaded in its checkpoint dtype), bit for bit."""
    from ..formats.compressed_tensors import ARITHMETIC, consumer_dtype
    from ..ir import IRReader
    from .compare import WeightComparison

    ir = IRReader(ir_dir)
    modules = dict(model.named_modules())
    check = WeightComparison(ARITHMETIC.format(dtype=ir.scheme.get("scale_dtype", "float32")))
    for name in ir.layers:
        q = ir.layer(name)
        check.add(name, loader_dense_weight(modules[name]), q.dequantize(consumer_dtype(q)))
    return check.result()


def loader_dense_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The dense weight of a module loaded by transformers: plain, or still compressed (then decompressed by the
    compressed-tensors library, as the runtime would)."""
    w = getattr(mod, "weight", None)
    if w is not None and w.dtype in (torch.float32, torch.float16, torch.bfloat16) and w.dim() == 2:
        return w.data
    import copy

    from compressed_tensors.compressors import decompress_module

    m = copy.deepcopy(mod)
    decompress_module(m)
    return m.weight.data


def evaluate_gates(metrics: dict[str, Any], gates: dict[str, Any]) -> list[str]:
    failures = []
    if gates.get("max_ppl_increase_pct") is not None and metrics["ppl_increase_pct"] > gates["max_ppl_increase_pct"]:
        failures.append(f"perplexity +{metrics['ppl_increase_pct']:.2f}% > max {gates['max_ppl_increase_pct']}%")
    if gates.get("max_kl") is not None and metrics["kl_mean"] > gates["max_kl"]:
        failures.append(f"KL {metrics['kl_mean']:.4f} > max {gates['max_kl']}")
    if gates.get("min_top1_agreement") is not None and metrics["top1_agreement"] < gates["min_top1_agreement"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < min {gates['min_top1_agreement']}")
    return failures


def file_conformance(export_dir: Path, ir_dir: Path, reporter) -> dict[str, Any]:
    """Layer by layer, memory bounded: compressed-tensors decompresses each layer from the files on disk."""
    from compressed_tensors.quantization import QuantizationConfig

    from ..formats.compressed_tensors import ARITHMETIC, consumer_dtype, decompress_layer
    from ..ir import IRReader, TensorReader
    from .compare import WeightComparison

    ir = IRReader(ir_dir)
    qc = QuantizationConfig.model_validate(json.loads((export_dir / "config.json").read_text())["quantization_config"])
    if len(qc.config_groups) != 1:
        raise ValueError("file-level check supports one config group")
    scheme = next(iter(qc.config_groups.values()))
    files = TensorReader(export_dir)
    check = WeightComparison(ARITHMETIC.format(dtype=ir.scheme.get("scale_dtype", "float32")))
    with reporter.task("checking layers from the files", total=len(ir.layers)) as task:
        for name in ir.layers:
            q = ir.layer(name)
            stored = {k[len(name) + 1 :]: files.get(k) for k in files.keys() if k.startswith(name + ".")}
            check.add(name, decompress_layer(stored, scheme.model_copy(deep=True), q.shape),
                      q.dequantize(consumer_dtype(q)))
            task.advance()
    return check.result(method="compressed-tensors decompression of each layer read from the files")


def run_validate(ctx: StageContext) -> dict[str, Any]:
    """compressed-tensors: transformers (with its compressed-tensors integration) is the independent loader.
    A model too large to hold densely in fp32 is checked layer by layer from the files instead."""
    if not fits_in_memory(ctx.plan.model_config):
        conformance = file_conformance(ctx.inputs["export"], ctx.inputs["quantize"], ctx.reporter)
        if "reference" in ctx.inputs:
            raise BuildError("accuracy validation of a model this large needs more memory than this machine has "
                             "(the whole model is reloaded in float32); run it on a larger machine or drop "
                             "validate.accuracy")
        return finish_validation(ctx, "compressed-tensors (per layer)", conformance, None)
    # In the checkpoint's dtype: transformers would otherwise cast the scales to float32 and decompress in float32,
    # which no runtime does with a bf16/fp16 checkpoint.
    model = load_hf_model(ctx.inputs["export"], dtype="auto")
    conformance = weight_conformance(model, ctx.inputs["quantize"])
    return finish_validation(ctx, "transformers", conformance, hf_logits(model))


def finish_validation(ctx: StageContext, loader: str, conformance: dict[str, Any] | None,
                      logits_fn: LogitsFn | None) -> dict[str, Any]:
    """Shared by every format's validator: judge the conformance check, then (with a reference) score the
    reloaded model's logits against it and apply the profile's gates. Returns the stage's manifest info."""
    cfg = ctx.config
    result: dict[str, Any] = {"format": cfg["format"], "loader": loader, "conformance": conformance}
    if conformance is not None:
        ctx.reporter.info(f"  reloaded with {loader}: {conformance['layers_checked']} quantized layers, "
                          f"max |w - ours| = {conformance['max_abs_err']:.3g}")
        failure = conformance_failure(conformance)
        if failure:
            return {**result, "status": "failed", "passed": False, "reason": failure}
    if "reference" not in ctx.inputs or logits_fn is None:
        return {**result, "passed": True, "reason": "reload check only (no accuracy section, or synthetic source)"}
    ref_dir = ctx.inputs["reference"]
    ref_stats = json.loads((ref_dir / "reference.json").read_text())
    ref = load_file(str(ref_dir / "reference.safetensors"))
    src = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
    protocol = cfg["protocol"]
    dataset = ctx.plan.profile.resolve(ctx.plan.profile.profile.validate_.accuracy.dataset)
    ids, _tok = tokenize(src, dataset, protocol["max_tokens"])
    metrics = compare(logits_fn, ids, ref, protocol["seq_len"], protocol["stride"], ctx.reporter)
    validation = {
        **{k: ref_stats[k] for k in ("dataset", "seq_len", "stride", "tokenizer", "protocol")},
        "runtime": loader, "reference_runtime": ref_stats["runtime"],
        "tokens": metrics["tokens"], "reference_ppl": ref_stats["ppl"], "ppl": metrics["ppl"],
        "ppl_increase_pct": 100 * (metrics["ppl"] / ref_stats["ppl"] - 1), "kl_mean": metrics["kl_mean"],
        "top1_agreement": metrics["top1_agreement"],
    }
    failures = evaluate_gates(validation, cfg.get("gates", {}))
    validation["passed"] = not failures
    ctx.reporter.info(
        f"  perplexity {validation['reference_ppl']:.3f} -> {validation['ppl']:.3f} "
        f"({validation['ppl_increase_pct']:+.2f}%), KL {validation['kl_mean']:.4f}, "
        f"top-1 {validation['top1_agreement']:.4f} over {validation['tokens']} tokens")
    out = {**result, "validation": validation, "passed": not failures}
    (ctx.out / "validation.json").write_text(json.dumps(out, indent=2))
    if failures:
        return {**out, "status": "failed", "reason": "gate failed: " + "; ".join(failures)}
    return {**out, "reason": "all gates passed"}
