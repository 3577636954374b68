"""The compressed-tensors target against independent implementations: the library's own decompression,
transformers' loader, and llm-compressor's output for the same scheme (config key by key, tensors by value)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_json, have, run_cli, tensors_of, tiny_profile, write_profile

from toolchain.ir import IRReader
from toolchain.store import Store

SCHEMES = {
    # name: (our quantize section, llm-compressor config group)
    "w4-g32-sym": ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
                   {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 32}}),
    "w4-g64-asym": ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
                    {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                 "group_size": 64}}),
    "w8-channel": ({"method": "rtn", "bits": 8, "strategy": "channel", "symmetric": True},
                   {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}),
    "fp8-dynamic": ({"method": "fp8", "strategy": "channel"}, "FP8_DYNAMIC"),
}




def build_tiny(tmp_path: Path, quantize: dict) -> tuple[dict, Store]:
    store = Store(tmp_path / "store")
    doc = build_json(str(write_profile(tmp_path, tiny_profile(quantize=quantize))), "--store", str(store.root))
    assert doc["targets"][0]["status"] == "built", doc
    return doc, store


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_reload_matches_our_dequantized_weights(tmp_path, scheme):
    """transformers loads the checkpoint; every quantized layer's dense weight equals our own dequantization."""
    from transformers import AutoModelForCausalLM

    doc, store = build_tiny(tmp_path, SCHEMES[scheme][0])
    export = Path(doc["targets"][0]["path"])
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    from toolchain.validate.accuracy import loader_dense_weight

    modules = dict(model.named_modules())
    for name in ir.layers:
        ours = ir.layer(name).dequantize()
        assert torch.equal(loader_dense_weight(modules[name]).float(), ours), name


@pytest.mark.skipif(not have("llmcompressor"),
                    reason="llm-compressor not installed: pip install llmcompressor==0.14.0.1")
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_config_and_tensors_agree_with_llmcompressor(tmp_path, scheme):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    ours_q, theirs = SCHEMES[scheme]
    doc, store = build_tiny(tmp_path, ours_q)
    source = store.object_dir(doc["stages"][0]["key"])
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    if isinstance(theirs, str):
        recipe = QuantizationModifier(targets="Linear", scheme=theirs, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(targets="Linear", ignore=["lm_head"],
                                      config_groups={"group_0": {"targets": ["Linear"], **theirs}})
    out = tmp_path / "llmc"
    oneshot(model=model, recipe=recipe, output_dir=str(out), save_compressed=True)

    ours_dir = Path(doc["targets"][0]["path"])
    ours_cfg = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    theirs_cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert ours_cfg == theirs_cfg

    ours_t, theirs_t = tensors_of(ours_dir), tensors_of(out)
    assert sorted(ours_t) == sorted(theirs_t)
    for k in theirs_t:
        assert ours_t[k].dtype == theirs_t[k].dtype and ours_t[k].shape == theirs_t[k].shape, k
    # Same RTN conventions: the packed codes and scales should be the same numbers, not just the same layout.
    for k in theirs_t:
        if k.endswith(("weight_packed", "weight_zero_point", "weight_shape")):
            assert torch.equal(ours_t[k], theirs_t[k]), k
        elif k.endswith("weight_scale"):
            torch.testing.assert_close(ours_t[k].float(), theirs_t[k].float(), rtol=1e-6, atol=0)
        elif ours_t[k].dtype == torch.float8_e4m3fn:
            mismatch = (ours_t[k].float() != theirs_t[k].float()).float().mean().item()
            assert mismatch == 0, f"{k}: {mismatch:.2%} of fp8 codes differ"


def _corrupt_scale(tensors: dict[str, torch.Tensor], config: dict) -> str:
    name = "model.layers.1.mlp.down_proj"
    tensors[f"{name}.weight_scale"][3] *= 2  # one output row's scales doubled
    return name


def _corrupt_codes(tensors: dict[str, torch.Tensor], config: dict) -> str:
    name = "model.layers.0.self_attn.q_proj"
    packed = tensors[f"{name}.weight_packed"]
    packed[[0, 1]] = packed[[1, 0]]  # two rows swapped
    return name


def _corrupt_zero_point(tensors: dict[str, torch.Tensor], config: dict) -> str:
    name = "model.layers.0.mlp.gate_proj"
    tensors[f"{name}.weight_zero_point"].zero_()  # packed zero points all read as zero
    return name


def _corrupt_config(tensors: dict[str, torch.Tensor], config: dict) -> None:
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    return None  # the loader itself cannot make the tensors fit: any clear reason will do


CORRUPTIONS = {"scale": _corrupt_scale, "codes": _corrupt_codes, "zero_point": _corrupt_zero_point,
               "config": _corrupt_config}


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory) -> tuple[dict, Path]:
    """The tiny model at INT4 g32 asymmetric through compressed-tensors, built and validated once."""
    tmp = tmp_path_factory.mktemp("ct-clean")
    doc, store = build_tiny(tmp, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    assert doc["targets"][0]["validation"]["passed"], doc
    return doc, store.root


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_validate_stage_fails_a_corrupted_export(clean_build, tmp_path, corruption):
    """The export in the store is damaged after the fact (the key still matches, so it is reused as is); the
    validate stage, run again, must fail the target (exit 1) and name what differs."""
    import shutil

    from safetensors.torch import save_file

    doc, root = clean_build
    store = Store(shutil.copytree(root, tmp_path / "store"))
    stages = {s["name"]: s["key"] for s in doc["stages"]}
    export = store.object_dir(stages["export:compressed-tensors"])
    files = sorted(export.glob("*.safetensors"))
    assert len(files) == 1
    tensors = tensors_of(export)
    config = json.loads((export / "config.json").read_text())
    where = CORRUPTIONS[corruption](tensors, config)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    (export / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(store.object_dir(stages["validate:compressed-tensors"]))

    profile = write_profile(tmp_path, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32,
                                                             "symmetric": False}))
    r = run_cli("build", str(profile), "--store", str(store.root), "--json")
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    out = json.loads(r.stdout)
    status = {s["name"]: s["status"] for s in out["stages"]}
    assert status["export:compressed-tensors"] == "cached" and status["validate:compressed-tensors"] == "failed"
    target = out["targets"][0]
    assert target["status"] == "failed", target
    reason = json.dumps(target)
    assert (where or "size of tensor") in reason, (where, target)
