"""The TensorRT-LLM targets without ModelOpt: packing, the independent reader's checks against the IR, the
tensor/pipeline-parallel shards reassembled into a plain torch forward that matches the IR's logits, corrupted
exports that must be caught, plan-time refusals, and the engine stage (with a stand-in trtllm-build)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_profile, write_profile
from trtllm_testlib import export, make_ir

from toolchain.errors import BuildError
from toolchain.formats.trtllm import check as reader
from toolchain.formats.trtllm import export as trtllm
from toolchain.ir import IRReader

IDS = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(1))


def ir_logits(ir_dir: Path) -> torch.Tensor:
    """Logits of the IR itself: a float32 transformers Llama with every quantized weight as the IR dequantizes it,
    and the IR's pre_quant_scale s applied as the IR defines it (input x / s)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ir = IRReader(ir_dir)
    cfg = {k: v for k, v in ir.config.items() if k not in ("torch_dtype", "dtype")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    state = {k: ir.tensors.get(k).float() for k in ir.plain_names() if not k.endswith(("k_scale", "v_scale"))}
    state.update({f"{n}.weight": ir.layer(n).dequantize(torch.float32) for n in ir.layers})
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state)
    modules = dict(model.named_modules())
    for n in ir.layers:
        s = ir.layer(n).extras.get("pre_quant_scale")
        if s is not None:
            modules[n].register_forward_pre_hook(_divide_by(s.float()))
    with torch.no_grad():
        return model.eval()(IDS[None]).logits[0]


def _divide_by(s: torch.Tensor):
    return lambda _module, args: (args[0] / s,)


def decoded_logits(dec, emulate: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return reader.build_model(dec, emulate=emulate)(IDS[None]).logits[0]


# -- packing ---------------------------------------------------------------------------------------

def test_int4_packing_layout_and_roundtrip():
    codes = torch.tensor([[1, -8], [-2, 7]], dtype=torch.int8)  # rows 0 and 1 share a byte, row 0 low
    packed = trtllm.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xE1, 0x78]]
    rand = torch.randint(-8, 8, (64, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reader.unpack_int4(trtllm.pack_int4(rand)), rand)
    assert torch.equal(reader.unpack_int4(trtllm.pack_int4(rand).view(torch.int8)), rand)


# -- the HF layout ---------------------------------------------------------------------------------

HF_RECIPES = {
    "int4-kv": dict(method="rtn", kv=True),
    "int4-awq-pqs": dict(method="rtn", pqs=True),
    "fp8-tensor-kv": dict(method="fp8", strategy="tensor", group_size=None, kv=True, calibrated_kv=True),
    "fp8-channel": dict(method="fp8", strategy="channel", group_size=None),
    "int4-bf16-from-fp32": dict(method="rtn", dtype="float32"),
    "int4-tied-embeddings": dict(method="rtn", tie_word_embeddings=True),
}


@pytest.mark.parametrize("recipe", sorted(HF_RECIPES))
def test_hf_layout_reads_back_exactly_and_matches_ir_logits(tmp_path, recipe):
    ir = make_ir(tmp_path / "ir", **HF_RECIPES[recipe])
    info = export("hf", ir, tmp_path / "out")
    dec = reader.read_hf(tmp_path / "out")
    conf = reader.conformance(dec, ir)
    assert conf["max_abs_err"] == 0 and conf["layers_checked"] == 14, conf
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == info["quant_algo"]
    assert hq["toolchain"]["method"] == HF_RECIPES[recipe]["method"]
    if info["quant_algo"] == "W4A16_AWQ":
        assert "RTN" in hq["toolchain"]["note"]  # the format's name is not the algorithm's
    if recipe == "int4-bf16-from-fp32":
        assert info["dtype"] == "bfloat16"  # W4A16 kernels take half-precision activations only
        return  # the IR's float32 norms are rounded in the file: logits differ by that, checked by the gates
    err = (decoded_logits(dec) - ir_logits(ir)).abs().max().item()
    assert err < 2e-3, err  # pre_quant_scale 1 / s in float16 vs the IR's x / s: a rounding apart
    if not HF_RECIPES[recipe].get("pqs"):
        assert err < 1e-5, err


def test_hf_identity_pre_quant_scale_on_unfused_layers(tmp_path):
    """TensorRT-LLM's W4A16 loader reads a pre_quant_scale on o_proj/down_proj unconditionally: RTN writes ones."""
    ir = make_ir(tmp_path / "ir", method="rtn")
    info = export("hf", ir, tmp_path / "out")
    dec = reader.read_hf(tmp_path / "out")
    unfused = [n for n in dec.linears if n.endswith(("o_proj", "down_proj"))]
    assert info["identity_pre_quant_scales"] == len(unfused) == 4
    assert all(torch.all(dec.linears[n].pre_quant_scale == 1) for n in unfused)
    assert all(dec.linears[n].pre_quant_scale is None for n in dec.linears if n not in unfused)


def test_kv_cache_scales_written_and_explained(tmp_path):
    ir = make_ir(tmp_path / "ir", method="fp8", strategy="channel", group_size=None, kv=True)
    info = export("hf", ir, tmp_path / "out")
    assert info["kv_cache"] == {"quant_algo": "FP8", "scales": "1.0 (uncalibrated)"}
    dec = reader.read_hf(tmp_path / "out")
    assert dec.kv == {0: (1.0, 1.0), 1: (1.0, 1.0)}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    # The validation forward rounds K and V to FP8: its logits move, a little.
    moved = (decoded_logits(dec, emulate=True) - decoded_logits(dec, emulate=False)).abs().max().item()
    assert 0 < moved < 1.0


# -- the legacy layout: shards reassembled ------------------------------------------------------------

@pytest.mark.parametrize(("recipe", "tp", "pp"), [
    ("int4-kv", 1, 1), ("int4-kv", 2, 1), ("int4-kv", 1, 2), ("int4-kv", 2, 2), ("int4-awq-pqs", 2, 1),
    ("fp8-channel", 2, 1), ("fp8-static", 2, 2), ("int4-tied-embeddings", 2, 1)])
def test_ckpt_shards_reassemble_to_the_ir(tmp_path, recipe, tp, pp):
    kw = HF_RECIPES.get(recipe) or dict(method="fp8", strategy="tensor", group_size=None, input_scale=True)
    ir = make_ir(tmp_path / "ir", **kw)
    info = export("ckpt", ir, tmp_path / "out", tp_size=tp, pp_size=pp)
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.safetensors")) == \
        [f"rank{r}.safetensors" for r in range(tp * pp)]
    dec = reader.read_ckpt(tmp_path / "out")
    conf = reader.conformance(dec, ir)
    assert conf["max_abs_err"] == 0, conf
    err = (decoded_logits(dec) - ir_logits(ir)).abs().max().item()
    if recipe == "fp8-static":
        # q/k/v and gate/up share the largest scale in this layout: the others were requantized
        assert info["requantized_to_shared_scale"] and conf["requantized_to_shared_scale"] > 0
        assert conf["requantization_max_abs_err"] > 0
    else:
        assert err < (2e-3 if kw.get("pqs") else 1e-5), err


# -- corrupted exports must be caught -------------------------------------------------------------

def _swapped_nibbles(codes):
    n = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return n[1::2] | (n[0::2] << 4)


def _transposed_o_proj(orig):
    def hf_layer(name, q, dtype):
        out, fold = orig(name, q, dtype)
        if name.endswith("o_proj"):
            out["weight"] = out["weight"].T.contiguous()
        return out, fold
    return hf_layer


def _modelopt_scale_convention(orig):
    def hf_layer(name, q, dtype):
        out, fold = orig(name, q, dtype)
        out["weight_scale"] = out["weight_scale"] * 7.5 / 7  # amax / 7 written where ours is amax / 7.5
        return out, fold
    return hf_layer


def _global_qkv_split(parts, how, tp, rank):
    """rank r gets chunk r of [q; k; v] instead of [q_r; k_r; v_r]"""
    if how == "row":
        return trtllm.split(parts[0], 1, tp, rank)
    return trtllm.split(torch.cat(parts, 0), 0, tp, rank)


CORRUPTIONS = {
    "nibble-order": ("hf", dict(method="rtn"), "pack_int4", lambda orig: _swapped_nibbles),
    "transpose": ("hf", dict(method="fp8", strategy="tensor", group_size=None), "hf_layer", _transposed_o_proj),
    "scale": ("hf", dict(method="rtn"), "hf_layer", _modelopt_scale_convention),
    "qkv-order": ("ckpt", dict(method="rtn"), "_split_rows_or_cols", lambda orig: _global_qkv_split),
}


def corrupted_export(tmp_path: Path, monkeypatch, which: str) -> tuple[Path, Path, str]:
    kind, kw, attr, make = CORRUPTIONS[which]
    ir = make_ir(tmp_path / "ir", **kw)
    monkeypatch.setattr(trtllm, attr, make(getattr(trtllm, attr)))
    export(kind, ir, tmp_path / "bad", **({"tp_size": 2} if kind == "ckpt" else {}))
    monkeypatch.undo()
    return ir, tmp_path / "bad", kind


@pytest.mark.parametrize("which", sorted(CORRUPTIONS))
def test_reader_catches_corrupted_exports(tmp_path, monkeypatch, which):
    ir, bad, kind = corrupted_export(tmp_path, monkeypatch, which)
    dec = reader.read_hf(bad) if kind == "hf" else reader.read_ckpt(bad)
    conf = reader.conformance(dec, ir)
    assert conf["max_abs_err"] > 0, conf
    assert (decoded_logits(dec) - ir_logits(ir)).abs().max().item() > 1e-3


def test_reader_refuses_what_the_format_cannot_mean(tmp_path):
    ir = make_ir(tmp_path / "ir", method="rtn")
    export("hf", ir, tmp_path / "out")
    hq = tmp_path / "out" / "hf_quant_config.json"
    doc = json.loads(hq.read_text())
    doc["quantization"]["group_size"] = 128
    hq.write_text(json.dumps(doc))
    with pytest.raises(BuildError, match="groups of 64 columns"):
        reader.read_hf(tmp_path / "out")


# -- plan time ---------------------------------------------------------------------------------------

def plan_error(tmp_path, cli, **overrides) -> str:
    profile = write_profile(tmp_path, tiny_profile(**overrides))
    result = cli("plan", str(profile), "--store", str(tmp_path / "store"))
    assert result.exit_code == 2, result.output
    return result.output


INT4 = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}


@pytest.mark.parametrize(("quantize", "targets", "expect"), [
    ({**INT4, "symmetric": False}, ["trtllm"], "asymmetric recipe cannot be expressed"),
    ({**INT4, "group_size": 32}, ["trtllm"], "groups of 64 or 128"),
    ({**INT4, "ignore": []}, ["trtllm"], "keeps lm_head unquantized"),
    ({**INT4, "ignore": ["lm_head", "k_proj"]}, ["trtllm"], "one fused GEMM"),
    ({**INT4, "group_size": 128}, [{"format": "trtllm-ckpt", "tp_size": 2}], "64 per rank"),
    (INT4, [{"format": "trtllm-ckpt", "tp_size": 3}], "tp_size values that work for this model and recipe: 1, 2"),
    ({"method": "fp8", "strategy": "tensor"}, ["trtllm-ckpt"], "static activation scales"),
    ({"method": "gptq", "group_size": 64, "static_groups": False, "calibration": {"dataset": "random"}}, ["trtllm"],
     "no per-column group index (g_idx)"),
])
def test_plan_refuses_what_the_format_cannot_hold(tmp_path, cli, quantize, targets, expect):
    out = plan_error(tmp_path, cli, quantize=quantize, targets=targets)
    assert expect in " ".join(out.split()), out


def test_plan_accepts_the_formats_recipes(tmp_path, cli):
    for i, (quantize, target) in enumerate([(INT4, "trtllm"), ({"method": "fp8", "strategy": "tensor"}, "trtllm"),
                                            ({"method": "fp8"}, {"format": "trtllm-ckpt", "tp_size": 2}),
                                            ({**INT4, "group_size": 128}, "trtllm-ckpt")]):
        profile = write_profile(tmp_path, tiny_profile(quantize=quantize, targets=[target]), f"p{i}.yaml")
        result = cli("plan", str(profile), "--store", str(tmp_path / "store"))
        assert result.exit_code == 0, result.output


# -- the engine stage -------------------------------------------------------------------------------

FAKE_TRTLLM_BUILD = """#!{python}
# Test double for the absent trtllm-build: records its argv, writes what a build writes.
import json, os, sys
argv = sys.argv[1:]
out = argv[argv.index("--output_dir") + 1]
ckpt = argv[argv.index("--checkpoint_dir") + 1]
world = json.load(open(os.path.join(ckpt, "config.json")))["mapping"]["world_size"]
with open(os.environ["FAKE_TRTLLM_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
for r in range(world):
    open(os.path.join(out, f"rank{{r}}.engine"), "wb").write(b"fake engine")
config = {{"version": "fake", "pretrained_config": {{}}, "build_config": {{}}}}
json.dump(config, open(os.path.join(out, "config.json"), "w"))
"""


def engine_profile(tmp_path: Path, **engine) -> Path:
    return write_profile(tmp_path, tiny_profile(
        quantize={**INT4, "kv_cache": "fp8"},
        targets=["trtllm", {"format": "trtllm-ckpt", "tp_size": 2, "engine": engine}]))


def bare_path(tmp_path: Path) -> str:
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    path = f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin"
    if shutil.which("trtllm-build", path=path):
        pytest.skip("a real trtllm-build is installed here")
    return path


def object_dir(doc: dict, stage: dict) -> Path:
    return Path(doc["store"]) / "objects" / stage["key"][:2] / stage["key"]


def test_engine_stage_runs_trtllm_build_with_the_profiles_flags(tmp_path):
    path = bare_path(tmp_path)
    script = tmp_path / "bin" / "trtllm-build"
    script.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "argv.jsonl"
    env = {"PATH": path, "FAKE_TRTLLM_LOG": str(log)}
    profile = engine_profile(tmp_path, max_batch_size=4, max_seq_len=1024, workers=2)
    plan = json.loads(run_cli("plan", str(profile), "--store", str(tmp_path / "s"), "--json", env=env).stdout)
    assert not any("trtllm-build not installed" in n for n in plan["notes"])
    r = run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--json", env=env)
    doc = json.loads(r.stdout)
    assert r.returncode == 0, r.stderr
    stages = {s["name"]: s for s in doc["stages"]}
    assert [s["name"] for s in doc["stages"]][-3:] == ["export:trtllm-ckpt", "validate:trtllm-ckpt",
                                                       "engine:trtllm-ckpt"]
    assert stages["engine:trtllm-ckpt"]["status"] == "built"
    argv = json.loads(log.read_text().splitlines()[0])
    ckpt = object_dir(doc, stages["export:trtllm-ckpt"])
    out = argv[argv.index("--output_dir") + 1]
    assert argv == ["--checkpoint_dir", str(ckpt), "--output_dir", out, "--max_batch_size", "4",
                    "--max_input_len", "2048", "--max_seq_len", "1024", "--max_num_tokens", "8192",
                    "--gemm_plugin", "auto", "--workers", "2"]
    engine_dir = object_dir(doc, stages["engine:trtllm-ckpt"])
    assert sorted(p.name for p in engine_dir.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert set(manifest["material"]["config"]) >= {"tensorrt_llm", "gpu_compute_capability", "build"}
    # Another build flag: a new engine from the same checkpoint.
    profile = engine_profile(tmp_path, max_batch_size=8, max_seq_len=1024, workers=2)
    plan = json.loads(run_cli("plan", str(profile), "--store", str(tmp_path / "s"), "--json", env=env).stdout)
    status = {s["name"]: s["status"] for s in plan["stages"]}
    assert status["export:trtllm-ckpt"] == "cached" and status["engine:trtllm-ckpt"] == "build"


def test_without_trtllm_build_plan_says_so_and_build_stops_only_that_target(tmp_path):
    env = {"PATH": bare_path(tmp_path)}
    profile = engine_profile(tmp_path)
    plan = json.loads(run_cli("plan", str(profile), "--store", str(tmp_path / "s"), "--json", env=env).stdout)
    assert any("trtllm-build not installed" in n and "tensorrt_llm<=1.2" in n for n in plan["notes"])
    r = run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--json", env=env)
    assert r.returncode == 1
    stages = {s["name"]: s for s in json.loads(r.stdout)["stages"]}
    assert stages["engine:trtllm-ckpt"]["status"] == "failed"
    assert "install tensorrt_llm<=1.2 from NVIDIA's index" in stages["engine:trtllm-ckpt"]["reason"]
    for name in ("export:trtllm", "validate:trtllm", "export:trtllm-ckpt", "validate:trtllm-ckpt"):
        assert stages[name]["status"] == "built", stages[name]
