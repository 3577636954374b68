"""Every method on tiny Qwen2, Qwen3 and Mistral models (transformers' own config classes, random biases and q/k
norm weights; tests/conftest.py tiny_hf_config):

- AWQ's fold is exact per family: scales moved into the weights and folded into the producers (norms, v_proj's
  rows *and bias*) leave transformers' own decoder layer computing the same thing, Qwen3's q/k norms included;
- a full `toolchain build` per method into every target that holds it, each artifact reloaded by its own loader
  (weights equal to ours in the loader's arithmetic) with export fidelity gated (KL <= 1e-4, top-1 >= 99%), and
  biases carried unquantized; ONNX's graph scored against transformers on our dequantized weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_profile

from toolchain import blocks
from toolchain.quant import awq
from toolchain.quant.layerwise import BlockCalibration

SEQ = 32


def _block_and_calib(family_dir, family):
    from safetensors.torch import load_file

    cfg = blocks.hf_config(family_dir)
    tensors = load_file(str(family_dir / "model.safetensors"))
    block = blocks.load_block(cfg, tensors.__getitem__, 0, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, SEQ, cfg.hidden_size, generator=g)
    x[..., [3, 17, 40, 77]] *= 25
    kwargs = blocks.block_kwargs(cfg, SEQ, torch.device("cpu"), torch.float32)
    targets = {f"model.layers.0.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return cfg, block, BlockCalibration(block, "model.layers.0", x, kwargs, targets, 4, torch.device("cpu"),
                                        torch.float32)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_awq_fold_is_exact_per_family(monkeypatch, tiny_family_dir, family):
    cfg, block, calib = _block_and_calib(tiny_family_dir(family), family)
    reference = calib.forward().clone()
    g = torch.Generator().manual_seed(7)

    def forced(weights, x_mean, *_args, **_kwargs):  # scales far from 1, whatever the search would pick
        s = torch.exp(torch.empty(x_mean.shape[0]).uniform_(-1.5, 1.5, generator=g))
        return awq.ScaleSearch(scale=s, alpha=0.5, loss=0.0, loss_rtn=0.0)

    monkeypatch.setattr(awq, "search_scale", forced)
    groups = awq.groups_of(cfg.model_type)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = {k: awq.InputStats(linears[k].in_features) for k in {gr.stats for gr in groups}}
    calib.collect([f"model.layers.0.{k}" for k in stats], lambda n, x: stats[n.removeprefix("model.layers.0.")].add(x))
    spec = awq.IntSpec(4, 32, True, "group", torch.float32)
    sb = awq.scale_block({n: m.weight for n, m in linears.items()},
                         {k: block.get_submodule(k).weight for k in ("input_layernorm", "post_attention_layernorm")},
                         stats, set(linears), spec, awq.AWQOptions(), (cfg.num_attention_heads,
                                                                      cfg.num_key_value_heads,
                                                                      block.self_attn.head_dim),
                         {n: m.bias for n, m in linears.items() if m.bias is not None}, groups)
    assert set(sb.searches) == {gr.producer for gr in groups}
    with torch.no_grad():
        for name, w in {**sb.weights, **sb.norms}.items():
            block.get_submodule(name).weight.copy_(w)
        unbiased = calib.forward().clone()
        for name, b in sb.biases.items():
            block.get_submodule(name).bias.copy_(b)
    out = calib.forward()
    rel = ((out - reference).abs().max() / reference.abs().max()).item()
    assert rel < 1e-5, f"the fold changed the float {family} block by {rel:.2e} of its output range"
    if family == "qwen2":  # v_proj's bias must be divided with its rows: without it the block is wrong
        assert "self_attn.v_proj" in sb.biases
        assert ((unbiased - reference).abs().max() / reference.abs().max()).item() > 1e-3


def test_no_fold_through_qk_norm():
    from toolchain.families import Family, SmoothPair

    with pytest.raises(ValueError, match="q_norm/k_norm"):
        Family("bad", ("bad",), ("Bad",), qk_norm=True,
               smoothing=(SmoothPair("self_attn.k_proj", ("self_attn.q_proj",)),))


# -- full builds: every method into every target that holds it -----------------------------------------------

TARGETS = {"rtn": ["compressed-tensors", "gptq", "onnx"], "fp8": ["compressed-tensors"],
           "gptq": ["compressed-tensors", "gptq", "onnx"], "awq": ["compressed-tensors", "gptq", "onnx"],
           "nf4": ["bnb"]}
QUANTIZE = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    "fp8": {"method": "fp8"},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True,
             "calibration": {"dataset": "random", "samples": 4, "seq_len": 32}},
    "awq": {"method": "awq", "bits": 4, "group_size": 32, "symmetric": False,
            "calibration": {"dataset": "random", "samples": 4, "seq_len": 32}},
    "nf4": {"method": "nf4"},
}
# One (family, method) per family in the default run; the whole matrix under -m slow.
FAST = {("qwen2", "awq"), ("qwen3", "gptq"), ("mistral", "rtn")}
CASES = [pytest.param(f, m, marks=() if (f, m) in FAST else pytest.mark.slow, id=f"{f}-{m}")
         for f in ("qwen2", "qwen3", "mistral") for m in TARGETS]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_build_every_target_that_holds_the_method(cli, tmp_path, tiny_family_dir, family, method):
    src = tiny_family_dir(family)
    profile = {"name": f"{family}-{method}", "source": {"path": str(src)}, "quantize": QUANTIZE[method],
               "targets": TARGETS[method]}
    r = cli("build", str(write_profile(tmp_path, profile)), "--store", str(tmp_path / "store"), "--json")
    doc = json.loads(r.output[r.output.index("{"):])
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == set(TARGETS[method])
    for name, t in targets.items():
        assert t["status"] == "built", (name, t.get("validation"))
        conf = t["conformance"]
        assert conf["layers_checked"] == 14 and conf["max_abs_err"] <= conf["tolerance"], (name, conf)
        fid = t.get("export_fidelity")
        if fid is not None:
            assert fid["passed"] and fid["kl_mean"] <= 1e-4 and fid["top1_agreement"] >= 0.99, (name, fid)
        else:  # onnx: its check scores the whole graph against transformers on our dequantized weights
            assert name == "onnx" and conf["wiring"]["max_rel_err"] <= conf["wiring"]["tolerance"], (name, conf)
            kl, top1 = _onnx_fidelity(tmp_path / "store", doc)
            assert kl <= 1e-4 and top1 >= 0.99, (kl, top1)
    quant = next(s for s in doc["stages"] if s["name"] == "quantize")
    _biases_carried(src, tmp_path / "store", quant["key"])


def _biases_carried(src, store, quant_key):
    """The IR holds every source bias unquantized and unchanged (AWQ may rescale v_proj's: then it differs)."""
    from safetensors.torch import load_file

    from toolchain.ir import IRReader
    from toolchain.store import Store

    source = load_file(str(src / "model.safetensors"))
    ir = IRReader(Store(store).object_dir(quant_key))
    biases = [n for n in source if n.endswith(".bias")]
    assert set(biases) <= set(ir.plain_names())
    for n in biases:
        assert n.removesuffix(".bias") in ir.layers  # the linear is quantized, its bias carried as it is
        assert ir.tensors.get(n).shape == source[n].shape
        if not n.endswith("v_proj.bias"):
            assert torch.equal(ir.tensors.get(n), source[n])


def _onnx_fidelity(store, doc) -> tuple[float, float]:
    """KL(transformers on our dequantized weights || onnxruntime on the artifact) and top-1 agreement, per token."""
    from toolchain.formats.onnx.check import ort_logits, session
    from toolchain.formats.onnx.export import dense_model
    from toolchain.formats.onnx.spec import MODEL_FILE
    from toolchain.store import Store

    keys = {s["name"]: s["key"] for s in doc["stages"]}
    st = Store(store)
    model, ir = dense_model(st.object_dir(keys["quantize"]))
    ids = torch.randint(0, ir.config["vocab_size"], (128,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=False).logits[0].double()
    got = ort_logits(session(st.object_dir(keys["export:onnx"]) / MODEL_FILE))(ids).double()
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
