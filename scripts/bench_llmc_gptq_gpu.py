#!/usr/bin/env python
"""llm-compressor's GPTQ on the same synthetic model as scripts/bench_gptq_gpu.py (random weights of a real
shape, same seed, same random calibration ids), for a side-by-side wall time on one GPU.

  python scripts/bench_llmc_gptq_gpu.py --out /tmp/llmc-7b.json          # Llama-2-7B shape, 128 x 2048, CUDA
  python scripts/bench_llmc_gptq_gpu.py --arch llama-tiny --samples 8 --seq-len 128 --out /tmp/t.json  # smoke

Needs llmcompressor (and its compressed-tensors, datasets, loguru). The checkpoint is synthesized first (not
timed), loaded by transformers onto the CPU (not timed), then `oneshot` with a GPTQModifier of the scheme
below runs and is timed: llm-compressor onloads one decoder block at a time to the GPU (its sequential
pipeline), as our runner does. Writes JSON to --out and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _placeholder_tokenizer():
    """oneshot insists on a processor when given a dataset, though ours is already token ids: a one-word
    tokenizer (the synthetic model has none) satisfies it and is never used to tokenize."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--actorder", default="static", help="llm-compressor's actorder: static, group, weight or none")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch

    from toolchain.arch import synthetic_config
    from toolchain.progress import Reporter
    from toolchain.quant import calibration
    from toolchain.stages.source import synthesize

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.TemporaryDirectory(prefix="bench-llmc-") if a.work is None else None
    src = Path(a.work or tmp.name) / "source"
    src.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = synthetic_config(a.arch, a.layers, a.dtype)
    synthesize(cfg, 0, src, Reporter(quiet=True), str(dev))
    print(f"synthesized {a.arch} ({cfg['num_hidden_layers']} blocks) in {time.perf_counter() - t0:.1f} s", flush=True)
    ids, cal_info = calibration.token_ids(calibration.parse("random", Path), "text", a.samples, a.seq_len, 0, None,
                                          cfg["vocab_size"])

    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, a.dtype))
    load_s = time.perf_counter() - t0
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=not a.asymmetric, strategy="group", group_size=a.group_size,
        actorder=None if a.actorder == "none" else a.actorder))
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(ids), max_seq_length=a.seq_len,
            shuffle_calibration_samples=False, processor=_placeholder_tokenizer())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    quant_s = time.perf_counter() - t0
    doc = {
        "what": f"llmcompressor {llmcompressor.__version__} GPTQModifier oneshot on random weights: speed only",
        "arch": a.arch, "layers": cfg["num_hidden_layers"], "dtype": a.dtype, "calibration": cal_info,
        "scheme": {"bits": 4, "group_size": a.group_size, "symmetric": not a.asymmetric, "actorder": a.actorder},
        "device": str(dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "torch": torch.__version__, "seconds_load": round(load_s, 3), "seconds_quantize": round(quant_s, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }
    Path(a.out).write_text(json.dumps(doc, indent=2))
    rows = [("peer", doc["what"]), ("model", f"{a.arch} ({doc['layers']} blocks, {a.dtype})"),
            ("calibration", f"{a.samples} x {a.seq_len} tokens (random)"),
            ("scheme", f"W4 g{a.group_size} {'asym' if a.asymmetric else 'sym'}, actorder {a.actorder}"),
            ("device", f"{dev} {doc['gpu'] or ''}".strip()), ("load (not timed)", f"{load_s:.1f} s"),
            ("oneshot", f"{quant_s:.1f} s"), ("peak host RSS", f"{doc['peak_rss_bytes'] / 2**30:.2f} GiB"),
            ("peak GPU memory", f"{doc['peak_gpu_bytes'] / 2**30:.2f} GiB" if doc["peak_gpu_bytes"] else "-")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
