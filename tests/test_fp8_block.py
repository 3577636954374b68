"""FP8 block-wise (128x128 weight blocks, per-block scales, dynamic 1x128 activation groups) through the product:
the quantizer against a float64 reference and compressed-tensors' own arithmetic, the compressed-tensors target
against llm-compressor's FP8_BLOCK, the trtllm target against ModelOpt's fp8_pb_wo exporter, the plan-time shape
rule, and a block-FP8 source checkpoint read and dequantized on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_json, have, run_cli, tensors_of, tiny_profile, write_profile
from safetensors.torch import save_file
from trtllm_testlib import MODELOPT_SKIP, compare_hf_json, compare_tensors, export, make_ir, modelopt_python, run_oracle

from toolchain.ir import IRReader
from toolchain.quant.fp8 import FP8, expand_block_scale, quantize_fp8
from toolchain.store import Store

BLOCK_ARCH = {"synthetic": {"arch": "llama-tiny-b128", "seed": 0, "dtype": "float32"}}
BLOCK_Q = {"method": "fp8", "strategy": "block"}
# head_dim 64: k/v_proj have 128 rows, so every linear is whole 128x128 blocks
B128 = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}




@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])  # whole blocks, and ragged edges (zero-padded)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_block_quantizer_against_float64_and_compressed_tensors(shape, scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[1])  # blocks of very different ranges
    q = quantize_fp8(w, "block", scale_dtype)
    nb = (-(-shape[0] // 128), -(-shape[1] // 128))
    assert q.scale.shape == nb and q.meta["block_structure"] == [128, 128]
    # float64 reference of each block's scale: amax / 448, rounded once to the scale dtype
    ref = torch.empty(nb, dtype=torch.float64)
    for i in range(nb[0]):
        for j in range(nb[1]):
            ref[i, j] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double().abs().max() / 448
    assert torch.equal(q.scale, ref.to(scale_dtype))
    # the codes: compressed-tensors' own block quantizer, given our scales, in float32
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True)
    theirs = quantize(w, q.scale.float(), torch.zeros_like(q.scale, dtype=torch.float32), args, dtype=FP8)
    assert torch.equal(theirs.view(torch.uint8), q.weight_fp8.view(torch.uint8))
    # dequantization: each value within half an FP8 step (2^-3 relative for e4m3) of the original, give or take
    # the float32 division before the cast (a quotient that rounds onto a tie)
    dense = q.dequantize(torch.float64)
    step = expand_block_scale(q.scale.double(), shape) * 2.0 ** torch.floor(torch.log2(
        (w.double().abs() / expand_block_scale(q.scale.double(), shape)).clamp(min=2.0 ** -6)))
    assert ((dense - w.double()).abs() <= step * 2.0 ** -4 * (1 + 2.0 ** -16)).all()


def test_plan_refuses_layers_not_in_whole_blocks(tmp_path):
    """llama-tiny's k/v_proj have 64 rows: exit 2 before any work, naming the layer."""
    r = run_cli("plan", str(write_profile(tmp_path, tiny_profile(quantize=BLOCK_Q))), "--store", str(tmp_path / "s"))
    assert r.returncode == 2, r.stderr
    assert "quantize.strategy: block" in r.stderr and "model.layers.0.self_attn.k_proj is (64, 128)" in r.stderr


@pytest.mark.parametrize("bad", [{"group_size": 128}, {"strategy": "blocks"}, {"bits": 4}])
def test_bad_block_recipes_exit_2(tmp_path, bad):
    data = tiny_profile(source=BLOCK_ARCH, quantize={**BLOCK_Q, **bad})
    r = run_cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "quantize" in r.stderr, r.stderr


def test_legacy_trtllm_checkpoint_refused_at_plan(tmp_path):
    data = tiny_profile(source=BLOCK_ARCH, quantize=BLOCK_Q, targets=["trtllm-ckpt"])
    r = run_cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "FP8_BLOCK_SCALES" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def block_build(tmp_path_factory) -> tuple[dict, Store]:
    tmp = tmp_path_factory.mktemp("fp8block")
    store = Store(tmp / "store")
    data = tiny_profile(source=BLOCK_ARCH, quantize=BLOCK_Q, targets=["compressed-tensors", "trtllm"])
    doc = build_json(str(write_profile(tmp, data)), "--store", str(store.root))
    assert [t["status"] for t in doc["targets"]] == ["built", "built"], doc
    return doc, store


def test_both_targets_reload_equal_to_the_ir(block_build):
    """The validate stages passed (loader weights == ours, bit for bit); say so from their records."""
    doc, store = block_build
    for stage in doc["stages"]:
        if stage["name"].startswith("validate:"):
            info = store.manifest(stage["key"])["info"]
            assert info["conformance"]["max_abs_err"] == 0, (stage["name"], info["conformance"])


@pytest.mark.skipif(not have("llmcompressor"), reason="llm-compressor not installed: pip install llmcompressor")
def test_compressed_tensors_equals_llmcompressor_fp8_block(block_build, tmp_path):
    """Same config and the same tensors, bit for bit, as llm-compressor's FP8_BLOCK preset on the same float32
    weights. (On a bf16 source llm-compressor divides by the scale in bf16, rounding twice: ~3% of its codes are
    then one FP8 step from ours, which rounds once.)"""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    doc, store = block_build
    model = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=["lm_head"]),
            output_dir=str(tmp_path / "llmc"), save_compressed=True)
    ours = Path(doc["targets"][0]["path"])
    cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert cfg == json.loads((tmp_path / "llmc" / "config.json").read_text())["quantization_config"]
    a, b = tensors_of(ours), tensors_of(tmp_path / "llmc")
    assert sorted(a) == sorted(b)
    for k in b:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        bits = (x.view(torch.uint8), y.view(torch.uint8)) if x.dtype == FP8 else (x, y)
        assert torch.equal(*bits), k


@pytest.mark.skipif(modelopt_python() is None, reason=MODELOPT_SKIP)
def test_trtllm_equals_modelopt_fp8_pb_wo(tmp_path):
    ir = make_ir(tmp_path / "ir", method="fp8", strategy="block", group_size=None, dtype="bfloat16", **B128)
    info = export("hf", ir, tmp_path / "ours")
    assert info["quant_algo"] == "fp8_pb_wo"
    run_oracle([{"ir": str(ir), "kind": "hf", "out": str(tmp_path / "theirs"), "dtype": "bfloat16"}], tmp_path)
    assert compare_tensors(tmp_path / "ours", tmp_path / "theirs") == []
    assert compare_hf_json(tmp_path / "ours", tmp_path / "theirs") == []


def write_fp8_block_source(directory: Path, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """A DeepSeek-V3 / Qwen3-FP8-style checkpoint of llama-tiny-b128's shape, quantized by our own FP8 block
    quantizer: `weight` e4m3 and `weight_scale_inv` float32 per block. Returns the float64 dequantization of each
    FP8 weight (the expected source weights)."""
    from toolchain import arch
    from toolchain.stages.source import synthetic_tensor_shapes

    cfg = arch.synthetic_config("llama-tiny-b128", None, dtype)
    tensors, expected = {}, {}
    g = torch.Generator().manual_seed(3)
    linears = {f"{n}.weight" for n, _o, _i in arch.linear_shapes(cfg) if n != "lm_head"}
    for name, shape in synthetic_tensor_shapes(cfg):
        w = torch.randn(shape, generator=g) * 0.02
        if name not in linears:
            tensors[name] = torch.ones(shape) if name.endswith("norm.weight") else w.to(getattr(torch, dtype))
            continue
        q = quantize_fp8(w, "block", torch.float32)
        tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = q.weight_fp8, q.scale
        expected[name] = q.weight_fp8.double() * expand_block_scale(q.scale.double(), shape)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype, "quantization_config": qc}))
    return expected


def test_fp8_block_source_is_dequantized_on_load(tmp_path):
    expected = write_fp8_block_source(tmp_path / "src")
    store = Store(tmp_path / "store")
    data = tiny_profile(source={"path": str(tmp_path / "src")}, quantize=BLOCK_Q)
    doc = build_json(str(write_profile(tmp_path, data)), "--store", str(store.root))
    assert doc["targets"][0]["status"] == "built", doc
    src = store.object_dir(doc["stages"][0]["key"])
    got = tensors_of(src)
    assert not any(k.endswith("weight_scale_inv") for k in got)
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    for name, ref in expected.items():  # one rounding of the exact product to bf16
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], ref.to(torch.bfloat16)), name
    # Re-quantized to the same blocks, every layer is a faithful FP8 block layer of the dequantized weights.
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    assert all(meta["strategy"] == "block" for meta in ir.layers.values())


def test_other_quantized_sources_are_refused(tmp_path):
    write_fp8_block_source(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    data = tiny_profile(source={"path": str(tmp_path / "src")})
    r = run_cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "already quantized" in r.stderr, r.stderr


@pytest.mark.parametrize("quantize", [BLOCK_Q, {"method": "smoothquant", "calibration": {"dataset": "random"}}])
def test_builtin_speed_stage_is_skipped_with_the_reason(tmp_path, monkeypatch, quantize):
    """On a GPU the built-in runtime would be chosen, but it has no GEMM for these schemes yet: the speed stage
    says so instead of timing something else."""
    from toolchain import profile
    from toolchain.plan import build_plan
    from toolchain.runtimes import select

    card = {"kind": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0", "driver": "1", "memory_mib": 1,
            "count": 1}
    monkeypatch.setattr(select, "cuda_card", lambda: card)
    monkeypatch.setattr(select, "installed", lambda rt: "1 (torch x)" if rt == "builtin" else None)
    data = tiny_profile(source=BLOCK_ARCH, quantize=quantize, validate={"speed": {"batch_sizes": [1]}})
    plan = build_plan(profile.load(write_profile(tmp_path, data)), Store(tmp_path / "store"))
    speed = plan.stage("speed:compressed-tensors")
    assert speed.config["runtime"] == "builtin" and "built-in runtime has no" in speed.skip_reason
