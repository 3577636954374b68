"""The speed stage (toolchain.runtimes): its profile section, its place and key in the plan, the skip without a GPU,
the built-in runtime's numerics on CPU against transformers, the Triton kernels against float64 (interpreter on
CPU, compiled on a GPU), and the parsers of the real runtimes' outputs, run through stand-in executables."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_json, have, run_cli, tiny_profile, write_profile

SPEED = {"batch_sizes": [1, 4], "input_len": 16, "output_len": 8, "iterations": 2}
RECORDED = Path(__file__).parent / "data" / "speed"


def speed_profile(quantize: dict, targets=("compressed-tensors",), **speed) -> dict:
    return tiny_profile(quantize=quantize, targets=list(targets), validate={"speed": {**SPEED, **speed}})


INT4_ASYM = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
INT4_SYM = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}
FP8 = {"method": "fp8"}


# -- profile and plan ------------------------------------------------------------------------------------------

def test_bad_speed_settings_exit_2_naming_the_field(tmp_path):
    bad = tiny_profile(validate={"speed": {"batch_sizes": [1, 1]}})
    r = run_cli("plan", str(write_profile(tmp_path, bad)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2
    assert "validate.speed.batch_sizes" in r.stderr and "distinct" in r.stderr
    bad = tiny_profile(validate={"speed": {"runtime": "tensorrt"}})
    r = run_cli("plan", str(write_profile(tmp_path, bad)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "validate.speed.runtime" in r.stderr


def _plan(tmp_path, data):
    from toolchain import profile
    from toolchain.plan import build_plan
    from toolchain.store import Store

    return build_plan(profile.load(write_profile(tmp_path, data)), Store(tmp_path / "store"))


def test_speed_key_follows_card_runtime_and_settings(tmp_path, monkeypatch):
    """Same card: same key; another card, another compute capability or other settings: another key."""
    from toolchain.runtimes import select

    h200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.1", "memory_mib": 1,
            "count": 1}
    cards = iter([])
    monkeypatch.setattr(select, "cuda_card", lambda: next(cards))
    monkeypatch.setattr(select, "installed", lambda rt: "1 (torch x)" if rt == "builtin" else None)

    def key(card, **speed):
        nonlocal cards
        cards = iter([card] * 4)
        s = _plan(tmp_path, speed_profile(INT4_ASYM, **speed)).stage("speed:compressed-tensors")
        assert s.skip_reason is None and s.config["runtime"] == "builtin"
        return s.key

    base = key(h200)
    assert key(dict(h200, driver="999", memory_mib=2)) == base  # the driver is reported, not keyed
    assert key(dict(h200, name="NVIDIA H100 80GB HBM3")) != base
    assert key(dict(h200, compute_capability="8.9")) != base
    assert key(h200, output_len=9) != base
    monkeypatch.setattr(select, "installed", lambda rt: "2 (torch y)" if rt == "builtin" else None)
    assert key(h200) != base


def test_no_gpu_no_runtime_is_skipped_with_the_reason(tmp_path):
    """CI: no CUDA, no vLLM. The build succeeds; speed says why it measured nothing, and gives no figure."""
    doc = build_json(str(write_profile(tmp_path, speed_profile(INT4_SYM))), "--store", str(tmp_path / "st"))
    sp = doc["targets"][0]["speed"]
    assert doc["targets"][0]["status"] == "built"
    assert sp["status"] == "skipped"
    assert "CUDA GPU" in sp["reason"] and "vllm is not installed" in sp["reason"]
    assert "per_batch" not in sp and "decode_tok_s" not in json.dumps(sp)
    assert [s["name"] for s in doc["stages"]][-1] == "speed:compressed-tensors"


# -- the built-in runtime's numerics on CPU --------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """compressed-tensors checkpoints of the tiny model: INT4 asymmetric g32, INT4 symmetric g64, FP8 dynamic."""
    out = {}
    for name, q in (("int4-asym", INT4_ASYM), ("int4-sym", INT4_SYM), ("fp8", FP8)):
        d = tmp_path_factory.mktemp(name)
        doc = build_json(str(write_profile(d, speed_profile(q))), "--store", str(d / "store"))
        out[name] = Path(doc["targets"][0]["path"])
    return out


@pytest.mark.parametrize("name", ["int4-asym", "int4-sym", "fp8"])
def test_reference_runtime_matches_transformers(exports, name):
    """Our float32 forward of the stored bytes equals transformers loading the same checkpoint (the accuracy
    stage's loader): FP8 as W8A8 with dynamic per-token activations, as transformers computes it."""
    from transformers import AutoModelForCausalLM

    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    model = Model(Checkpoint.open(exports[name]), torch.device("cpu"), torch.float32, use_kernels=False)
    model.wo_max_m = 0  # every FP8 product W8A8: the checkpoint's scheme
    ids = torch.randint(0, model.vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    model.alloc_cache(2, 32)
    ours = model.prefill(ids, all_logits=True)
    hf = AutoModelForCausalLM.from_pretrained(exports[name], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
    # a decode step on the static cache gives the logits of the full forward at that position
    model.alloc_cache(2, 32)
    model.prefill(ids[:, :23])
    step = model.decode(ids[:, 23:24], torch.tensor(23))
    assert float((step - ref[:, 23]).norm() / ref[:, 23].norm()) < 1e-5


def test_fp8_weight_only_path_stays_within_tolerance_of_the_checkpoint_scheme(exports):
    from toolchain.engine.measure import LOGITS_TOLERANCE, logits_check
    from toolchain.engine.model import Model
    from toolchain.engine.weights import Checkpoint

    model = Model(Checkpoint.open(exports["fp8"]), torch.device("cpu"), torch.float32, use_kernels=False)
    check = logits_check(model, tokens=70)  # prefill (M=70) W8A8, decode (M=1) weight-only
    assert check["same_dataflow"]["prefill_rel_err"] == 0 and check["same_dataflow"]["decode_rel_err"] == 0
    assert check["checkpoint_scheme"]["prefill_rel_err"] == 0
    assert 0 < check["decode_rel_err"] < LOGITS_TOLERANCE["fp8"], check
    assert check["passed"]


def test_a_wrong_scaled_mm_is_caught_and_replaced_by_the_weight_only_path(exports, monkeypatch):
    """The model checks torch._scaled_mm on its card before using it: a product that disagrees with float64 (as
    seen once on an H200) sends every FP8 product through the weight-only path, said in the result."""
    from toolchain.engine import kernels, measure
    from toolchain.engine import model as engine_model
    from toolchain.engine.weights import Checkpoint

    monkeypatch.setattr(kernels, "fp8_scaled_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))
    # the weight-only product in plain torch (the Triton kernel itself is tested against float64 below)
    monkeypatch.setattr(engine_model, "fp8_mm", lambda x, w, s, split: (x.float() @ (w.float() * s).T)[None])
    model = engine_model.Model(Checkpoint.open(exports["fp8"]), torch.device("cpu"), torch.float32, use_kernels=True)
    assert model.w8a8["used"] is False and "relative error 1" in model.w8a8["reason"]
    check = measure.logits_check(model, tokens=70)
    assert check["same_dataflow"]["prefill_rel_err"] < 1e-5 and check["passed"], check


def test_block_check_catches_a_kernel_that_skips_the_end_of_k(exports, monkeypatch):
    """The per-block check compares each block with its float32 twin on the same input: exact for the twin itself,
    and a product that drops the last 32 columns of K (the first GPU run's autotuning bug) fails it."""
    from toolchain.engine import kernels, measure
    from toolchain.engine import model as engine_model
    from toolchain.engine.weights import Checkpoint

    model = engine_model.Model(Checkpoint.open(exports["int4-sym"]), torch.device("cpu"), torch.float32,
                               use_kernels=False)
    exact = measure.block_errors(model, tokens=8)
    assert len(exact) == 4 and set(exact.values()) == {0.0}, exact

    def short_k(x, packed, scale, zero, group, tiled, split, tiled_max_m, groups_per_slice):
        assert not tiled  # CPU: the stored layout
        w = kernels.dequantize_int4(packed, scale, zero, group)
        w[:, -32:] = 0
        return (x.float() @ w.T)[None]  # the custom op's partial sums: one slice

    monkeypatch.setattr(engine_model, "int4_mm", short_k)
    model = engine_model.Model(Checkpoint.open(exports["int4-sym"]), torch.device("cpu"), torch.float32,
                               use_kernels=True)
    errs = measure.block_errors(model, tokens=8)
    assert errs["decode_max_rel_err"] > measure.BLOCK_TOLERANCE["int4"], errs
    assert not measure.logits_check(model, tokens=8)["passed"]


def test_a_compiled_block_that_dynamo_runs_eagerly_is_reported_as_eager(monkeypatch):
    """Past its recompile limit dynamo runs a frame uncompiled and only logs a warning (an FP8 model after two
    others did on the H200): the report must then not say torch.compile."""
    import torch._dynamo

    from toolchain.engine import graph as builtin

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)

    def step(x, d):
        return x * 2 if d is None else x + d

    compiled = torch.compile(step, backend="eager", dynamic=True)
    how = "torch.compile (inductor)"
    before = builtin.compile_fallbacks()
    compiled(torch.ones(3), None)
    assert builtin.blocks_after(how, before) == how  # compiled once: within the limit
    compiled(torch.ones(3), torch.ones(3))  # a second variant: past a limit of 1
    assert builtin.blocks_after(how, before).startswith("eager"), builtin.compile_fallbacks()


def test_zero_point_unpacking_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from toolchain.engine.kernels import unpack_int4
    from toolchain.engine.weights import unpack_rows_int4

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (37, 64), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_to_int32(codes, 4)), codes.to(torch.int32) + 8)
    zeros = torch.randint(-8, 8, (37, 5), generator=g, dtype=torch.int8)  # 37 rows: a partial last word
    assert torch.equal(unpack_rows_int4(pack_to_int32(zeros, 4, packed_dim=0), 37), (zeros + 8).to(torch.uint8))


# -- kernels ---------------------------------------------------------------------------------------------------

# (M, N, K, group, asymmetric): K not a multiple of 256 (384, SmolLM2's 576) and K below one block (192) included:
# the first GPU run's autotuned K block of 256 skipped the rest of such a K (0.52 relative error at K=384).
KERNEL_CASES = [(1, 48, 256, 128, False), (3, 40, 512, 32, True), (1, 64, 384, 64, True), (17, 70, 256, 64, True),
                (80, 33, 256, 128, False), (1, 24, 576, 64, True), (2, 20, 192, 64, False), (20, 24, 576, 32, True),
                (16, 64, 512, 128, True)]  # the last: the tensor-core INT4 kernel at a decode batch


def _kernel_errors(device: str, dtype: torch.dtype, cases=None, config: dict | None = None
                   ) -> list[tuple[str, float]]:
    from toolchain.engine import kernels as K

    out = []
    g = torch.Generator().manual_seed(7)
    for m, n, k, group, asym in cases or KERNEL_CASES:
        packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=g, dtype=torch.int32).to(device)
        scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).to(device)
        zero = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8).to(device) if asym else None
        x = torch.randn(m, k, generator=g).to(device, dtype)
        y = K.int4_matmul(x, packed, scale, zero, group, config)
        ref = x.double() @ K.dequantize_int4(packed, scale, zero, group, torch.float64).T
        out.append((f"int4 m{m} g{group} {'asym' if asym else 'sym'}", float((y.double() - ref).norm() / ref.norm())))
        w = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn).to(device)
        s = (torch.rand(n, 1, generator=g) * 0.01).to(device)
        y = K.fp8_matmul(x, w, s, config)
        ref = x.double() @ K.dequantize_fp8(w, s, torch.float64).T
        out.append((f"fp8 m{m}", float((y.double() - ref).norm() / ref.norm())))
        assert torch.isfinite(y).all()
        if m <= K.GEMV_MAX_M:  # the dense GEMV (weights in the activations' dtype, no scale)
            wd = torch.randn(n, k, generator=g).to(device, dtype)
            y = K.dense_partials(x, wd, config).sum(0)
            ref = x.double() @ wd.double().T
            out.append((f"dense m{m}", float((y.double() - ref).norm() / ref.norm())))
    return out


def _triton_importable() -> bool:
    return have("triton")


NEEDS_TRITON = pytest.mark.skipif(not _triton_importable(), reason="triton not installed (pip install triton): the "
                                  "interpreter runs the kernels on CPU")


def _in_the_interpreter(function: str) -> list[tuple[str, float]]:
    """(name, relative error) pairs from `function` of this module, run in a fresh process with TRITON_INTERPRET=1
    (it must be set before triton is imported)."""
    code = f"import json; from test_speed import {function}; print(json.dumps({function}()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900,
                       env={**os.environ, "TRITON_INTERPRET": "1",
                            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                           os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cpu_kernel_errors() -> list[tuple[str, float]]:
    return _kernel_errors("cpu", torch.float32)


@NEEDS_TRITON
def test_kernels_match_float64_in_the_interpreter():
    errors = _in_the_interpreter("_cpu_kernel_errors")
    assert len(errors) == 2 * len(KERNEL_CASES) + sum(m <= 4 for m, *_ in KERNEL_CASES)
    for name, err in errors:
        assert err < 1e-5, (name, err)  # float32 inputs and accumulation


def _autotune_choices() -> list[tuple[str, dict, list]]:
    """Every GEMV configuration the autotuner may pick for SmolLM2's K=576 (group 64) and a K below one block, as
    fixed configs the interpreter can run."""
    from toolchain.engine.kernels import linear as K

    out = []
    for k, group in ((576, 64), (192, 32)):
        for name, configs in (("int4", K._gemv_configs()), ("fp8", K._scaled_gemv_configs())):
            kept = K._prune_gemv(configs, {"K": k}, GROUP=group if name == "int4" else 1)
            shapes = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept}  # pipelining: same arithmetic
            out.append((f"{name} K={k} g{group}", [{"BLOCK_N": n, "BLOCK_K": b} for n, b in sorted(shapes)],
                        [(1, 16, k, group, True)]))
    return out


def _autotune_choice_errors() -> list[tuple[str, float]]:
    out = []
    for name, configs, cases in _autotune_choices():
        for c in configs:
            errs = _kernel_errors("cpu", torch.float32, cases, c)
            kind = name.split()[0]
            out += [(f"{name} {c}: {n}", e) for n, e in errs if n.startswith(kind)]
    return out


@NEEDS_TRITON
def test_every_autotune_choice_covers_all_of_k_in_the_interpreter():
    errors = _in_the_interpreter("_autotune_choice_errors")
    assert len(errors) >= 8
    for name, err in errors:
        assert err < 1e-5, (name, err)


# (batch, heads, KV heads, head size, cache length, position, partial slices): GQA groups of 1, 2, 3 (SmolLM2), 4
# and 20, position 0 (nothing cached yet), positions on and off the block boundary (64 up to batch 4, 32 above).
ATTENTION_CASES = [(1, 4, 4, 64, 80, 70, 1), (2, 8, 2, 32, 40, 0, 2), (3, 9, 3, 64, 150, 128, 3),
                   (2, 32, 32, 128, 192, 131, 4), (6, 4, 2, 64, 100, 77, 2),  # batch 6: 32-position blocks
                   (1, 20, 1, 32, 50, 33, 1)]  # 20 query heads on one KV head: a 32-row tile


def _attention_errors(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple[str, float]]:
    """The decode-attention kernel (rotary, cache write, attention over the cache) against float64 torch: the
    output, and every cache entry afterwards (the new position written, nothing else touched)."""
    from toolchain.engine import kernels as K

    out = []
    g = torch.Generator().manual_seed(3)
    for case, (b, nh, nkv, hd, length, pos, slices) in enumerate(ATTENTION_CASES):
        qkv = torch.randn(slices, b, (nh + 2 * nkv) * hd, generator=g).to(device)
        kc = torch.randn(b, nkv, length, hd, generator=g).to(device, dtype)
        vc = torch.randn(b, nkv, length, hd, generator=g).to(device, dtype)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        emb = torch.outer(torch.arange(length, dtype=torch.float64), inv).repeat(1, 2)
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        kr, vr = kc.clone(), vc.clone()
        # Every other case as the split norm's consumer: the product of w h, scaled here by 1 / rms from two
        # partial sums of squares over 300 columns.
        norm = {"ss": (torch.rand(b, 2, generator=g) * 300 + 1).to(device), "n": 300, "eps": 1e-5} \
            if case % 2 else {}
        got = K.decode_attention(qkv, kc, vc, cos, sin, torch.tensor(pos, device=device), nh, nkv, **norm)
        want = K.decode_attention_reference(qkv, kr, vr, cos, sin, pos, nh, nkv, **norm)
        name = f"attention b{b} h{nh}/{nkv} d{hd} pos {pos}" + (" scaled by 1/rms" if norm else "")
        out.append((name, float((got.double() - want).norm() / want.norm())))
        cache_err = max(float((c.double() - r.double()).abs().max() / r.double().abs().max())
                        for c, r in ((kc, kr), (vc, vr)))
        out.append((f"{name} cache", cache_err))  # largest difference over the largest entry
    return out


# (rows, columns, partial slices): Llama-2-7B's down product at batch 1 (10 slices of the INT4 tiles), the first
# block (no slices), SmolLM2's 576 and a width no program size divides, batch 16.
NORM_CASES = [(1, 4096, 10), (2, 576, 0), (16, 300, 4), (3, 1000, 1)]


def _norm_errors(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple[str, float]]:
    """residual_norm against its float64 reference (the same roundings to the activation dtype): the new stream
    and w h (largest difference over the largest entry), the sums of squares (relative), RMSNorm rebuilt from
    them against the plain-torch norm the rest of the runtime uses, and silu_product on those sums."""
    from toolchain.engine import kernels as K
    from toolchain.engine import model as builtin

    g = torch.Generator().manual_seed(5)
    out = []
    for m, n, slices in NORM_CASES:
        h = (torch.randn(m, n, generator=g) * 3).to(device, dtype)
        d = torch.randn(slices, m, n, generator=g).to(device) if slices else None
        w = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
        got, want = K.residual_norm(h, d, w), K.residual_norm_reference(h, d, w)
        name = f"norm {m}x{n} {slices} slices"
        for part, a, b in zip(("stream", "w h"), got[:2], want[:2], strict=True):
            out.append((f"{name} {part}", float((a.double() - b.double()).abs().max() / b.double().abs().max())))
        out.append((f"{name} sums of squares", float((got[2].double() - want[2]).norm() / want[2].norm())))
        rebuilt = got[1].double() * K.rms_scale(got[2].double(), n, 1e-5)[:, None]
        plain = builtin.rms_norm(want[0].double(), w.double(), 1e-5)
        out.append((f"{name} rebuilt", float((rebuilt - plain).norm() / plain.norm())))
        # the MLP's consumer of the scale: silu(gate) * up from a gate/up product's partial sums (2 x 700 wide)
        parts = torch.randn(max(slices, 1), m, 1400, generator=g).to(device) * 30
        act = K.silu_product(parts, got[2], n, 1e-5, dtype).double()
        want_act = K.silu_product_reference(parts, got[2], n, 1e-5)
        out.append((f"{name} silu product", float((act - want_act).norm() / want_act.norm())))
    return out


@NEEDS_TRITON
def test_residual_norm_matches_float64_in_the_interpreter():
    errors = _in_the_interpreter("_norm_errors")
    assert len(errors) == 5 * len(NORM_CASES)
    for name, err in errors:
        assert err < 1e-6, (name, err)


@pytest.mark.gpu
def test_residual_norm_matches_float64_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, err in _norm_errors("cuda", torch.bfloat16):
        # the stream and w h as the reference rounds them (one bf16 step where float32 sums straddle a rounding
        # boundary); RMSNorm rebuilt: w h rounded once where the plain norm rounds twice; the silu product
        # rounded to bf16 once
        assert err < (1e-6 if "sums" in name else 1e-2), (name, err)


def _fast_path_checks() -> list[tuple[str, float, float]]:
    """The runtime's fast path (Triton linears returning partial sums, the fused decode attention, the residual
    add folded into the next block) on a two-block model with GQA, run by the interpreter on the CPU in float32,
    against its plain-torch twin: (name, error, tolerance) per block check of `logits_check`."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu

    from toolchain import arch
    from toolchain.engine import measure
    from toolchain.engine import model as builtin
    from toolchain.engine.weights import Checkpoint

    bench_gpu.DEVICE = "cpu"
    cfg = {**arch.ARCHS["llama-2-7b"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}
    state = {k: v.float() for k, v in bench_gpu.synthetic_state(cfg).items()}
    out = []
    for mode in ("int4-g128", "fp8"):
        tensors = bench_gpu.packed_checkpoint(state, cfg, mode)
        ckpt = Checkpoint({**cfg, "quantization_config": bench_gpu.quantization_config(mode)}, tensors.__getitem__,
                          tensors.__contains__)
        model = builtin.Model(ckpt, torch.device("cpu"), torch.float32, use_kernels=True)
        assert model.fused_attention and model.split_norm
        check = measure.logits_check(model, tokens=20)  # prefill of 20 rows: the tensor-core INT4 kernel
        out += [(f"{mode} {k}", v, 1e-5) for k, v in check["blocks"].items() if k != "tolerance"]
        out.append((f"{mode} decode logits", check["same_dataflow"]["decode_rel_err"], 1e-5))
    return out


@NEEDS_TRITON
def test_the_fast_path_matches_its_float32_twin_in_the_interpreter():
    checks = _in_the_interpreter("_fast_path_checks")
    assert len(checks) == 10
    for name, err, tol in checks:
        assert err < tol, (name, err)


@NEEDS_TRITON
def test_decode_attention_matches_float64_in_the_interpreter():
    errors = _in_the_interpreter("_attention_errors")
    assert len(errors) == 2 * len(ATTENTION_CASES)
    assert sum("1/rms" in name for name, _ in errors) == len(ATTENTION_CASES)
    for name, err in errors:
        assert err < 1e-5, (name, err)


@pytest.mark.gpu
def test_decode_attention_matches_float64_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, err in _attention_errors("cuda", torch.bfloat16):
        assert err < 1e-2, (name, err)  # bf16 caches: one rounding of k and v (2^-8 relative)


@pytest.mark.gpu
def test_kernels_match_float64_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name, err in _kernel_errors("cuda", torch.bfloat16):
        assert err < 1e-2, (name, err)  # bf16 activations, float32 accumulation


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int4-asym", "int4-sym", "fp8"])
def test_builtin_speed_stage_on_the_gpu(tmp_path, name):
    """The whole stage on a GPU: figures for each batch size, the logits check passed, the card named."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q = {"int4-asym": INT4_ASYM, "int4-sym": INT4_SYM, "fp8": FP8}[name]
    doc = build_json(str(write_profile(tmp_path, speed_profile(q, runtime="builtin"))), "--store",
                     str(tmp_path / "st"))
    sp = doc["targets"][0]["speed"]
    assert sp["status"] == "built", sp
    assert sp["logits_check"]["passed"]
    assert [b["batch_size"] for b in sp["per_batch"]] == SPEED["batch_sizes"]
    for b in sp["per_batch"]:
        assert b["decode_tok_s"] > 0 and b["ttft_ms"] > 0 and b["itl_ms_p99"] >= b["itl_ms_p50"] > 0
        assert 0 < b["bandwidth_ratio"] < 1.5
    assert sp["card"]["name"] == torch.cuda.get_device_name()


# -- the real runtimes' outputs, through stand-in executables ----------------------------------------------------

def test_parsers_read_recorded_outputs():
    from toolchain.runtimes import external as ext

    lat = ext.parse_vllm_latency(json.loads((RECORDED / "vllm-latency-o1.json").read_text()))
    whole = ext.parse_vllm_latency(json.loads((RECORDED / "vllm-latency-o128.json").read_text()))
    ttft, steps = ext.vllm_figures(lat, whole, 128)
    assert ttft == pytest.approx(1e3 * sorted(lat)[len(lat) // 2])
    assert all(s == pytest.approx((w * 1e3 - ttft) / 127) for s, w in zip(steps, whole, strict=True))
    r = ext.parse_trtllm_report(json.loads((RECORDED / "trtllm-bench-report.json").read_text()))
    assert r["ttft_ms"] > 0 and r["tpot_p99_ms"] >= r["tpot_p50_ms"] > 0 and r["card"]
    lb = ext.parse_llama_bench(json.loads((RECORDED / "llama-bench.json").read_text()))
    assert lb["ttft_ms"] > 0 and len(lb["step_ms"]) >= 1 and lb["decode_tok_s"] > 0
    assert lb["decode_tok_s"] == pytest.approx(1e3 / (sum(lb["step_ms"]) / len(lb["step_ms"])), rel=0.05)
    with pytest.raises(Exception, match="latencies"):
        ext.parse_vllm_latency({"avg_latency": 1.0})
    with pytest.raises(Exception, match="streaming_metrics"):
        ext.parse_trtllm_report({"performance": {}})


def _stand_in(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{script}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


LLAMA_BENCH_STAND_IN = """
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
rows = json.load(open({recorded!r}))
# the recorded run, rescaled to the lengths asked for at the recorded tokens per second
for row, key, want in ((rows[0], "n_prompt", int(args["-p"])), (rows[1], "n_gen", int(args["-n"]))):
    f = want / row[key]
    row[key], row["avg_ns"], row["samples_ns"] = want, row["avg_ns"] * f, [x * f for x in row["samples_ns"]]
assert args["-o"] == "json" and args["-m"].endswith(".gguf")
print(json.dumps(rows, indent=2))
"""


def test_llama_bench_stand_in_times_a_gguf_target_and_its_gate_fails(tmp_path):
    """A gguf target where llama-bench is on PATH: the stage runs it, parses its JSON, reports batch 1 and says
    that batch 4 was not measured; an unreachable gate fails the build with exit 1."""
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "llama-bench", LLAMA_BENCH_STAND_IN.format(recorded=str(RECORDED / "llama-bench.json")))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TOOLCHAIN_NO_GPU": "1"}
    data = speed_profile(INT4_SYM, targets=("gguf",), gates={"min_decode_tok_s": 1e9})
    r = run_cli("build", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "st"), "--json", env=env)
    assert r.returncode == 1, r.stderr
    sp = json.loads(r.stdout)["targets"][0]["speed"]
    assert sp["runtime"] == "llama-bench" and sp["status"] == "failed" and "min 1000000000" in sp["reason"]
    b1, b4 = sp["per_batch"]
    recorded = json.loads((RECORDED / "llama-bench.json").read_text())
    assert b1["decode_tok_s"] == pytest.approx(recorded[1]["avg_ts"], rel=0.05)
    assert b1["ttft_ms"] == pytest.approx(recorded[0]["avg_ns"] / 1e6 * SPEED["input_len"] / recorded[0]["n_prompt"])
    assert "not measured" in b4["skipped"]
    assert sp["card"]["kind"] == "cpu" and sp["copy_bandwidth_gbs"] > 0
    # cached on the same card: not re-timed; the printed summary shows the figures and the failed gate
    r = run_cli("build", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "st"), env=env)
    assert r.returncode == 1
    assert "speed (failed) by llama-bench" in r.stdout and "decode 118.9 tok/s" in r.stdout, r.stdout
    assert "batch   4: llama-bench times one sequence" in r.stdout and "speed gate failed" in r.stdout


VLLM_STAND_IN = """
import json, shutil, sys
args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
assert sys.argv[1:3] == ["bench", "latency"], sys.argv
out = int(args["--output-len"])
src = {o1!r} if out == 1 else {o128!r}
shutil.copy(src, args["--output-json"])
"""


def _stand_in_without_gpu(tmp_path: Path, monkeypatch, name: str, script: str) -> Path:
    """A stand-in `name` first on PATH, no CUDA card seen, and a dummy export directory (returned)."""
    from toolchain.runtimes import select

    _stand_in(tmp_path / "bin", name, script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(select, "cuda_card", lambda: None)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"\0" * 1000)
    return export


def test_vllm_stand_in_gives_ttft_and_decode_from_two_runs(tmp_path, monkeypatch):
    from toolchain.progress import Reporter
    from toolchain.runtimes import external as ext

    export = _stand_in_without_gpu(tmp_path, monkeypatch, "vllm", VLLM_STAND_IN.format(
        o1=str(RECORDED / "vllm-latency-o1.json"), o128=str(RECORDED / "vllm-latency-o128.json")))
    from toolchain.arch import ARCHS

    res = ext.measure("vllm", "compressed-tensors", export, ARCHS["llama-tiny"],
                      {"batch_sizes": [1], "input_len": 128, "output_len": 128, "iterations": 3},
                      Reporter(quiet=True), tmp_path)
    b = res["per_batch"][0]
    lat1 = json.loads((RECORDED / "vllm-latency-o1.json").read_text())["latencies"]
    assert b["ttft_ms"] == pytest.approx(1e3 * sorted(lat1)[len(lat1) // 2])
    assert b["decode_tok_s"] > 0 and b["itl_source"].startswith("per-iteration")


TRTLLM_STAND_IN = """
import json, shutil, sys
argv = sys.argv[1:]
args = dict(zip(argv[::2], argv[1::2]))
assert "throughput" in argv and "--streaming" in argv, argv
i = argv.index("throughput")
opts = dict(zip([a for a in argv[i + 1:] if a.startswith("--") and a != "--streaming"],
                [argv[argv.index(a) + 1] for a in argv[i + 1:] if a.startswith("--") and a != "--streaming"]))
lines = open(opts["--dataset"]).read().splitlines()
assert len(lines) == int(opts["--num_requests"]) and json.loads(lines[0])["output_tokens"] > 0
shutil.copy({report!r}, opts["--report_json"])
"""


def test_trtllm_bench_stand_in_reports_ttft_and_tpot(tmp_path, monkeypatch):
    from toolchain.arch import ARCHS
    from toolchain.progress import Reporter
    from toolchain.runtimes import external as ext

    export = _stand_in_without_gpu(tmp_path, monkeypatch, "trtllm-bench", TRTLLM_STAND_IN.format(
        report=str(RECORDED / "trtllm-bench-report.json")))
    res = ext.measure("trtllm-bench", "trtllm", export, ARCHS["llama-tiny"],
                      {"batch_sizes": [1, 4], "input_len": 128, "output_len": 128, "iterations": 3},
                      Reporter(quiet=True), tmp_path)
    report = json.loads((RECORDED / "trtllm-bench-report.json").read_text())["streaming_metrics"]
    for b in res["per_batch"]:
        assert b["ttft_ms"] == report["avg_ttft_ms"]
        assert b["decode_tok_s"] == pytest.approx(b["batch_size"] * 1e3 / report["avg_tpot_ms"])
        assert "p99 3.750" in b["itl_source"]
        assert (b["itl_ms_p50"], b["itl_ms_p99"]) == (report["tpot_percentiles"]["p50"],
                                                      report["tpot_percentiles"]["p99"])


@pytest.mark.skipif(not have("onnxruntime"), reason="onnxruntime not installed")
def test_onnx_target_is_timed_by_onnxruntime_on_this_machine(tmp_path):
    """onnxruntime is the ONNX target's own runtime and runs on the CPU: the stage times it here, card `cpu`,
    each decode step a whole forward (the export has no KV cache)."""
    data = speed_profile(INT4_SYM, targets=("onnx",), batch_sizes=[1, 2], input_len=8, output_len=4, iterations=1)
    doc = build_json(str(write_profile(tmp_path, data)), "--store", str(tmp_path / "st"))
    sp = doc["targets"][0]["speed"]
    assert sp["status"] == "built" and sp["runtime"] == "onnxruntime", sp
    assert sp["card"]["kind"] == "cpu" and sp["copy_bandwidth_gbs"] > 0
    b1, b2 = sp["per_batch"]
    assert b1["decode_steps_timed"] == 3 and b1["decode_tok_s"] > 0 and b1["ttft_ms"] > 0
    assert "no KV cache" in b1["itl_source"]
    assert "not measured" in b2["skipped"]  # the export's batch dimension is 1


@pytest.mark.skipif(not have("onnxruntime"), reason="onnxruntime not installed")
def test_onnxruntime_profile_is_parsed_from_a_real_run(tmp_path):
    """onnxruntime's own profiler on a tiny graph: one model_run event per run, durations in order."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from toolchain.runtimes.external import parse_ort_profile

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "p")
    sess = ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    for n in (10, 100000, 10):
        sess.run(None, {"x": np.ones(n, dtype=np.float32)})
    runs = parse_ort_profile(json.loads(Path(sess.end_profiling()).read_text()))
    assert len(runs) == 3 and all(r > 0 for r in runs)
