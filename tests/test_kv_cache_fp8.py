"""FP8 KV cache for vLLM / SGLang (compressed-tensors `kv_cache_scheme`): calibrated per-layer K/V scales against
transformers' own KV cache, the checkpoint's config and tensors as llm-compressor writes them, and the loader's
forward (compressed-tensors' attention hook) against K and V rounded to E4M3 with our scales, as vLLM rounds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_json, tiny_profile, write_profile
from safetensors import safe_open

from toolchain.ir import IRReader
from toolchain.store import Store

CAL = {"dataset": "random", "samples": 4, "seq_len": 64}
W4_KV = {"method": "rtn", "bits": 4, "group_size": 32, "kv_cache": "fp8", "calibration": CAL}
# What llm-compressor 0.14 writes for kv_cache_scheme {num_bits: 8, type: float, strategy: tensor, dynamic: false,
# symmetric: true} (seen here with oneshot on this tiny model).
LLMC_KV_SCHEME = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                  "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": "tensor",
                  "symmetric": True, "type": "float", "zp_dtype": None}


@pytest.fixture(scope="module")
def kv_build(tmp_path_factory) -> tuple[dict, Store]:
    tmp = tmp_path_factory.mktemp("kv")
    store = Store(tmp / "store")
    doc = build_json(str(write_profile(tmp, tiny_profile(quantize=W4_KV))), "--store", str(store.root))
    assert doc["targets"][0]["status"] == "built", doc
    return doc, store


def test_scales_are_amax_of_transformers_own_kv_cache(kv_build):
    """Independent of our runner: the whole float model in transformers, K and V read from its DynamicCache
    (post-RoPE K), over the same calibration ids."""
    from transformers import AutoModelForCausalLM

    from toolchain.quant import calibration

    doc, store = kv_build
    src = store.object_dir(doc["stages"][0]["key"])
    cfg = json.loads((src / "config.json").read_text())
    ids, _ = calibration.token_ids(calibration.parse("random", Path), "text", CAL["samples"], CAL["seq_len"], 0,
                                   None, cfg["vocab_size"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    amax = torch.zeros(cfg["num_hidden_layers"], 2, dtype=torch.float64)
    with torch.no_grad():
        for row in ids:
            cache = model(row[None], use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                amax[i, 0] = max(amax[i, 0], layer.keys.abs().max().double())
                amax[i, 1] = max(amax[i, 1], layer.values.abs().max().double())
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    for i in range(cfg["num_hidden_layers"]):
        for j, x in enumerate("kv"):
            ours = ir.tensors.get(f"model.layers.{i}.self_attn.{x}_scale")
            assert ours.dtype == torch.float32 and ours.shape == (1,)
            torch.testing.assert_close(ours.double()[0], amax[i, j] / 448, rtol=1e-5, atol=0)


def test_checkpoint_carries_the_scheme_and_scales_as_llmcompressor_does(kv_build):
    doc, store = kv_build
    out = Path(doc["targets"][0]["path"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] == LLMC_KV_SCHEME
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        names = [k for k in h.keys() if k.endswith(("k_scale", "v_scale"))]
        assert len(names) == 2 * ir.config["num_hidden_layers"]
        for k in names:
            assert torch.equal(h.get_tensor(k), ir.tensors.get(k)), k
    kv = doc["targets"][0]["conformance"]["kv_scales"]
    assert kv["max_abs_err"] == 0 and kv["missing"] == []


def test_loader_rounds_k_and_v_as_vllm_does(kv_build):
    """The loader's forward (compressed-tensors' KV hook) equals a float model with our dequantized weights whose
    attention gets K / s and V / s cast to E4M3 (saturating) times s, and differs from one without the rounding."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from toolchain.quant.kv_cache import fake_fp8

    doc, store = kv_build
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    loaded = AutoModelForCausalLM.from_pretrained(doc["targets"][0]["path"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype=torch.float32)
    ref.load_state_dict({**ref.state_dict(), **{f"{n}.weight": ir.layer(n).dequantize() for n in ir.layers}})

    def rounded(module, query, key, value, attention_mask, **kwargs):
        k_s, v_s = (ir.tensors.get(f"model.layers.{module.layer_idx}.self_attn.{x}_scale") for x in "kv")
        return sdpa_attention_forward(module, query, fake_fp8(key, k_s), fake_fp8(value, v_s), attention_mask,
                                      **kwargs)

    AttentionInterface.register("test-fp8-kv", rounded)
    ids = torch.randint(0, ir.config["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = loaded(ids).logits
        plain = ref(ids).logits
        ref.config._attn_implementation = "test-fp8-kv"
        ours = ref(ids).logits
    assert (theirs - plain).abs().max() > 1e-4  # the rounding is visible...
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)  # ...and it is ours


def test_uncalibrated_kv_cache_is_said_not_written(tmp_path):
    """kv_cache: fp8 without calibration (kept for the trtllm targets, which write scales of 1): compressed-tensors
    gets no kv_cache_scheme, and its export says why."""
    store = Store(tmp_path / "store")
    doc = build_json(str(write_profile(tmp_path, tiny_profile(quantize={"method": "fp8", "kv_cache": "fp8"}))),
                     "--store", str(store.root))
    export = next(s for s in doc["stages"] if s["name"] == "export:compressed-tensors")
    info = store.manifest(export["key"])["info"]
    assert info["quantization_config"].get("kv_cache_scheme") is None and "quantize.calibration" in info["kv_cache"]


def test_calibrated_kv_with_a_format_without_kv_cache_exits_2(tmp_path):
    from conftest import run_cli

    data = tiny_profile(quantize=W4_KV, targets=["compressed-tensors", "gguf"])
    r = run_cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "gguf has no FP8 KV cache" in r.stderr, r.stderr
