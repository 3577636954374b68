"""The built-in runtime's variant switches are one EngineConfig, in the speed stage's key (issue 22, item 6): two
configs give two keys, an environment default changes the key, the stage times the config its key holds (not the
environment of the process that runs it), and a model built from a config follows it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, tiny_profile, write_profile

from toolchain.engine.config import EngineConfig, field_names
from toolchain.errors import InputError

SPEED = {"batch_sizes": [1], "input_len": 16, "output_len": 8, "iterations": 1}
H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.1", "memory_mib": 1,
        "count": 1}


@pytest.fixture
def builtin_here(monkeypatch):
    """A planner that sees an H200 and the built-in runtime, and no TOOLCHAIN_<setting> in the environment."""
    from toolchain.runtimes import select

    monkeypatch.setattr(select, "cuda_card", lambda: H200)
    monkeypatch.setattr(select, "installed", lambda rt: "5 (torch x)" if rt == "builtin" else None)
    for name in field_names():
        monkeypatch.delenv("TOOLCHAIN_" + name.upper(), raising=False)


def _speed_stage(tmp_path):
    from toolchain import profile
    from toolchain.plan import build_plan
    from toolchain.store import Store

    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32}, targets=["compressed-tensors"],
                        validate={"speed": SPEED})
    plan = build_plan(profile.load(write_profile(tmp_path, data)), Store(tmp_path / "store"))
    stage = plan.stage("speed:compressed-tensors")
    assert stage.config["runtime"] == "builtin"
    return stage


def test_the_engine_config_is_in_the_speed_key(tmp_path, builtin_here, monkeypatch):
    base = _speed_stage(tmp_path)
    assert base.config["engine"] == EngineConfig().canonical()
    assert _speed_stage(tmp_path).key == base.key  # nothing changed: the same key
    keys = {base.key}
    for name, value in (("TOOLCHAIN_SPLIT_NORM", "0"), ("TOOLCHAIN_TILED_GROUPS_PER_SLICE", "8"),
                        ("TOOLCHAIN_NORM_BLOCK", "256"), ("TOOLCHAIN_INT4_TILES", "false")):
        monkeypatch.setenv(name, value)
        stage = _speed_stage(tmp_path)
        assert stage.key not in keys, name  # each environment default: another key
        keys.add(stage.key)
        monkeypatch.delenv(name)
    assert _speed_stage(tmp_path).key == base.key
    # the key is of the config, not of how it was set: the default written out is the default
    monkeypatch.setenv("TOOLCHAIN_TILED_GROUPS_PER_SLICE", str(EngineConfig().tiled_groups_per_slice))
    assert _speed_stage(tmp_path).key == base.key


@pytest.mark.parametrize("name,value", [("TOOLCHAIN_SPLIT_NORM", "maybe"), ("TOOLCHAIN_NORM_BLOCK", "100"),
                                        ("TOOLCHAIN_TILED_GROUPS_PER_SLICE", "0"),
                                        ("TOOLCHAIN_TILED_MAX_M", "nan"), ("TOOLCHAIN_ATTENTION_WARPS", "3")])
def test_a_bad_environment_default_is_refused_at_plan_time(tmp_path, builtin_here, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(InputError) as e:
        _speed_stage(tmp_path)
    assert e.value.exit_code == 2
    assert name in str(e.value) or name.removeprefix("TOOLCHAIN_").lower() in str(e.value)


def test_the_stage_times_the_config_of_its_key_not_the_environment(tmp_path, builtin_here, monkeypatch):
    from toolchain.engine import measure
    from toolchain.progress import Reporter
    from toolchain.stage import StageContext
    from toolchain.stages import speed

    monkeypatch.setenv("TOOLCHAIN_TILED_GROUPS_PER_SLICE", "8")
    stage = _speed_stage(tmp_path)
    monkeypatch.setenv("TOOLCHAIN_TILED_GROUPS_PER_SLICE", "2")  # the process that runs the stage differs
    seen = []

    def fake_measure(export, settings, reporter, ckpt=None, engine=None):
        seen.append(engine)
        return {"per_batch": []}

    monkeypatch.setattr(measure, "measure", fake_measure)
    ctx = StageContext(stage, tmp_path, tmp_path, {"export": tmp_path}, {}, Reporter(quiet=True), {}, "p", None)
    speed.run(ctx)
    assert seen == [EngineConfig(tiled_groups_per_slice=8)]


def test_external_runtimes_have_no_engine_in_their_key(tmp_path, monkeypatch):
    from toolchain.runtimes import select

    monkeypatch.setattr(select, "cuda_card", lambda: H200)
    monkeypatch.setattr(select, "installed", lambda rt: "0.11" if rt == "vllm" else None)
    monkeypatch.setattr(select.shutil, "which", lambda name: "/usr/bin/vllm")
    from toolchain import profile
    from toolchain.plan import build_plan
    from toolchain.store import Store

    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32}, targets=["compressed-tensors"],
                        validate={"speed": SPEED})
    stage = build_plan(profile.load(write_profile(tmp_path, data)), Store(tmp_path / "st")).stage(
        "speed:compressed-tensors")
    assert stage.config["runtime"] == "vllm" and "engine" not in stage.config


def test_parsing_and_bounds():
    base = EngineConfig()
    assert base.with_text("split_norm=0+tiled_groups_per_slice=8") == EngineConfig(split_norm=False,
                                                                                   tiled_groups_per_slice=8)
    assert base.with_text("") == base
    assert EngineConfig.from_dict(base.canonical()) == base
    assert EngineConfig.from_env({"TOOLCHAIN_DENSE_GEMV": "0", "UNRELATED": "x"}) == EngineConfig(dense_gemv=False)
    for bad in ("K.NORM_BLOCK=256", "split_norm", "norm_block=1.5", "nosuch=1"):
        with pytest.raises(InputError):
            base.with_text(bad)
    with pytest.raises(InputError):
        EngineConfig(norm_block=96)
    with pytest.raises(InputError):
        EngineConfig(split_norm=1)  # a bool field takes a bool
    with pytest.raises(Exception):  # frozen  # noqa: B017
        base.split_norm = False  # type: ignore[misc]


def test_a_model_follows_its_config():
    """The switches reach the model: FP8's weight-only bound, kernels off (use_kernels false), and the fused
    paths off; float32 on CPU, no Triton needed."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu

    from toolchain import arch
    from toolchain.engine import model as builtin
    from toolchain.engine.weights import Checkpoint

    cfg = {**arch.ARCHS["llama-2-7b"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 50, "max_position_embeddings": 32}
    bench_gpu.DEVICE = "cpu"
    state = {k: v.float() for k, v in bench_gpu.synthetic_state(cfg).items()}
    tensors = bench_gpu.packed_checkpoint(state, cfg, "fp8")
    ckpt = Checkpoint({**cfg, "quantization_config": bench_gpu.quantization_config("fp8")}, tensors.__getitem__,
                      tensors.__contains__)
    model = builtin.Model(ckpt, torch.device("cpu"), torch.float32, use_kernels=True,
                          engine=EngineConfig(kernels=False, fp8_weight_only_max_m=7))
    assert model.wo_max_m == 7 and not model.use_kernels and not model.split_norm
    assert builtin.reference_of(model).engine == model.engine


def test_the_variant_script_refuses_module_globals():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_decode_variants.py"), "--variant",
                        "K.NORM_BLOCK=256", "--out", "/dev/null"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode != 0 and "no engine setting" in r.stderr, r.stderr  # before looking for a GPU
