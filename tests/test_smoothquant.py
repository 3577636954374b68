"""W8A8 INT8 with SmoothQuant (method: smoothquant): the smoothing search against plain W8A8, the fold that keeps
the float model unchanged, the compressed-tensors checkpoint against llm-compressor's W8A8 preset, and the
loader's forward (compressed-tensors quantizing activations per token) against our emulation of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_json, have, tensors_of, tiny_profile, write_profile

from toolchain.ir import IRReader
from toolchain.quant.smoothquant import fake_act_int8, search_alpha, smoothing_scales, w8a8_error
from toolchain.store import Store

SQ = {"method": "smoothquant", "calibration": {"dataset": "random", "samples": 4, "seq_len": 64}, "device": "cpu"}




def test_activation_quantizer_against_float64():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 96)
    s = x.double().abs().amax(-1, keepdim=True) / 127
    ref = torch.clamp(torch.round(x.double() / s), -128, 127) * s
    # the same integer codes; the float32 scale and product differ from float64 by rounding only
    assert ((fake_act_int8(x).double() - ref).abs() <= 1e-4 * s).all()
    assert ((fake_act_int8(x) - x).abs() <= s.float() / 2 * (1 + 1e-5)).all()


def test_smoothing_beats_plain_w8a8_on_outlier_channels():
    """Activations with a few channels 50x larger (the case SmoothQuant is for): the search picks an alpha, and
    its W8A8 error is lower than without smoothing, which it also scores."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 50
    weights = [torch.randn(96, 128, generator=g) * 0.02 for _ in range(2)]
    alpha, s, losses = search_alpha(x, weights, [i / 10 for i in range(11)], torch.float32)
    assert alpha is not None and losses[f"{alpha:g}"] < 0.5 * losses["none"], losses
    assert torch.equal(s, smoothing_scales(x.abs().amax(0), torch.stack([w.abs().amax(0) for w in weights]).amax(0),
                                           alpha))
    ref = [x @ w.T for w in weights]
    assert w8a8_error(x, weights, s, torch.float32, ref) == min(losses.values())
    # the fold is exact in float: (x / s) (w diag(s))^T == x w^T
    torch.testing.assert_close((x / s) @ (weights[0] * s).T, ref[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sq_build(tmp_path_factory) -> tuple[dict, Store]:
    tmp = tmp_path_factory.mktemp("sq")
    store = Store(tmp / "store")
    doc = build_json(str(write_profile(tmp, tiny_profile(quantize=SQ))), "--store", str(store.root))
    assert doc["targets"][0]["status"] == "built", doc
    assert doc["targets"][0]["conformance"]["max_abs_err"] == 0
    return doc, store


def test_ir_is_w8a8_with_norms_folded(sq_build):
    doc, store = sq_build
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    src = tensors_of(store.object_dir(doc["stages"][0]["key"]))
    for name, meta in ir.layers.items():
        assert meta["bits"] == 8 and meta["strategy"] == "channel" and meta["activations"] == \
            "dynamic-per-token-int8", name
    for i in range(ir.config["num_hidden_layers"]):
        for norm, first in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.gate_proj")):
            name = f"model.layers.{i}.{norm}.weight"
            changed = not torch.equal(ir.tensors.get(name), src[name])
            assert changed == (ir.layers[f"model.layers.{i}.{first}"]["smoothquant_alpha"] is not None), name


@pytest.mark.skipif(not have("llmcompressor"), reason="llm-compressor not installed: pip install llmcompressor")
def test_config_equals_llmcompressor_w8a8_and_unsmoothed_layers_are_bit_equal(sq_build, tmp_path):
    """llm-compressor's W8A8 preset (RTN, no smoothing) on the same model: the same quantization_config key by key;
    o_proj and down_proj (no norm before them, so never smoothed) the same int8 codes and scales."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    doc, store = sq_build
    model = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
            output_dir=str(tmp_path / "llmc"), save_compressed=True)
    ours = Path(doc["targets"][0]["path"])
    assert json.loads((ours / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "llmc" / "config.json").read_text())["quantization_config"]
    a, b = tensors_of(ours), tensors_of(tmp_path / "llmc")
    assert sorted(a) == sorted(b)
    unsmoothed = [k for k in b if ("o_proj" in k or "down_proj" in k)]
    assert len(unsmoothed) == 4 * 2
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    for k in unsmoothed:
        assert torch.equal(a[k], b[k]), k


def test_loader_quantizes_activations_as_we_emulate(sq_build):
    """transformers + compressed-tensors run the checkpoint with int8 per-token activations; a float model with
    our dequantized weights and folded norms, its linears fed fake_act_int8(x) in compressed-tensors' convention
    (scale amax / 127.5), gives the same logits. vLLM's kernel divides by 127, a visibly different model: the
    validator switches the loader's own input quantization off and puts vLLM's in front, which this checks too."""
    from transformers import AutoModelForCausalLM

    doc, store = sq_build
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    loaded = AutoModelForCausalLM.from_pretrained(doc["targets"][0]["path"], dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype=torch.float32)
    state = {n: ir.tensors.get(n).float() for n in ir.plain_names()}
    state.update({f"{n}.weight": ir.layer(n).dequantize() for n in ir.layers})
    ours.load_state_dict({**ours.state_dict(), **state})
    plain = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype=torch.float32)
    plain.load_state_dict({**plain.state_dict(), **state})
    for name in ir.layers:
        ours.get_submodule(name).register_forward_pre_hook(lambda _m, args: (fake_act_int8(args[0], 127.5),))
    vllm = AutoModelForCausalLM.from_pretrained(store.object_dir(doc["stages"][0]["key"]), dtype=torch.float32)
    vllm.load_state_dict({**vllm.state_dict(), **state})
    for name in ir.layers:
        vllm.get_submodule(name).register_forward_pre_hook(lambda _m, args: (fake_act_int8(args[0]),))
    ids = torch.randint(0, ir.config["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, emulated, unquantized_acts = loaded(ids).logits, ours(ids).logits, plain(ids).logits
        as_vllm = vllm(ids).logits
    assert (theirs - unquantized_acts).abs().max() > 1e-5  # the loader does quantize the activations...
    torch.testing.assert_close(theirs, emulated, rtol=0, atol=1e-5)  # ...as we emulate them
    # vLLM's rounding (amax / 127) is another model; the validator scores that one, through the same loader
    assert (as_vllm - theirs).abs().max() > 1e-4
    from toolchain.formats.compressed_tensors.check import vllm_int8_activations

    assert vllm_int8_activations(loaded, store.object_dir(doc["stages"][1]["key"])) == len(ir.layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, as_vllm, rtol=0, atol=1e-5)


def test_trtllm_reading_the_checkpoint_is_refused_at_plan(tmp_path):
    from conftest import run_cli

    data = tiny_profile(quantize=SQ, targets=[{"format": "compressed-tensors", "runtimes": ["trtllm"]}])
    r = run_cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "trtllm-ct-int8" in r.stderr, r.stderr
