"""AWQ (toolchain.quant.awq): the fold leaves the float model unchanged, the scale and clipping searches lower the
error RTN leaves, the objective computed through H = E[x x^T] equals the directly measured output error, and
the whole pipeline exports a checkpoint transformers reloads with our weights and folded norms."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA, WIKITEXT, needs_shakespeare, needs_smollm2, needs_wikitext

from toolchain.quant import awq
from toolchain.quant.layerwise import BlockCalibration, rotary

CALIBRATION_TEXT = DATA / "tinyshakespeare" / "input.txt"
N_SAMPLES, SEQ = 8, 64
OUTLIERS = (3, 17, 40, 77, 101)  # hidden channels with activations ~25x the others: the AWQ setting


def tiny_config(num_kv_heads: int = 2):
    from transformers import LlamaConfig

    from toolchain.arch import ARCHS

    base = {k: v for k, v in ARCHS["llama-tiny"].items() if k not in ("architectures", "model_type")}
    cfg = LlamaConfig(**{**base, "num_key_value_heads": num_kv_heads})
    cfg._attn_implementation = "sdpa"
    return cfg


def random_block(cfg, seed: int = 0):
    """A decoder layer with random weights and norms that are not all ones (so a fold has something to do)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    g = torch.Generator().manual_seed(seed)
    block = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return block


def outlier_inputs(cfg, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, SEQ, cfg.hidden_size, generator=g)
    x[..., list(OUTLIERS)] *= 25
    return x


def calibration(block, cfg, x: torch.Tensor, ignore: tuple[str, ...] = ()) -> BlockCalibration:
    cos, sin = rotary(cfg, SEQ, torch.device("cpu"), torch.float32)
    kwargs = {"position_embeddings": (cos, sin), "attention_mask": None, "position_ids": torch.arange(SEQ)[None]}
    targets = {f"model.layers.0.{n}": m for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith(ignore)}
    return BlockCalibration(block, "model.layers.0", x, kwargs, targets, 4, torch.device("cpu"), torch.float32)


def block_stats(block, calib: BlockCalibration) -> dict[str, awq.InputStats]:
    linears = dict(block.named_modules())
    stats = {k: awq.InputStats(linears[k].in_features) for k in ("self_attn.q_proj", "self_attn.o_proj",
                                                                    "mlp.gate_proj", "mlp.down_proj")}
    calib.collect([f"model.layers.0.{k}" for k in stats],
                  lambda n, x: stats[n.removeprefix("model.layers.0.")].add(x))
    return stats


def args(symmetric: bool = True, **extra) -> dict:
    return {"method": "awq", "bits": 4, "group_size": 32, "symmetric": symmetric, "strategy": "group",
            "scale_dtype": torch.float32, **extra}


def load_scaled(block, sb: awq.ScaledBlock, fold: bool) -> None:
    """Put the scaled float weights into the block; unfolded, each scaled linear divides its input by s."""
    with torch.no_grad():
        for name, w in sb.weights.items():
            block.get_submodule(name).weight.copy_(w)
        for name, w in sb.norms.items():
            block.get_submodule(name).weight.copy_(w)
        if not fold:
            for name, s in sb.col_scale.items():
                block.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s, *a[1:]))


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "pre_quant_scale"])
def test_scaling_alone_leaves_block_outputs_unchanged(monkeypatch, num_kv_heads, fold):
    """Scales (forced far from 1 so the test does not depend on what the search picks) moved into the weights
    and folded into the producers, or kept as input divisors, change nothing in the float block."""
    cfg = tiny_config(num_kv_heads)
    block = random_block(cfg)
    x = outlier_inputs(cfg)
    calib = calibration(block, cfg, x)
    reference = calib.forward().clone()
    g = torch.Generator().manual_seed(7)

    def forced(weights, x_mean, *_args, **_kwargs):
        s = torch.exp(torch.empty(x_mean.shape[0]).uniform_(-1.5, 1.5, generator=g))
        return awq.ScaleSearch(scale=s, alpha=0.5, loss=0.0, loss_rtn=0.0)

    monkeypatch.setattr(awq, "search_scale", forced)
    quantize = {n.removeprefix("model.layers.0.") for n in calib.targets}
    sb = awq.scale_block({n: m.weight for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)},
                         {k: block.get_submodule(k).weight for k in ("input_layernorm", "post_attention_layernorm")},
                         block_stats(block, calib), quantize, awq.spec_from(args()), awq.AWQOptions(fold=fold),
                         (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim))
    assert set(sb.searches) == {g.producer for g in awq.LLAMA_GROUPS}, "every group, v -> o included, is scaled"
    assert min((s - 1).abs().max().item() for s in sb.col_scale.values()) > 0.5
    load_scaled(block, sb, fold)
    out = calib.forward()
    rel = ((out - reference).abs().max() / reference.abs().max()).item()
    assert rel < 1e-5, f"scaling changed the float block by {rel:.2e} of its output range"


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_fast_fake_quantization_is_rtn_bit_for_bit(scale_dtype, symmetric, strategy):
    """The searches' fake quantization must be exactly what quantize_rtn then dequantize() produce."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=g) * 0.1
    w[0, :32] = 0  # an all-zero group
    w[1, 32:64] = w[1, 32:64].abs()  # a group with no negative weight
    spec = awq.IntSpec(4, 32 if strategy == "group" else None, symmetric, strategy, scale_dtype)
    assert torch.equal(spec.fake(w), spec.quantize(w).dequantize(torch.float32))


def test_objective_through_h_equals_measured_output_error():
    """The search's loss, sum((E H) * E), against the output error measured on the tokens in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 96, generator=g)
    x[:, :4] *= 20
    w = torch.randn(48, 96, generator=g) * 0.1
    st = awq.InputStats(96)
    for part in x.split(500):
        st.add(part)
    spec = awq.spec_from(args(symmetric=False))
    found = awq.search_scale([w], st.mean_abs, st.hessian, spec.fake, grid=11)
    s = found.scale
    w_eff = (spec.fake(w * s) / s).double()
    measured = ((x.double() @ (w.double() - w_eff).T) ** 2).sum(1).mean().item()
    assert found.loss == pytest.approx(measured, rel=1e-4)
    assert found.losses[0] == found.loss_rtn  # alpha = 0 is plain RTN
    rtn_measured = ((x.double() @ (w.double() - spec.fake(w).double()).T) ** 2).sum(1).mean().item()
    assert found.loss_rtn == pytest.approx(rtn_measured, rel=1e-4)
    assert found.alpha > 0 and found.loss < 0.8 * found.loss_rtn


def test_clipping_aware_and_duo_searches_never_score_worse():
    """Scoring candidates after clipping finds a final error no worse than clipping the scale chosen without
    it (that pair is among its candidates); duo candidates add to the plain ones and can only lower the loss."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 128, generator=g)
    x[:, :6] *= 15
    ws = [torch.randn(96, 128, generator=g) * 0.05, torch.randn(64, 128, generator=g) * 0.05]
    st = awq.InputStats(128)
    st.add(x)
    spec = awq.spec_from(args())
    h = st.hessian

    def clip(w, h_s):
        return awq.search_clip(w, h_s, spec)

    aware = awq.search_scale(ws, st.mean_abs, h, spec.fake, grid=8, clips=[clip, clip])
    plain = awq.search_scale(ws, st.mean_abs, h, spec.fake, grid=8)
    s = plain.scale
    h_s = h / (s[:, None] * s[None, :])
    after = sum(awq.output_mse(w, spec.fake(clip(w * s, h_s)) / s, h).item() for w in ws)
    assert aware.loss <= after * (1 + 1e-6)
    duo = awq.search_scale(ws, st.mean_abs, h, spec.fake, grid=8, w_mean=awq.weight_mean(ws, 32))
    assert len(duo.losses) == 16 and duo.losses[:8] == pytest.approx(plain.losses)
    assert duo.loss <= plain.loss


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_clip_search_lowers_linear_output_error(symmetric):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.01] *= 8  # a few large weights stretch their groups' ranges
    st = awq.InputStats(128)
    st.add(x)
    spec = awq.spec_from(args(symmetric))
    clipped = awq.search_clip(w, st.hessian, spec)
    assert (clipped.abs() <= w.abs()).all() and not torch.equal(clipped, w)
    plain = awq.output_mse(w, spec.fake(w), st.hessian).item()
    after = awq.output_mse(w, spec.fake(clipped), st.hessian).item()
    assert after < (0.9 if symmetric else 0.98) * plain, (after, plain)


def block_error(block, calib, reference, result) -> float:
    from toolchain.quant.layerwise import _apply_result

    _apply_result(block, "model.layers.0", result, torch.float32, torch.float32)
    return ((calib.forward() - reference) ** 2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_awq_lowers_block_output_error_vs_rtn(symmetric):
    """A random block fed activations with a few large channels: AWQ's block output error is well below RTN's,
    with and without the clipping search."""
    from toolchain.quant.layerwise import BlockResult
    from toolchain.quant.rtn import quantize_rtn

    cfg = tiny_config()
    x = outlier_inputs(cfg)
    reference = calibration(random_block(cfg), cfg, x).forward().clone()

    block = random_block(cfg)
    calib = calibration(block, cfg, x)
    rtn = BlockResult({n: quantize_rtn(m.weight, 4, 32, symmetric, "group", torch.float32)
                       for n, m in calib.targets.items()})
    err_rtn = block_error(block, calib, reference, rtn)

    errs = {}
    for clip in (False, True):
        block = random_block(cfg)
        calib = calibration(block, cfg, x)
        result = awq.quantize_block(block, "model.layers.0", calib, args(symmetric, awq_clip=clip))
        assert set(result.quantized) == set(calib.targets)
        assert set(result.replaced) == {"model.layers.0.input_layernorm.weight",
                                        "model.layers.0.post_attention_layernorm.weight"}
        errs[clip] = block_error(block, calib, reference, result)
    assert errs[False] < 0.8 * err_rtn, (errs, err_rtn)
    assert errs[True] < 0.6 * err_rtn, (errs, err_rtn)


def test_unquantized_consumer_is_not_scaled_and_unquantized_producer_is_replaced():
    """Scaling helps only quantized consumers: with down_proj ignored, up -> down is skipped; with v_proj
    ignored, its rows still take the v -> o fold and come back as a replaced plain tensor."""
    cfg = tiny_config()
    x = outlier_inputs(cfg)
    block = random_block(cfg)
    calib = calibration(block, cfg, x, ignore=("down_proj", "v_proj"))
    result = awq.quantize_block(block, "model.layers.0", calib, args())
    assert "model.layers.0.mlp.down_proj" not in result.quantized
    assert "model.layers.0.mlp.up_proj.weight" not in result.replaced
    assert "model.layers.0.self_attn.v_proj.weight" in result.replaced
    reference = calibration(random_block(cfg), cfg, x).forward().clone()
    rtn_free = block_error(block, calib, reference, result)
    assert rtn_free > 0  # quantized, yet the block still runs with the replaced v_proj


def test_pre_quant_scale_kept_unfolded():
    cfg = tiny_config()
    block = random_block(cfg)
    calib = calibration(block, cfg, outlier_inputs(cfg))
    result = awq.quantize_block(block, "model.layers.0", calib, args(awq_fold=False))
    assert result.replaced == {}
    with_pqs = {n for n, q in result.quantized.items() if "pre_quant_scale" in q.extras}
    assert with_pqs == set(calib.targets)
    qkv = [result.quantized[f"model.layers.0.self_attn.{p}_proj"].extras["pre_quant_scale"] for p in "qkv"]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])  # one shared input, one scale
    assert qkv[0].shape == (cfg.hidden_size,)


needs_calibration_text = needs_shakespeare


@needs_calibration_text
def test_pipeline_exports_folded_norms_and_reloads_exactly(tmp_path):
    """llama-tiny through quantize (awq) -> compressed-tensors: transformers reloads every quantized layer as our
    dequantized weight, and the folded norms (plain tensors the method replaced) are what the checkpoint holds."""
    from conftest import build_json, tiny_profile, write_profile
    from transformers import AutoModelForCausalLM

    from toolchain.ir import IRReader, TensorReader
    from toolchain.store import Store
    from toolchain.validate.accuracy import loader_dense_weight

    quantize = {"method": "awq", "bits": 4, "group_size": 32, "symmetric": False,
                "calibration": {"dataset": str(CALIBRATION_TEXT), "samples": 16, "seq_len": 128}}
    store = Store(tmp_path / "store")
    doc = build_json(str(write_profile(tmp_path, tiny_profile(quantize=quantize))), "--store", str(store.root))
    assert doc["targets"][0]["status"] == "built", doc
    assert doc["targets"][0]["conformance"]["max_abs_err"] == 0
    source = TensorReader(store.object_dir(doc["stages"][0]["key"]))
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    model = AutoModelForCausalLM.from_pretrained(doc["targets"][0]["path"], dtype=torch.float32)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    assert len(ir.layers) == 14
    for name in ir.layers:
        assert torch.equal(loader_dense_weight(modules[name]).float(), ir.layer(name).dequantize()), name
    norms = [k for k in ir.plain_names() if k.endswith("layernorm.weight")]
    assert len(norms) == 4
    for k in norms:
        assert torch.equal(params[k].data, ir.tensors.get(k)), k
        assert not torch.equal(ir.tensors.get(k), source.get(k)), f"{k}: no scale was folded in"


@needs_smollm2
@needs_wikitext
@needs_calibration_text
@pytest.mark.parametrize("symmetric", [pytest.param(True, marks=pytest.mark.slow), False], ids=["sym", "asym"])
def test_smollm2_awq_perplexity_increase_below_rtn(tmp_path, smol_store, smol_source, symmetric):
    """SmolLM2-135M at INT4 g64 (its GGUF weights are g32, so g64 RTN loses something): AWQ calibrated on Tiny
    Shakespeare loses less WikiText-2 perplexity than RTN (whole model, 64 x 512 calibration tokens, 8 windows of
    2,048 evaluation tokens: -m slow). On the first layers alone (the default run, asymmetric only: 8 x 256, 8
    windows of 512) the network predicts nothing sensible (perplexity ~1e8), so perplexity cannot rank the two
    there: that run checks that AWQ on real weights changes them, reloads bit-exact and passes its gates."""
    from conftest import SMOL_GGUF, build_json, smol_profile, write_profile

    full = smol_source["path"] == SMOL_GGUF
    seq_len, windows = (2048, 8) if full else (512, 8)
    acc = {"dataset": str(WIKITEXT), "seq_len": seq_len, "max_tokens": seq_len * windows, "gates": "none"}
    calibration = {"dataset": str(CALIBRATION_TEXT), "samples": 64 if full else 8, "seq_len": 512 if full else 256}
    base = {"bits": 4, "group_size": 64, "symmetric": symmetric, "ignore": ["lm_head"]}
    results = {}
    for method, extra in (("rtn", {}), ("awq", {"calibration": calibration})):
        profile = write_profile(tmp_path, smol_profile(source=smol_source,
                                                       quantize={"method": method, **base, **extra},
                                                       validate={"accuracy": acc}), name=f"{method}.yaml")
        doc = build_json(str(profile), "--store", str(smol_store))
        assert doc["targets"][0]["status"] in ("built", "cached"), doc  # RTN may be in the shared store
        assert doc["targets"][0]["conformance"]["max_abs_err"] == 0, doc["targets"][0]["conformance"]
        results[method] = doc["targets"][0]["validation"]
    assert results["awq"]["tokens"] == windows * (seq_len - 1)
    rtn, ours = results["rtn"]["ppl_increase_pct"], results["awq"]["ppl_increase_pct"]
    if full:
        assert 0 < ours < rtn, (ours, rtn)
    else:
        assert results["awq"]["passed"] and ours != rtn, results


def test_profile_awq_options_belong_to_awq():
    from conftest import tiny_profile

    from toolchain.errors import InputError
    from toolchain.profile import from_dict

    cal = {"dataset": "random", "samples": 4, "seq_len": 32}
    q = from_dict(tiny_profile(quantize={"method": "awq", "awq_grid": 10, "awq_fold": False, "calibration": cal}))
    assert (q.profile.quantize.awq_grid, q.profile.quantize.awq_clip, q.profile.quantize.awq_fold) == (10, True, False)
    with pytest.raises(InputError, match="awq_clip: AWQ options"):
        from_dict(tiny_profile(quantize={"method": "rtn", "awq_clip": False}))
    with pytest.raises(InputError, match="awq_grid"):
        from_dict(tiny_profile(quantize={"method": "awq", "awq_grid": 1, "calibration": cal}))
