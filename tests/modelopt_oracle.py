"""ModelOpt as an oracle for toolchain.formats.trtllm: export OUR quantized values with NVIDIA's own exporters.

Run with a Python that has nvidia-modelopt (tests/test_format_modelopt.py finds it: env TOOLCHAIN_MODELOPT_PYTHON,
or the current interpreter when it imports modelopt):
    python tests/modelopt_oracle.py JOBS.json
JOBS.json: [{"ir": IR_DIR, "kind": "hf" | "ckpt", "out": DIR, "dtype": "float16", "tp": 1, "pp": 1}, ...]

For each job a float32 transformers model is built from the IR with every quantized weight set to the IR's own
dequantization, ModelOpt inserts its quantizers (no calibration data), and each quantizer's amax is set so that
ModelOpt's scale (amax / 448 for FP8, amax / 7 for INT4) is exactly our scale; ModelOpt then re-derives the codes
from the weights itself and writes its checkpoint. The test compares that with ours tensor for tensor.
(reset_amax() first: the amax setter keeps the old buffer's dtype.)
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def amax_for(scale: torch.Tensor, divisor: float) -> torch.Tensor:
    """float32 amax with fl(amax / divisor) == scale exactly (scale * divisor can round the wrong way)."""
    s = scale.float()
    a = s * divisor
    for _ in range(8):
        bad = (a / divisor) != s
        if not bad.any():
            return a
        a = torch.where(bad & ((a / divisor) < s), torch.nextafter(a, torch.full_like(a, float("inf"))), a)
        a = torch.where(bad & ((a / divisor) > s), torch.nextafter(a, torch.zeros_like(a)), a)
    raise RuntimeError("no float32 amax reproduces the scale")


def set_amax(quantizer, value: torch.Tensor) -> None:
    quantizer.reset_amax()
    quantizer.amax = value.float()


def build_model(ir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ir.config)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: ir.tensors.get(k).float() for k in ir.plain_names() if not k.endswith(("k_scale", "v_scale"))}
    state.update({f"{n}.weight": ir.layer(n).dequantize(torch.float32) for n in ir.layers})
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def quant_config(ir, mtq):
    s = ir.scheme
    if s["method"] == "fp8" and s["strategy"] == "block":
        cfg = copy.deepcopy(mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG)
    elif s["method"] == "fp8":
        cfg = copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG if s["strategy"] == "channel" else mtq.FP8_DEFAULT_CFG)
        static = any("input_scale" in ir.layer(n).extras for n in ir.layers)
        if s["strategy"] != "channel" and not static:
            cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    else:
        cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
        for e in cfg["quant_cfg"]:
            if e.get("quantizer_name") == "*weight_quantizer":
                e["cfg"]["block_sizes"] = {-1: s["group_size"], "type": "static"}
    if s.get("kv_cache") == "fp8":
        cfg["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def run_job(job: dict) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint

    from toolchain.ir import IRReader

    ir = IRReader(Path(job["ir"]))
    model = mtq.quantize(build_model(ir), quant_config(ir, mtq), forward_loop=lambda m: None)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if hasattr(m, "weight_quantizer") and n.startswith("model.layers.")]
    for name in linears:
        m = modules[name]
        if name not in ir.layers:  # quantize.ignore: float in ours too
            m.weight_quantizer.disable()
            m.input_quantizer.disable()
            continue
        q = ir.layer(name)
        if q.type == "float8" and q.meta["strategy"] == "block":  # one amax per 128x128 block, row-major
            set_amax(m.weight_quantizer, amax_for(q.scale, 448.0))
            continue
        if q.type == "float8":
            set_amax(m.weight_quantizer, amax_for(q.scale, 448.0).reshape(-1, 1) if q.scale.numel() > 1
                     else amax_for(q.scale, 448.0).reshape(()))
            if "input_scale" in q.extras:
                set_amax(m.input_quantizer, amax_for(q.extras["input_scale"], 448.0).reshape(()))
            continue
        set_amax(m.weight_quantizer, amax_for(q.scale, 7.0).reshape(-1, 1))
        pqs = q.extras.get("pre_quant_scale")
        unfused = name.endswith(("o_proj", "down_proj"))
        if pqs is not None or (job["kind"] == "hf" and unfused):
            # ours writes 1 / s (ModelOpt's pre_quant_scale multiplies the input); identity where the IR has none
            m.input_quantizer._enable_pre_quant_scale = True
            m.input_quantizer.pre_quant_scale = (1.0 / pqs.float()) if pqs is not None else torch.ones(q.shape[1])
    if ir.scheme.get("kv_cache") == "fp8":
        for i, layer in enumerate(model.model.layers):
            for x, quantizer in (("k", layer.self_attn.k_bmm_quantizer), ("v", layer.self_attn.v_bmm_quantizer)):
                name = f"model.layers.{i}.self_attn.{x}_scale"
                scale = ir.tensors.get(name).float() if name in ir.tensors else torch.tensor(1.0)
                set_amax(quantizer, amax_for(scale.reshape(()), 448.0))
    out = Path(job["out"])
    if job["kind"] == "hf":
        export_hf_checkpoint(model, export_dir=str(out))
    else:
        export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=getattr(torch, job["dtype"]),
                                       export_dir=str(out), inference_tensor_parallel=job.get("tp", 1),
                                       inference_pipeline_parallel=job.get("pp", 1))


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        run_job(job)
        print(f"ok {job['kind']} {job['out']}", flush=True)


if __name__ == "__main__":
    main()
