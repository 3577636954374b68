"""The `gptq` target (GPTQ v1): packing checked by hand and against an independent unpacker, the plan's refusals,
and real loaders (transformers + optimum + GPTQModel, and GPTQModel.load) reading our checkpoints back, including
deliberately corrupted ones (packing order, v2 zero points under a v1 config, a transpose, a scale) that every
check must catch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_json, needs_smollm2, needs_wikitext, smol_profile, tiny_profile, write_profile

from toolchain.errors import BuildError, MissingToolError
from toolchain.formats.gptq.export import GPTQLayer, pack_layer, pack_rows, to_gptq, unpack_layer
from toolchain.formats.gptq.spec import loader_python
from toolchain.oracles import venv_python
from toolchain.quant.rtn import quantize_rtn, quantize_with


def _have_loader() -> bool:
    try:
        loader_python()
    except MissingToolError:
        return False
    return True


needs_loader = pytest.mark.skipif(not _have_loader(), reason=f"GPTQModel missing: run scripts/setup (it makes "
                                  f"{venv_python('gptqmodel')} with gptqmodel==7.6.0 optimum==2.3.0) or set "
                                  "TOOLCHAIN_GPTQMODEL_PYTHON")


def act_order_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    """An act-order layer as GPTQ stores it: columns visited in a permuted order, groups formed along that order,
    g_idx giving each original column its group (RTN instead of GPTQ's error feedback: the layout is the same)."""
    out_f, in_f = w.shape
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    q = quantize_rtn(w[:, perm], bits, group_size, symmetric, "group", torch.float16)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // group_size).to(torch.int32)
    q.codes = quantize_with(w.float(), q.scale, q.zero, bits, g_idx.long())
    q.g_idx = g_idx
    q.meta["actorder"] = "group"
    return q


def test_pack_layout_by_hand():
    """qweight: 8 consecutive input rows per int32 (row j at bit 4j); qzeros: zero - 1, packed along outputs."""
    codes = torch.tensor([[(o + 3 * i) % 16 for i in range(8)] for o in range(8)], dtype=torch.int32)  # (out, in)
    layer = GPTQLayer(bits=4, codes=codes, zeros=torch.tensor([[1 + o] for o in range(8)], dtype=torch.int32),
                      scales=torch.ones(8, 1, dtype=torch.float16), g_idx=torch.zeros(8, dtype=torch.int32),
                      group_size=-1)
    t = pack_layer(layer, "x")
    assert t["qweight"].shape == (1, 8) and t["qzeros"].shape == (1, 1) and t["scales"].shape == (1, 8)
    for o in range(8):
        word = sum(int(codes[o, i]) << (4 * i) for i in range(8))
        assert int(t["qweight"][0, o]) & 0xFFFFFFFF == word
    assert int(t["qzeros"][0, 0]) & 0xFFFFFFFF == sum(o << (4 * o) for o in range(8))  # stored zero = (1 + o) - 1
    assert pack_rows(torch.tensor([[200], [1], [2], [255]]), 8)[0, 0].item() & 0xFFFFFFFF == 200 + (1 << 8) + (
        2 << 16) + (255 << 24)


CASES = [(4, True, "group"), (4, False, "group"), (8, True, "group"), (8, False, "group"), (4, True, "channel"),
         (8, False, "channel"), (4, False, "tensor"), (4, True, "act-order"), (8, False, "act-order")]


@pytest.mark.parametrize("bits,symmetric,strategy", CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_round_trip_through_independent_unpacking(bits, symmetric, strategy, scale_dtype):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    if strategy == "act-order":
        q = act_order_rtn(w, bits, 32, symmetric)
    else:
        q = quantize_rtn(w, bits, 32 if strategy == "group" else None, symmetric, strategy, scale_dtype)
    layer = to_gptq(q)
    packed = pack_layer(layer, "x")
    assert packed["qweight"].shape == (128 * bits // 32, 96) and packed["qweight"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].shape == (128,)
    back = unpack_layer(packed, bits)
    assert torch.equal(back, layer.dequantize())
    if q.scale.dtype == torch.float16:  # the format changes nothing
        assert torch.equal(back, q.dequantize())
    else:  # only the scales' float16 rounding, which the export reports
        rel = ((back - q.dequantize()).abs() / q.dequantize().abs().clamp(min=1e-12)).max().item()
        assert 0 < rel <= 2**-11


def test_zero_point_zero_is_refused():
    """v1 stores zero - 1: an unsigned zero of 0 has no representation; the export names the layer."""
    w = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))  # all >= 0: asymmetric zero = qmin
    q = quantize_rtn(w, 4, 32, False, "group", torch.float16)
    assert (q.zero == -8).any()
    with pytest.raises(BuildError, match="unsigned zero point 0"):
        pack_layer(to_gptq(q), "layer.x")


def test_plan_refusals(cli, tmp_path):
    store = str(tmp_path / "store")
    cal = {"dataset": "random", "samples": 2, "seq_len": 16}
    cases = [
        ({"method": "fp8"}, "cannot hold quantize.method fp8"),
        ({"method": "nf4"}, "cannot hold quantize.method nf4"),
        ({"method": "rtn", "bits": 4, "group_size": 32, "ignore": []}, "add lm_head to quantize.ignore"),
        ({"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["lm_head", "down_proj"]},
         "needs every linear of the decoder blocks quantized"),
        ({"method": "awq", "bits": 4, "group_size": 32, "awq_fold": False, "calibration": cal},
         "no place for AWQ's pre_quant_scale"),
    ]
    for i, (quantize, message) in enumerate(cases):
        path = write_profile(tmp_path, tiny_profile(quantize=quantize, targets=["gptq"]), f"p{i}.yaml")
        r = cli("plan", str(path), "--store", store)
        assert r.exit_code == 2, (quantize, r.output)
        assert message in " ".join(r.output.split()), (message, r.output)


def test_missing_loader_fails_at_plan_time(cli, tmp_path, monkeypatch):
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum")):
        pytest.skip("GPTQModel is importable here: the venv is not consulted")
    monkeypatch.setenv("TOOLCHAIN_GPTQMODEL_PYTHON", str(tmp_path / "no-python"))
    path = write_profile(tmp_path, tiny_profile(targets=["gptq"]))
    r = cli("plan", str(path), "--store", str(tmp_path / "store"))
    assert r.exit_code == 2 and "gptqmodel==7.6.0 optimum==2.3.0" in " ".join(r.output.split()), r.output


# -- checkpoints on disk ------------------------------------------------------------------------------------------

def _export(ir_dir: Path, out: Path) -> dict:
    from toolchain.formats.gptq.export import run
    from toolchain.progress import Reporter

    out.mkdir(parents=True)
    return run(SimpleNamespace(inputs={"quantize": ir_dir}, out=out, reporter=Reporter(quiet=True)))


def _act_order_ir(src_dir: Path, out: Path) -> Path:
    """A symmetric act-order IR of the tiny source (every decoder linear), written with our IRWriter."""
    from toolchain.arch import linear_shapes
    from toolchain.ir import IRWriter, TensorReader

    reader = TensorReader(src_dir)
    cfg = json.loads((src_dir / "config.json").read_text())
    layers = {f"{n}.weight": n for n, _o, _i in linear_shapes(cfg) if n != "lm_head"}
    out.mkdir(parents=True)
    writer = IRWriter(out, {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "act_order": True,
                            "scale_dtype": "float16", "ignore": ["lm_head"]})
    for i, name in enumerate(reader.keys()):
        t = reader.get(name)
        if name in layers:
            writer.add_quantized(layers[name], act_order_rtn(t, 4, 32, True, seed=i))
        else:
            writer.add_plain(name, t)
    writer.close(src_dir)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model: RTN int4 g32 asymmetric through the whole pipeline (its validator runs the transformers
    loader), and a symmetric act-order export of the same source."""
    from toolchain.store import Store

    tmp = tmp_path_factory.mktemp("gptq")
    path = write_profile(tmp, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32,
                                                     "symmetric": False}, targets=["gptq"]))
    out = build_json(str(path), "--store", str(tmp / "store"))
    stages = {s["name"]: s for s in out["stages"]}
    store = Store(tmp / "store")
    ao_ir = _act_order_ir(store.object_dir(stages["source"]["key"]), tmp / "ao-ir")
    _export(ao_ir, tmp / "ao-export")
    return SimpleNamespace(out=out, stages=stages, source=store.object_dir(stages["source"]["key"]),
                           ir=store.object_dir(stages["quantize"]["key"]),
                           export=store.object_dir(stages["export:gptq"]["key"]),
                           ao_ir=ao_ir, ao_export=tmp / "ao-export", tmp=tmp)


FAULTS = {
    "model.layers.0.self_attn.q_proj": "packing order: rows of each word reversed",
    "model.layers.0.mlp.gate_proj": "zero points stored as v2 (zero, not zero - 1)",
    "model.layers.1.self_attn.o_proj": "weight transposed before packing",
    "model.layers.1.mlp.down_proj": "one group's scale doubled",
}


def _corrupt(export: Path, ir_dir: Path, dst: Path) -> None:
    """A copy of a gptq export with one fault per layer in FAULTS, each written with the real packers."""
    from safetensors.torch import load_file, save_file

    from toolchain.formats.gptq.export import pack_cols
    from toolchain.ir import IRReader

    shutil.copytree(export, dst)
    t = load_file(dst / "model.safetensors")
    ir = IRReader(ir_dir)
    name = "model.layers.0.self_attn.q_proj"
    layer = to_gptq(ir.layer(name))
    rev = layer.codes.t().reshape(-1, 8, layer.codes.shape[0]).flip(1).reshape(layer.codes.shape[1], -1)
    t[f"{name}.qweight"] = pack_rows(rev, 4)
    name = "model.layers.0.mlp.gate_proj"
    t[f"{name}.qzeros"] = pack_cols(to_gptq(ir.layer(name)).zeros.t().contiguous(), 4)
    name = "model.layers.1.self_attn.o_proj"  # square: the shapes cannot tell
    layer = to_gptq(ir.layer(name))
    t[f"{name}.qweight"] = pack_rows(layer.codes.contiguous(), 4)
    name = "model.layers.1.mlp.down_proj"
    s = t[f"{name}.scales"].clone()
    s[1, 5] *= 2
    t[f"{name}.scales"] = s
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})


@needs_loader  # the build's plan checks that the validator's loader is there
def test_build_validates_with_a_real_loader(built):
    target = built.out["targets"][0]
    assert target["status"] == "built", target
    c = target["conformance"]
    assert c["max_abs_err"] == 0 and c["unpacked"]["max_abs_err"] == 0 and c["layers_checked"] == 14
    qc = json.loads((built.export / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, False, False)
    assert json.loads((built.export / "config.json").read_text())["quantization_config"] == qc
    ao = json.loads((built.ao_export / "quantize_config.json").read_text())
    assert (ao["sym"], ao["desc_act"]) == (True, True)


@needs_loader  # the build's plan checks that the validator's loader is there
def test_unpacking_catches_corrupted_checkpoints(built):
    from toolchain.formats.gptq.check import unpacked_errors

    _corrupt(built.export, built.ir, built.tmp / "bad-unpack")
    errors = unpacked_errors(built.tmp / "bad-unpack", built.ir)
    for name, err in errors.items():
        assert (err > 0) == (name in FAULTS), (name, FAULTS.get(name), err)


def _dense_logits(src: Path, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from toolchain.validate.accuracy import load_hf_model

    model = load_hf_model(src)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
        return model(ids.unsqueeze(0)).logits[0]


@needs_loader
@pytest.mark.parametrize("loader", ["transformers", "gptqmodel"])
def test_loaders_read_act_order_checkpoint(built, loader):
    """transformers (optimum + GPTQModel) and GPTQModel.load: every layer bit-exact to ours (float16 rounding is
    the kernels'), and logits agree with a dense fp32 model holding our weights up to the kernel's bfloat16."""
    from toolchain.formats.gptq.check import LoaderProcess, loader_errors
    from toolchain.ir import IRReader

    proc = LoaderProcess(built.ao_export, loader)
    try:
        assert proc.info["layers"] == 14
        errors = loader_errors(proc, built.ao_ir)
        assert all(e == 0 for e in errors.values()), errors
        ids = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(0))
        theirs = proc.logits(ids)
    finally:
        proc.close()
    ir = IRReader(built.ao_ir)
    ours = _dense_logits(built.source, {n: to_gptq(ir.layer(n)).dequantize() for n in ir.layers}, ids)
    # GPTQModel's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) multiplies in bfloat16: agreement to that.
    scale = ours.abs().max().item()
    assert (theirs - ours).abs().max().item() < 0.02 * scale
    assert (theirs - ours).abs().mean().item() < 0.002 * scale


@needs_loader
def test_loader_catches_corrupted_checkpoints(built):
    from toolchain.formats.gptq.check import LoaderProcess, loader_errors

    _corrupt(built.export, built.ir, built.tmp / "bad-loader")
    proc = LoaderProcess(built.tmp / "bad-loader", "transformers")
    try:
        errors = loader_errors(proc, built.ir)
    finally:
        proc.close()
    for name, err in errors.items():
        assert (err > 0) == (name in FAULTS), (name, FAULTS.get(name), err)


@needs_loader
@pytest.mark.slow
def test_gptqmodel_load_refuses_asymmetric_v1_from_other_producers(built):
    """Why the validator loads through transformers: GPTQModel.load accepts sym=False v1 checkpoints only from
    GPTQModel >= 0.9 (a guard against AutoGPTQ's zero-point overflow); we do not claim to be GPTQModel."""
    from toolchain.formats.gptq.check import LoaderProcess

    with pytest.raises(BuildError, match="sym=False"):
        LoaderProcess(built.export, "gptqmodel")


@needs_loader
@needs_smollm2
@needs_wikitext
def test_smollm2_gptq_accuracy(smol_store, smol_source, tmp_path):
    """SmolLM2 INT4 g64 symmetric RTN through the gptq target (GPTQModel's loader), scored against the fp32
    reference."""
    quantize = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "ignore": ["lm_head"]}
    path = write_profile(tmp_path, smol_profile(name="smol-gptq", source=smol_source, quantize=quantize,
                                                targets=["gptq"]), "smol-gptq.yaml")
    target = build_json(str(path), "--store", str(smol_store))["targets"][0]
    assert target["status"] in ("built", "cached"), target
    assert target["conformance"]["max_abs_err"] == 0
    v = target["validation"]
    # Sanity bounds only (a broken layout gives a model that agrees on almost nothing); the figures go to the report.
    assert v["passed"] and v["top1_agreement"] > 0.5 and v["ppl_increase_pct"] < 100, v
