"""Helpers of the TensorRT-LLM format tests: small IRs written directly (any recipe, including what the quantizers
do not produce yet: AWQ pre_quant_scales, static FP8 input scales, calibrated KV scales), the ModelOpt oracle run
in the interpreter that has it, and tensor-for-tensor comparison of two checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toolchain import arch
from toolchain.ir import IRWriter
from toolchain.oracles import venv_python
from toolchain.progress import Reporter
from toolchain.quant.fp8 import quantize_fp8
from toolchain.quant.rtn import quantize_rtn

REPO = Path(__file__).resolve().parent.parent
ORACLE = REPO / "tests" / "modelopt_oracle.py"
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def tiny_config(dtype: str = "float16", **over: Any) -> dict[str, Any]:
    cfg = arch.synthetic_config("llama-tiny", None, dtype)
    cfg.update({"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, **over})
    cfg.pop("rope_theta", None)
    return cfg


def _rand(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def make_ir(directory: Path, method: str = "rtn", strategy: str = "group", group_size: int | None = 64,
            kv: bool = False, pqs: bool = False, input_scale: bool = False, calibrated_kv: bool = False,
            dtype: str = "float16", ignore: tuple[str, ...] = ("lm_head",), seed: int = 0, **cfg_over: Any) -> Path:
    """An IR of a llama-tiny-shaped model with random weights, quantized by our own RTN / FP8 code. `pqs` adds an
    AWQ-style pre_quant_scale s (shared by the linears that read one activation); `input_scale` a static FP8
    activation scale per linear; `calibrated_kv` KV-cache scales other than 1."""
    from toolchain.stages.source import synthetic_tensor_shapes

    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(dtype, **cfg_over)
    torch_dtype = getattr(torch, dtype)
    quantized = {n for n, _o, _i in arch.linear_shapes(cfg) if not arch.is_ignored(n, ignore)}
    scheme = {"method": method, "bits": 8 if method == "fp8" else 4, "group_size": group_size, "symmetric": True,
              "strategy": strategy, "ignore": list(ignore), "kv_cache": "fp8" if kv else None,
              "scale_dtype": dtype, "source_dtype": dtype}
    writer = IRWriter(directory, scheme)
    shared_s: dict[str, torch.Tensor] = {}
    for name, shape in synthetic_tensor_shapes(cfg):
        w = _rand(name, shape, seed)
        w = (1 + 0.1 * w) if name.endswith("norm.weight") else 0.05 * w
        w = w.to(torch_dtype)
        mod = name.removesuffix(".weight")
        if mod not in quantized:
            writer.add_plain(name, w)
            continue
        if method == "fp8":
            q = quantize_fp8(w, strategy, torch_dtype)
            if input_scale:
                q.extras["input_scale"] = (0.5 + _rand(mod + ".in", (1,), seed).abs()).float() / 448
        else:
            q = quantize_rtn(w, 4, group_size, True, strategy, torch_dtype)
            if pqs:
                group = next((g for g in FUSED if mod.endswith(g)), None)
                key = mod.rsplit(".", 1)[0] + (".qkv" if group is FUSED[0] else ".gu" if group else "." + mod)
                s = shared_s.setdefault(key, (0.5 + _rand(key, (shape[1],), seed).abs()).to(torch_dtype))
                q.extras["pre_quant_scale"] = s.clone()
        writer.add_quantized(mod, q)
    if calibrated_kv:
        for i in range(cfg["num_hidden_layers"]):
            for x in "kv":
                writer.add_plain(f"model.layers.{i}.self_attn.{x}_scale", torch.tensor(0.5 + 0.3 * i + (x == "v")))
    writer.close(None)
    (directory / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=2))
    return directory


def export(kind: str, ir: Path, out: Path, **options: Any) -> dict[str, Any]:
    from toolchain.formats.trtllm import export as trtllm

    out.mkdir(parents=True, exist_ok=True)
    fn = trtllm.export_hf if kind == "hf" else trtllm.export_ckpt
    return fn(ir, out, {"dtype": "auto", "tp_size": 1, "pp_size": 1, **options}, Reporter(quiet=True))


# -- the ModelOpt oracle ------------------------------------------------------------------------------

def modelopt_python() -> str | None:
    """A Python with nvidia-modelopt: $TOOLCHAIN_MODELOPT_PYTHON, else this one if it imports modelopt, else the
    oracle venv scripts/setup makes (toolchain.oracles: <venv root>/modelopt)."""
    env = os.environ.get("TOOLCHAIN_MODELOPT_PYTHON")
    if env:
        return env if Path(env).exists() else None
    if importlib.util.find_spec("modelopt"):
        return sys.executable
    python = venv_python("modelopt")
    return str(python) if python.exists() else None


MODELOPT_SKIP = (f"nvidia-modelopt not found in this environment nor in {venv_python('modelopt')}: run scripts/setup "
                 "(it makes that oracle venv), or set TOOLCHAIN_MODELOPT_PYTHON to a python with "
                 "nvidia-modelopt==0.47.0 (its [hf] extra pins transformers<5.15: not in our env)")


def run_oracle(jobs: list[dict[str, Any]], workdir: Path) -> None:
    path = workdir / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([modelopt_python(), str(ORACLE), str(path)], capture_output=True, text=True, timeout=600,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"ModelOpt oracle failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


# -- comparing checkpoints ----------------------------------------------------------------------------

def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({f"{f.name}:{k}" if f.name.startswith("rank") else k: v for k, v in load_file(str(f)).items()})
    return out


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Bit-exact, except that a floating tensor of ModelOpt's (float32 model) is first cast to our dtype."""
    if ours.shape != theirs.shape:
        return False
    if ours.dtype != theirs.dtype:
        if not (ours.is_floating_point() and theirs.dtype == torch.float32 and ours.dtype != torch.float8_e4m3fn):
            return False
        theirs = theirs.to(ours.dtype)
    if ours.dtype == torch.float8_e4m3fn:
        return torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    return torch.equal(ours, theirs)


def compare_tensors(ours: Path, theirs: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every tensor of both checkpoints, bit for bit; names containing a `skip` entry are left out."""
    a, b = _tensors(ours), _tensors(theirs)
    a = {k: v for k, v in a.items() if not any(x in k for x in skip)}
    b = {k: v for k, v in b.items() if not any(x in k for x in skip)}
    problems = [f"only in ours: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only in ModelOpt's: {k}" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if not _same(a[k], b[k]):
            problems.append(f"differs: {k} ours {a[k].dtype}{tuple(a[k].shape)} "
                            f"ModelOpt {b[k].dtype}{tuple(b[k].shape)}")
    return problems


# Differences from ModelOpt 0.47's JSON that are deliberate (each explained in toolchain.formats.trtllm).
HF_INLINE_OURS_ONLY = {"toolchain", "group_size"}


def compare_hf_json(ours: Path, theirs: Path) -> list[str]:
    a = json.loads((ours / "hf_quant_config.json").read_text())
    b = json.loads((theirs / "hf_quant_config.json").read_text())
    problems = [] if a["quantization"] == b["quantization"] else [
        f"hf_quant_config quantization: ours {a['quantization']} ModelOpt {b['quantization']}"]
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    for k in sorted(set(qa) | set(qb)):
        if k in ("producer", *HF_INLINE_OURS_ONLY) or (k == "config_groups" and qa.get(k) and qb.get(k)):
            continue
        if qa.get(k) != qb.get(k):
            problems.append(f"config.json quantization_config.{k}: ours {qa.get(k)} ModelOpt {qb.get(k)}")
    return problems


CKPT_KEYS = ("architecture", "dtype", "logits_dtype", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_size", "norm_epsilon", "vocab_size", "max_position_embeddings",
             "hidden_act", "use_parallel_embedding", "embedding_sharding_dim", "head_size", "intermediate_size",
             "position_embedding_type", "share_embedding_table", "residual_mlp", "bias", "rotary_pct", "decoder",
             "rmsnorm", "lm_head_bias", "mapping")


def compare_ckpt_json(ours: Path, theirs: Path) -> list[str]:
    a = json.loads((ours / "config.json").read_text())
    b = json.loads((theirs / "config.json").read_text())
    problems = [f"config.json {k}: ours {a.get(k)} ModelOpt {b.get(k)}" for k in CKPT_KEYS if a.get(k) != b.get(k)]
    qa, qb = dict(a["quantization"]), dict(b["quantization"])
    # ModelOpt says pre_quant_scale true for INT4 without writing any prequant_scaling_factor (trtllm-build would
    # then miss tensors); ours says what it wrote.
    has_pqs = any("prequant_scaling_factor" in k for k in _tensors(theirs))
    if qb.get("pre_quant_scale") and not has_pqs:
        qb["pre_quant_scale"] = False
    if qa != qb:
        problems.append(f"config.json quantization: ours {qa} ModelOpt {qb}")
    return problems
