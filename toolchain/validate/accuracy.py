"""Scoring shared by every format's check (toolchain/formats/<format>/check.py): accuracy of a built checkpoint
against its unquantized reference (toolchain/stages/reference.py), through the format's independent loader.

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
A check ends with finish_validation: the reload check's verdict, export fidelity, then these statistics and gates.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .. import gates
from ..errors import BuildError
from ..sources import model_dir
from ..stage import StageContext
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


def protocol_record(cfg: dict[str, Any], dataset: Path, n_scored: int, tokenizer: str, stream: Any) -> dict[str, Any]:
    return {"dataset": str(dataset), "dataset_sha256": cfg["dataset_sha256"], "seq_len": cfg["seq_len"],
            "stride": cfg["stride"], "tokens": n_scored, "tokenizer": tokenizer, "protocol": cfg["protocol"],
            **stream.protocol(),
            "runtime": f"toolchain block-streamed runner over transformers {__import__('transformers').__version__} "
                       f"decoder layers (torch {torch.__version__}, {stream.dtype} matmuls, float32 logits, "
                       f"{stream.device})"}


def streamed_model(ctx: StageContext, config: dict[str, Any], weights: Any):
    """The block-streamed runner (toolchain.validate.streamed) on the profile's scoring device and dtype."""
    from .streamed import StreamedModel, checkpoint_dtype

    scoring = ctx.config.get("scoring") or {k: ctx.config.get(k) for k in ("device", "dtype")}
    return StreamedModel(config, weights, scoring.get("device"), scoring.get("dtype"), checkpoint_dtype(config))


def streamed_logits_fn(model: Any, ids: torch.Tensor, seq_len: int, stride: int, reporter: Any = None):
    """A LogitsFn (accuracy.score's contract: a window's ids -> its logits) over one streamed pass: all windows
    go through the blocks now (with progress), then their logits are handed out in order."""
    spans = list(windows(len(ids), seq_len, stride))
    model.run([ids[b:e] for b, e, _f in spans], reporter)
    order = iter(enumerate(spans))

    def fn(window: torch.Tensor) -> torch.Tensor:
        j, (b, e, _f) = next(order)
        if not torch.equal(window, ids[b:e]):
            raise RuntimeError("streamed scoring: windows asked for out of order")
        return model.window_logits(j)

    return fn


def compare(logits_fn: LogitsFn, ids: torch.Tensor, ref: dict[str, torch.Tensor], seq_len: int, stride: int,
            reporter) -> dict:
    nll_sum = kl_sum = 0.0
    agree = 0
    offset = 0
    for lp in score(logits_fn, ids, seq_len, stride, reporter, "quantized logits"):
        n, dev = len(lp), lp.device  # the reference's slices go where the logits are (a GPU for streamed scoring)
        t = ref["targets"][offset : offset + n].long().to(dev)
        nll_sum += -lp.gather(1, t[:, None]).sum().item()
        top_logp = ref["top_logp"][offset : offset + n].float().to(dev)
        top_idx = ref["top_idx"][offset : offset + n].long().to(dev)
        kl_sum += topk_kl(top_logp, top_idx, lp).sum().item()
        agree += (lp.argmax(-1) == top_idx[:, 0]).sum().item()
        offset += n
    if offset != len(ref["targets"]):
        raise RuntimeError(f"scored {offset} tokens but the reference has {len(ref['targets'])}")
    return {"ppl": safe_exp(nll_sum / offset), "kl_mean": kl_sum / offset, "top1_agreement": agree / offset,
            "tokens": offset}


def safe_exp(x: float) -> float:
    """exp that gives inf (a failed gate, said so) instead of raising OverflowError for a huge mean NLL."""
    return math.inf if x > 709 else math.exp(x)


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


def loader_dense_weight(mod: torch.nn.Module, device: str | None = None) -> torch.Tensor:
    """The dense weight of a module loaded by transformers: plain, or still compressed (then decompressed by the
    compressed-tensors library, as the runtime would; on `device` when given: the same arithmetic, faster)."""
    w = getattr(mod, "weight", None)
    if w is not None and w.dtype in (torch.float32, torch.float16, torch.bfloat16) and w.dim() == 2:
        return w.data
    import copy

    from compressed_tensors.compressors import decompress_module

    m = copy.deepcopy(mod)
    if device is not None:
        m = m.to(device)
    decompress_module(m)
    return m.weight.data


def _ir_config(ctx: StageContext) -> dict[str, Any]:
    return json.loads((ctx.inputs["quantize"] / "config.json").read_text())


def run_fidelity(ctx: StageContext, loaded_weights: Any, text_ids: torch.Tensor | None) -> dict[str, Any]:
    """Export fidelity (toolchain.validate.fidelity): the artifact as loaded vs our IR, same runner and windows."""
    from .fidelity import export_fidelity, fidelity_ids, ir_weights
    from .streamed import checkpoint_dtype

    config = _ir_config(ctx)
    scoring = ctx.config.get("scoring") or {}
    ids = fidelity_ids(config["vocab_size"], text_ids)
    fid = export_fidelity(config, loaded_weights, ir_weights(ctx.inputs["quantize"], scoring.get("device")), ids,
                          scoring.get("device"),
                          scoring.get("dtype"), checkpoint_dtype(config), ctx.reporter)
    ctx.reporter.info(f"  export fidelity ({fid['device']}, {fid['dtype']}, {fid['tokens']} tokens): KL "
                      f"{fid['kl_mean']:.3g}, top-1 {fid['top1_agreement']:.4f}, max |dlogit| "
                      f"{fid['max_abs_logit_diff']:.3g}")
    return fid


def hf_model_weights(model, device: str | None = None, kept: dict[str, torch.Tensor] | None = None) -> Any:
    """A loaded transformers model as a weight source for the streamed runner: its parameters, quantized linears
    decompressed as the loader does (loader_dense_weight, on `device`; taken from `kept` when already done)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(name: str) -> torch.Tensor:
        if kept and name in kept:
            return kept[name]
        mod = modules.get(name.rpartition(".")[0])
        if name.endswith(".weight") and mod is not None and (name not in params or hasattr(mod, "weight_scale")):
            return loader_dense_weight(mod, device)  # packed INT, or FP8 weight + scale
        return params[name].detach()

    return get


def scoring_device(ctx: StageContext) -> str | None:
    """The device the profile scores on (resolved at plan time), for work that can run there."""
    return (ctx.config.get("scoring") or {}).get("device")


def finish_validation(ctx: StageContext, loader: str, conformance: dict[str, Any] | None,
                      logits_fn: LogitsFn | None, loaded_weights: Any = None,
                      stream_scoring: bool = True, fidelity_ungated: str | None = None) -> dict[str, Any]:
    """Shared by every format's validator: judge the conformance check; with `loaded_weights` (the artifact's
    weights as its loader materialised them, name -> tensor) measure export fidelity and, if `stream_scoring`,
    score with the block-streamed runner over them (else with `logits_fn`, e.g. FP8 checkpoints whose loader
    also quantizes the activations); then (with a reference) score against it and apply the profile's gates.
    `fidelity_ungated` says why export fidelity is reported but not gated: an exporter that re-quantized layers
    into another scheme on purpose differs from the IR by that re-quantization, not by a wrong file (the
    conformance check already compared those layers with the re-quantization the export declared).
    Returns the stage's manifest info."""
    cfg = ctx.config
    result: dict[str, Any] = {"format": cfg["format"], "loader": loader, "conformance": conformance}
    if conformance is not None:
        ctx.reporter.info(f"  reloaded with {loader}: {conformance['layers_checked']} quantized layers, "
                          f"max |w - ours| = {conformance['max_abs_err']:.3g}")
        failure = conformance_failure(conformance)
        if failure:
            return {**result, "status": "failed", "passed": False, "reason": failure}
    ids = None
    if "reference" in ctx.inputs:
        src = model_dir(ctx.input_manifests["source"], ctx.inputs["source"])
        dataset = ctx.data["dataset"]
        ids, _tok = tokenize(src, dataset, cfg["protocol"]["max_tokens"])
    if loaded_weights is not None:
        fidelity = run_fidelity(ctx, loaded_weights, ids)
        if fidelity_ungated and math.isfinite(fidelity["kl_mean"]):
            fidelity = {**fidelity, "gated": False, "why_not_gated": fidelity_ungated}
            ctx.reporter.info(f"  export fidelity not gated: {fidelity_ungated}")
        result["export_fidelity"] = fidelity
        if not fidelity["passed"] and fidelity.get("gated", True):
            return {**result, "status": "failed", "passed": False, "reason": "; ".join(fidelity["failures"])}
    if "reference" in ctx.inputs and logits_fn is None and not (loaded_weights is not None and stream_scoring):
        raise BuildError(f"{cfg['format']}: this artifact can only be scored by its loader's whole-model forward "
                         "(FP8 activations), which this model is too large for; remove validate.accuracy or "
                         "validate on a machine with more memory")
    if "reference" not in ctx.inputs or (logits_fn is None and loaded_weights is None):
        what = "reload check and export fidelity" if loaded_weights is not None else "reload check"
        return {**result, "passed": True, "reason": f"{what} only (no accuracy section, or synthetic source)"}
    ref_dir = ctx.inputs["reference"]
    ref_stats = json.loads((ref_dir / "reference.json").read_text())
    ref = load_file(str(ref_dir / "reference.safetensors"))
    protocol = cfg["protocol"]
    stream = None
    if loaded_weights is not None and stream_scoring:  # the loader is proven layer by layer; we score its weights
        stream = streamed_model(ctx, _ir_config(ctx), loaded_weights)
        logits_fn = streamed_logits_fn(stream, ids, protocol["seq_len"], protocol["stride"], ctx.reporter)
        loader = f"{loader} -> block-streamed runner ({stream.stats.device}, {stream.stats.dtype})"
        result["loader"] = loader
    metrics = compare(logits_fn, ids, ref, protocol["seq_len"], protocol["stride"], ctx.reporter)
    validation = {
        **{k: ref_stats[k] for k in ("dataset", "seq_len", "stride", "tokenizer", "protocol")},
        "runtime": loader, "reference_runtime": ref_stats["runtime"],
        "tokens": metrics["tokens"], "reference_ppl": ref_stats["ppl"], "ppl": metrics["ppl"],
        "ppl_increase_pct": 100 * (metrics["ppl"] / ref_stats["ppl"] - 1) if math.isfinite(metrics["ppl"])
        else metrics["ppl"], "kl_mean": metrics["kl_mean"],
        "top1_agreement": metrics["top1_agreement"],
        **({"scoring": stream.stats.protocol()} if stream is not None else {}),
    }
    verdict = gates.evaluate(validation, cfg.get("gates"))
    validation["passed"] = verdict.passed
    ctx.reporter.info(
        f"  perplexity {validation['reference_ppl']:.3f} -> {validation['ppl']:.3f} "
        f"({validation['ppl_increase_pct']:+.2f}%), KL {validation['kl_mean']:.4f}, "
        f"top-1 {validation['top1_agreement']:.4f} over {validation['tokens']} tokens")
    out = {**result, "validation": validation, "passed": verdict.passed}
    (ctx.out / "validation.json").write_text(json.dumps(out, indent=2))
    if not verdict.passed:
        return {**out, "status": "failed", "reason": "gate failed: " + verdict.reason}
    return {**out, "reason": verdict.reason}
