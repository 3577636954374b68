"""The quantize key names the device that will run and the kernels that shape the bytes there (issue 9 item 5):
CPU and CUDA results differ (BENCHMARKS.md), so they must not share a key."""

from __future__ import annotations

import json

from conftest import tiny_profile, write_profile

from toolchain.quant import device

GPTQ = {"method": "gptq", "bits": 4, "group_size": 32,
        "calibration": {"dataset": "random", "samples": 2, "seq_len": 16}}


def _quantize(cli, tmp_path, quantize: dict) -> dict:
    r = cli("plan", str(write_profile(tmp_path, tiny_profile(quantize=quantize))), "--store",
            str(tmp_path / "store"), "--json")
    assert r.exit_code == 0, r.output
    return next(s for s in json.loads(r.output)["stages"] if s["name"] == "quantize")


def _on(monkeypatch, cuda: str | None, gpu: bool) -> None:
    monkeypatch.setattr(device, "torch_cuda_build", lambda: cuda)
    monkeypatch.setattr(device, "gpu_present", lambda: gpu)


def test_auto_resolves_to_the_device_that_will_run_and_keys_it(cli, tmp_path, monkeypatch):
    _on(monkeypatch, None, True)  # a CPU build of torch on a GPU host computes on the CPU
    cpu = _quantize(cli, tmp_path, GPTQ)
    _on(monkeypatch, "13.0", True)
    cuda = _quantize(cli, tmp_path, GPTQ)
    assert cpu["key"] != cuda["key"]
    explicit = _quantize(cli, tmp_path, {**GPTQ, "device": "cuda"})
    assert explicit["key"] == cuda["key"], "auto that resolves to cuda is the same computation as cuda"
    _on(monkeypatch, "13.0", False)
    assert _quantize(cli, tmp_path, GPTQ)["key"] == cpu["key"]


def test_cuda_key_carries_tf32_the_sweep_and_the_cuda_build(monkeypatch):
    monkeypatch.setattr(device, "torch_cuda_build", lambda: "13.0")
    ids = device.kernel_identity("cuda", "gptq")
    assert ids["tf32"] is True and ids["cuda"] == "13.0" and "gptq_sweep" in ids
    monkeypatch.setenv("TOOLCHAIN_GPTQ_TRITON", "0")
    assert device.kernel_identity("cuda", "gptq")["gptq_sweep"] == "torch"
    assert device.kernel_identity("cpu", "gptq") == {}


def test_triton_switch_changes_the_cuda_key(cli, tmp_path, monkeypatch):
    _on(monkeypatch, "13.0", True)
    monkeypatch.setattr(device, "kernel_identity", lambda d, m: {"tf32": True, "gptq_sweep": "triton 3.5.0"})
    fused = _quantize(cli, tmp_path, GPTQ)
    monkeypatch.setattr(device, "kernel_identity", lambda d, m: {"tf32": True, "gptq_sweep": "torch"})
    assert _quantize(cli, tmp_path, GPTQ)["key"] != fused["key"]


def test_torch_cuda_build_is_read_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from toolchain.quant import device; v = device.torch_cuda_build(); "
            "assert 'torch' not in sys.modules; print(v)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import torch

    assert r.stdout.strip() == str(torch.version.cuda)
