"""NF4 through bitsandbytes: the IR's own dequantization against bitsandbytes and against an independent nearest-
level quantizer, the plan's refusals, the bnb checkpoint against transformers' own save of the same weights, and a
validator that catches deliberately corrupted checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_json, have, needs_smollm2, needs_wikitext, smol_profile, tiny_profile, write_profile

pytestmark = pytest.mark.skipif(not have("bitsandbytes"),
                                reason="bitsandbytes missing: pip install bitsandbytes==0.50.2")

NF4_PROFILE = {"method": "nf4", "blocksize": 64, "double_quant": True}


def _nf4(w: torch.Tensor, blocksize: int, double_quant: bool):
    from toolchain.quant.nf4 import quantize_nf4

    return quantize_nf4(w, blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize,shape", [(32, (96, 64)), (64, (192, 576)), (128, (40, 1536)), (4096, (3, 4096))])
def test_dequantize_matches_bitsandbytes(dtype, double_quant, blocksize, shape):
    """Our plain-torch dequantization is bit-exact to bitsandbytes' dequantize_4bit (CPU kernel)."""
    import bitsandbytes.functional as F

    from toolchain.quant.nf4 import quant_state

    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(blocksize)) * 0.05).to(dtype)
    q = _nf4(w, blocksize, double_quant)
    theirs = F.dequantize_4bit(q.codes, quant_state(q))
    assert theirs.dtype == dtype
    assert torch.equal(q.dequantize(dtype), theirs)


def test_codes_are_the_nearest_level():
    """Independent numerics: per block, every code is the NF4 level nearest to w / absmax (float64), the absmax is
    the block's max |w|, and the dequantized weight is within half the widest level gap of w."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    q = _nf4(w, 64, False)
    levels = q.extras["quant_map"].double()
    blocks = w.double().reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    assert torch.equal(q.scale.double(), absmax.float().double())
    nearest = (blocks / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1).reshape(-1)
    packed = q.codes.reshape(-1).long()
    index = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)
    assert torch.equal(index, nearest)
    gap = (levels[1:] - levels[:-1]).max().item()
    err = (q.dequantize().double() - w.double()).abs().reshape(-1, 64).amax(1)
    assert (err <= absmax * gap / 2 + 1e-6).all()


def test_ir_round_trip(tmp_path):
    """An nf4 layer survives IRWriter -> IRReader with every tensor (the 0-d nested offset too)."""
    from toolchain.ir import IRReader, IRWriter

    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    q = _nf4(w, 64, True)
    writer = IRWriter(tmp_path, {"method": "nf4"})
    writer.add_quantized("layer", q)
    writer.add_plain("other", torch.ones(3))
    writer.close(None)
    (tmp_path / "config.json").write_text("{}")
    back = IRReader(tmp_path).layer("layer")
    assert back.type == "nf4" and back.meta == q.meta
    assert set(back.extras) == {"quant_map", "nested_absmax", "nested_quant_map", "nested_offset"}
    assert torch.equal(back.dequantize(), q.dequantize())


def test_straddle_probe_is_what_the_installed_kernel_does():
    """The plan's probe of bitsandbytes' CPU dequantize says what a direct measurement says, on a real layer shape
    (576 = 4.5 x 128: blocks straddle rows). Which way it goes depends on the CPU (AVX512F: wrong, by ~2; else
    exact: see toolchain/formats/bnb/spec.py); our dequantization is the truth either way."""
    import bitsandbytes.functional as F

    from toolchain.formats.bnb.spec import straddle_misread
    from toolchain.quant.nf4 import quant_state

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(3))
    q = _nf4(w, 128, False)
    direct = (F.dequantize_4bit(q.codes, quant_state(q)) - q.dequantize()).abs().max().item()
    probe = straddle_misread(576, 128)
    assert (probe == 0) == (direct == 0), (probe, direct)
    assert direct == 0 or direct > 0.1  # exact, or the misread scale: nothing in between
    assert (q.dequantize() - w).abs().max().item() < 0.7  # NF4's own error at blocksize 128
    assert straddle_misread(576, 64) == 0  # blocks within rows: every kernel path reads them right


@pytest.mark.parametrize("misread", [2.0, 0.0])
def test_straddling_blocks_are_refused_only_where_the_kernel_misreads_them(cli, tmp_path, monkeypatch, misread):
    """llama-tiny's in_features 128 with blocksize 256: refused (exit 2, naming the sizes that work) when the
    probe finds the kernel wrong, planned when it finds it right."""
    import toolchain.formats.bnb.spec as bnb

    monkeypatch.setattr(bnb, "straddle_misread", lambda i, b: misread)
    path = write_profile(tmp_path, tiny_profile(quantize={**NF4_PROFILE, "blocksize": 256}, targets=["bnb"]))
    r = cli("plan", str(path), "--store", str(tmp_path / "store"))
    if misread:
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert "256 does not divide in_features 128" in text and "misreads blocks" in text and "32, 64, 128" in text
    else:
        assert r.exit_code == 0, r.output


def test_profile_and_plan_refusals(cli, tmp_path):
    store = str(tmp_path / "store")
    cases = [
        ({"quantize": {**NF4_PROFILE, "bits": 8}}, "nf4 is 4 bits"),
        ({"quantize": {**NF4_PROFILE, "group_size": 64}}, "group_size: not used by nf4"),
        ({"quantize": {"method": "rtn", "blocksize": 64}}, "NF4 options"),
        ({"quantize": NF4_PROFILE, "targets": ["compressed-tensors"]}, "cannot hold quantize.method nf4"),
        ({"quantize": NF4_PROFILE, "targets": ["gptq"]}, "cannot hold quantize.method nf4"),
        ({"quantize": {"method": "rtn", "bits": 4, "group_size": 32}, "targets": ["bnb"]},
         "cannot hold quantize.method rtn"),
        ({"quantize": {**NF4_PROFILE, "ignore": []}, "targets": ["bnb"]}, "lm_head"),
    ]
    for i, (over, message) in enumerate(cases):
        path = write_profile(tmp_path, tiny_profile(**{"targets": ["bnb"], **over}), f"p{i}.yaml")
        r = cli("plan", str(path), "--store", store)
        assert r.exit_code == 2, (over, r.output)
        assert message in " ".join(r.output.split()), (message, r.output)


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory) -> tuple[dict[bool, dict], Path]:
    """The tiny model built to the bnb target with and without double quant (one store: one source stage)."""
    tmp = tmp_path_factory.mktemp("nf4")
    store, builds = tmp / "store", {}
    for dq in (False, True):
        quantize = {**NF4_PROFILE, "double_quant": dq}
        path = write_profile(tmp, tiny_profile(name=f"nf4-{dq}", quantize=quantize, targets=["bnb"]), f"{dq}.yaml")
        out = build_json(str(path), "--store", str(store))
        builds[dq] = {s["name"]: s for s in out["stages"]}
        assert builds[dq]["validate:bnb"]["status"] == "built", builds[dq]["validate:bnb"]
        assert out["targets"][0]["conformance"]["max_abs_err"] == 0
    return builds, store


def _obj(store: Path, key: str) -> Path:
    from toolchain.store import Store

    return Store(store).object_dir(key)


@pytest.mark.parametrize("double_quant", [False, True])
def test_checkpoint_is_what_transformers_saves(tmp_path, tiny_builds, double_quant):
    """Our export against transformers + bitsandbytes quantizing the same source weights from a fresh load
    (never after a forward: bitsandbytes' CPU forward repacks weights in place) and saving: the same tensors, bit
    for bit, and the same quantization_config (we name llm_int8_skip_modules explicitly; transformers leaves
    None and infers lm_head)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    builds, store = tiny_builds
    stages = builds[double_quant]
    ours = _obj(store, stages["export:bnb"]["key"])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(_obj(store, stages["source"]["key"]), quantization_config=config,
                                                 dtype=torch.float32, device_map="cpu")
    model.save_pretrained(tmp_path / "transformers")
    theirs = load_file(tmp_path / "transformers" / "model.safetensors")
    mine = load_file(ours / "model.safetensors")
    assert sorted(theirs) == sorted(mine)
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in mine
    assert ("model.layers.0.mlp.down_proj.weight.nested_absmax" in mine) == double_quant
    for k in theirs:
        assert theirs[k].dtype == mine[k].dtype and torch.equal(theirs[k], mine[k]), k
    qa = json.loads((tmp_path / "transformers" / "config.json").read_text())["quantization_config"]
    qb = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert qb.pop("llm_int8_skip_modules") == ["lm_head"] and qa.pop("llm_int8_skip_modules") is None
    assert qa == qb


def _corrupt(src: Path, dst: Path) -> dict[str, str]:
    """A copy of an NF4 checkpoint with one deliberate fault in each of four layers."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    faults = {
        "model.layers.0.self_attn.q_proj": "nibble order swapped",
        "model.layers.0.mlp.gate_proj": "one absmax doubled",
        "model.layers.1.mlp.down_proj": "quant_state shape transposed (in, out)",
        "model.layers.1.mlp.up_proj": "double-quant offset changed",
    }
    w = "model.layers.0.self_attn.q_proj.weight"
    t[w] = ((t[w] >> 4) | (t[w] << 4)).to(torch.uint8)
    a = "model.layers.0.mlp.gate_proj.weight.absmax"
    t[a] = t[a].clone()
    t[a][3] = t[a][3] * 2 if t[a].dtype != torch.uint8 else (int(t[a][3]) + 40) % 256
    for name, edit in (("model.layers.1.mlp.down_proj", "transpose"), ("model.layers.1.mlp.up_proj", "offset")):
        key = f"{name}.weight.quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(t[key].tolist()))
        if edit == "transpose":
            state["shape"] = state["shape"][::-1]
        else:
            state["nested_offset"] = state["nested_offset"] * 1.01
        t[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return faults


def test_validator_catches_corrupted_checkpoints(tmp_path, tiny_builds):
    """Each fault shows up in exactly its layer; untouched layers still match bit for bit."""
    from toolchain.formats.bnb.check import layer_errors
    from toolchain.ir import IRReader
    from toolchain.validate.accuracy import load_hf_model

    builds, store = tiny_builds
    stages = builds[True]
    faults = _corrupt(_obj(store, stages["export:bnb"]["key"]), tmp_path / "bad")
    ir = IRReader(_obj(store, stages["quantize"]["key"]))
    errors = layer_errors(load_hf_model(tmp_path / "bad"), ir)
    for name, err in errors.items():
        if name in faults:
            assert err > 0, f"{faults[name]} not caught in {name}"
        else:
            assert err == 0, name


def test_forward_runs_bitsandbytes_on_the_checked_weights(tiny_builds):
    """The logits the validator scores come from bitsandbytes' CPU forward; they agree with a dense model holding
    our dequantized weights up to the kernel's bfloat16 arithmetic (AVX512-BF16) or exactly-ish otherwise."""
    from toolchain.ir import IRReader
    from toolchain.validate.accuracy import load_hf_model

    builds, store = tiny_builds
    stages = builds[False]
    ir = IRReader(_obj(store, stages["quantize"]["key"]))
    model = load_hf_model(_obj(store, stages["export:bnb"]["key"]))
    dense = load_hf_model(_obj(store, stages["source"]["key"]))
    with torch.no_grad():
        for name in ir.layers:
            dense.get_submodule(name).weight.copy_(ir.layer(name).dequantize())
        ids = torch.randint(0, 1024, (1, 48), generator=torch.Generator().manual_seed(0))
        a, b = model(ids).logits, dense(ids).logits
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() < 0.02 * scale
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


@needs_smollm2
@needs_wikitext
def test_smollm2_nf4_accuracy(smol_store, smol_source, tmp_path):
    """SmolLM2 NF4 (blocksize 64, double quant) through the bnb target, scored against the fp32 reference."""
    from conftest import REPO

    quantize = {**NF4_PROFILE, "ignore": ["lm_head"]}
    path = write_profile(tmp_path, smol_profile(name="smol-nf4", source=smol_source, quantize=quantize,
                                                targets=["bnb"]), "smol-nf4.yaml")
    out = build_json(str(path), "--store", str(smol_store))
    target = out["targets"][0]
    assert target["status"] in ("built", "cached"), target
    assert target["conformance"]["max_abs_err"] == 0
    v = target["validation"]
    # Sanity bounds only (a broken layout gives a model that agrees on almost nothing); the figures go to the report.
    assert v["passed"] and v["top1_agreement"] > 0.5 and v["ppl_increase_pct"] < 100, v
    assert (REPO / "profiles" / "smollm2-nf4.yaml").is_file()
