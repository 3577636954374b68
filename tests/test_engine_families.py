"""The built-in runtime beyond Llama (issue 23): Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm before the
rotary and its own head size, Mistral, GQA 4:1 to 8:1.

- The float32 twin (the reference the speed stage gates every block against) against transformers' own forward
  of tiny random models built from transformers' config classes: logits within 1e-5 relative, prefill and a
  decode step on the static cache. A twin that drops the bias or the norms fails the same comparison.
- The decode-attention kernel with bias and q/k norms against its float64 reference, and the whole fast path
  (Triton linears, fused attention, split norms) against the twin, in the Triton interpreter on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

# family -> config-class arguments: GQA 4:1 and 8:1, head sizes of 32 to 128, Qwen3's head size unlike
# hidden / heads (4 x 128 = 512 against a hidden size of 96)
SHAPES = {
    "llama": {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1},
    "mistral": {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32},
    "qwen2": {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 1},
    "qwen3": {"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128},
}
COMMON = {"intermediate_size": 160, "num_hidden_layers": 2, "vocab_size": 120, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def _config(family: str, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6 if family.startswith("qwen") else 1e4}}
    return cls(**{**COMMON, **SHAPES[family], **rope, **extra})


def hf_model(family: str, directory, seed: int = 0, **extra):
    """A random float32 model of the family, saved as a plain Hugging Face checkpoint in `directory`. Biases and
    norm weights are drawn at random too (transformers initializes them to 0 and 1, where a runtime that
    ignored them would still agree)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, **extra), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model


def _twin_errors(family: str, directory, **extra) -> tuple[float, float]:
    """(prefill, decode) relative error of the float32 twin's logits against transformers' forward."""
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    hf = hf_model(family, directory, **extra)
    model = Model(Checkpoint.open(directory), torch.device("cpu"), torch.float32, use_kernels=False)
    ids = torch.randint(0, model.vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    model.alloc_cache(2, 24)
    ours = model.prefill(ids, all_logits=True)
    prefill = float((ours - ref).norm() / ref.norm())
    model.alloc_cache(2, 24)
    model.prefill(ids[:, :19])
    step = model.decode(ids[:, 19:20], torch.tensor(19))
    decode = float((step - ref[:, 19]).norm() / ref[:, 19].norm())
    return prefill, decode


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_the_float32_twin_matches_transformers(tmp_path, family):
    prefill, decode = _twin_errors(family, tmp_path)
    assert prefill < 1e-5 and decode < 1e-5, (family, prefill, decode)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_on_all_four_projections(tmp_path, family):
    """config.attention_bias: true puts a bias on q, k, v and o in Llama and Qwen3 (not in Qwen2: o has none)."""
    prefill, decode = _twin_errors(family, tmp_path, attention_bias=True)
    assert prefill < 1e-5 and decode < 1e-5, (family, prefill, decode)


@pytest.mark.parametrize("family,drop", [("qwen2", "qkv_bias"), ("qwen3", "qk_norm"), ("llama", "o_bias")])
def test_a_twin_that_drops_a_feature_fails_the_comparison(tmp_path, monkeypatch, family, drop):
    """The comparison can fail: the same twin told the family has no bias (or no norms) is far off."""
    from toolchain.engine import model as engine_model

    real = engine_model.attention_traits

    def without(cfg):
        t = real(cfg)
        return type(t)(**{**t.__dict__, drop: False})

    monkeypatch.setattr(engine_model, "attention_traits", without)
    prefill, decode = _twin_errors(family, tmp_path, **({"attention_bias": True} if drop == "o_bias" else {}))
    assert prefill > 1e-3 and decode > 1e-3, (family, drop, prefill, decode)


def test_the_runtime_refuses_what_it_does_not_run(tmp_path):
    from toolchain.engine.model import attention_traits
    from toolchain.errors import BuildError

    assert attention_traits({"model_type": "mistral", "sliding_window": 4096}).window == 4096
    assert attention_traits({"model_type": "qwen2", "sliding_window": 4096}).window is None  # use_sliding_window off
    for bad in ({"model_type": "gpt2"}, {"model_type": "llama", "mlp_bias": True}):
        with pytest.raises(BuildError):
            attention_traits(bad)
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    hf_model("mistral", tmp_path, sliding_window=16)
    model = Model(Checkpoint.open(tmp_path), torch.device("cpu"), torch.float32, use_kernels=False)
    model.alloc_cache(1, 16)  # within the window: plain attention is the same
    with pytest.raises(BuildError, match="sliding window of 16"):
        model.alloc_cache(1, 17)


# -- the kernels, in the Triton interpreter ----------------------------------------------------------------------

def _triton_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0


NEEDS_TRITON = pytest.mark.skipif(not _triton_importable(), reason="triton not installed (pip install triton)")


def _in_the_interpreter(function: str):
    code = f"import json; from test_engine_families import {function}; print(json.dumps({function}()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1500, cwd=REPO / "tests",
                       env={**os.environ, "TRITON_INTERPRET": "1",
                            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                           os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# (batch, heads, kv heads, head size, cache length, position, slices, bias, q/k norms, split-norm scale)
ATTENTION_CASES = [(1, 8, 2, 128, 40, 33, 2, True, False, True), (2, 16, 2, 128, 40, 20, 1, False, True, False),
                   (1, 8, 1, 64, 30, 0, 3, True, True, True), (3, 4, 1, 32, 50, 49, 2, True, True, False)]


def _attention_errors(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple[str, float]]:
    from toolchain.engine import kernels as K

    g = torch.Generator().manual_seed(7)
    out = []
    for b, nh, nkv, hd, length, pos, slices, bias, norm, split in ATTENTION_CASES:
        width = (nh + 2 * nkv) * hd
        qkv = torch.randn(slices, b, width, generator=g).to(device)
        kc = torch.randn(b, nkv, length, hd, generator=g).to(device, dtype)
        vc = torch.randn(b, nkv, length, hd, generator=g).to(device, dtype)
        inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        emb = torch.outer(torch.arange(length, dtype=torch.float64), inv).repeat(1, 2)
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        extra = {"bias": (torch.randn(width, generator=g) * 3).to(device, dtype) if bias else None,
                 "q_norm": (torch.rand(hd, generator=g) + 0.5).to(device, dtype) if norm else None,
                 "k_norm": (torch.rand(hd, generator=g) + 0.5).to(device, dtype) if norm else None,
                 "head_eps": 1e-6}
        if split:
            extra |= {"ss": (torch.rand(b, 3, generator=g) * 300 + 1).to(device), "n": 300, "eps": 1e-5}
        kr, vr = kc.clone(), vc.clone()
        got = K.decode_attention(qkv, kc, vc, cos, sin, torch.tensor(pos, device=device), nh, nkv, **extra)
        want = K.decode_attention_reference(qkv, kr, vr, cos, sin, pos, nh, nkv, **extra)
        name = f"b{b} h{nh}/{nkv} d{hd} pos {pos} bias {bias} norm {norm} split {split}"
        out.append((name, float((got.double() - want).norm() / want.norm())))
        cache = max(float((c.double() - r.double()).abs().max() / r.double().abs().max())
                    for c, r in ((kc, kr), (vc, vr)))
        out.append((f"{name} cache", cache))
    return out


@NEEDS_TRITON
def test_decode_attention_with_bias_and_qk_norms_matches_float64_in_the_interpreter():
    errors = _in_the_interpreter("_attention_errors")
    assert len(errors) == 2 * len(ATTENTION_CASES)
    for name, err in errors:
        assert err < 1e-5, (name, err)


def _fast_path_checks() -> list[tuple[str, float]]:
    """The fast path (Triton linears, fused attention with bias / norms, split norms) of a Qwen2 and a Qwen3 model
    against its float32 twin, block by block and in the decode logits."""
    import tempfile
    from pathlib import Path

    from toolchain.engine import measure
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    out = []
    for family in ("qwen2", "qwen3"):
        with tempfile.TemporaryDirectory() as d:
            hf_model(family, d)
            model = Model(Checkpoint.open(Path(d)), torch.device("cpu"), torch.float32, use_kernels=True)
            assert model.fused_attention and model.split_norm, family
            check = measure.logits_check(model, tokens=12)
            out += [(f"{family} {k}", v) for k, v in check["blocks"].items() if k != "tolerance"]
            out.append((f"{family} decode logits", check["same_dataflow"]["decode_rel_err"]))
    return out


@NEEDS_TRITON
def test_the_fast_path_of_qwen_matches_its_float32_twin_in_the_interpreter():
    checks = _in_the_interpreter("_fast_path_checks")
    assert len(checks) == 10
    for name, err in checks:
        assert err < 1e-5, (name, err)


# -- on the GPU: the compiled kernels (bf16, INT4 tiles, FP8) with bias and q/k norms ---------------------------

GPU_SHAPES = {"qwen2": {"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 1},
              "qwen3": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128},
              "mistral": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}}


def _block_checks(family: str, mode: str, directory, device: str, use_kernels: bool) -> dict:
    """logits_check of a model of the family with 128-wide heads (64 for Mistral) stored as `mode` (bf16,
    int4-g128, fp8: the tensors the compressed-tensors exporter writes, scripts/bench_gpu.py)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu

    from toolchain.engine import measure
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    hf = hf_model(family, directory, **{**GPU_SHAPES[family], "intermediate_size": 1024, "vocab_size": 1000,
                                        "max_position_embeddings": 256})
    cfg = json.loads((directory / "config.json").read_text())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    state = {k: v.to(device, torch.bfloat16) for k, v in hf.state_dict().items()}
    bench_gpu.DEVICE = device
    tensors = bench_gpu.packed_checkpoint(state, cfg, mode)
    qc = bench_gpu.quantization_config(mode)
    ckpt = Checkpoint({**cfg, **({"quantization_config": qc} if qc else {})}, tensors.__getitem__,
                      tensors.__contains__)
    model = Model(ckpt, torch.device(device), dtype, use_kernels=use_kernels)
    if use_kernels:
        assert model.fused_attention and model.split_norm
    return measure.logits_check(model, tokens=40)


@pytest.mark.parametrize("mode", ["bf16", "int4-g128", "fp8"])
def test_packed_checkpoints_with_biases_load_and_the_twin_agrees_with_itself(tmp_path, mode):
    """The CPU half of the GPU test below: the exporter's tensors of a Qwen2 model (biases unquantized beside
    packed weights) load, and the plain-torch model equals its float32 twin exactly."""
    check = _block_checks("qwen2", mode, tmp_path, "cpu", use_kernels=False)
    assert check["passed"] and check["same_dataflow"]["decode_rel_err"] == 0, check


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(GPU_SHAPES))
@pytest.mark.parametrize("mode", ["bf16", "int4-g128", "fp8"])
def test_every_block_within_its_gate_on_the_gpu(tmp_path, family, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check = _block_checks(family, mode, tmp_path, "cuda", use_kernels=True)
    assert check["passed"], check["blocks"]


@pytest.mark.gpu
def test_decode_attention_with_bias_and_qk_norms_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, err in _attention_errors("cuda", torch.bfloat16):
        assert err < 1e-2, (name, err)  # bf16 caches: one rounding of k and v (2^-8 relative)
