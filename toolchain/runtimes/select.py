"""Which runtime times a target, on which card: decided at plan time, without importing torch.

The speed stage's key holds the runtime and its version and the card (name + compute capability), so a rebuild on
another card or with another runtime re-times, and the same card does not; for the built-in runtime also its
EngineConfig (the variant switches, as the environment sets their defaults). A target is timed by its own runtime's
benchmark where that is installed (vLLM, TensorRT-LLM, llama.cpp, onnxruntime); otherwise by our built-in GPU
runtime, which reads compressed-tensors and plain Hugging Face checkpoints. With neither, the stage is skipped with
the reason: never a made-up figure.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

BUILTIN_VERSION = "5"  # bump when the built-in runtime's timing method or kernels change
# Formats whose files the built-in runtime reads (toolchain.engine.weights).
BUILTIN_FORMATS = ("compressed-tensors",)
# The target's own benchmark, by format, in order of preference.
NATIVE = {
    "compressed-tensors": ("vllm", "trtllm-bench"),
    "gptq": ("vllm",),
    "bnb": ("vllm",),
    "trtllm": ("trtllm-bench",),
    "trtllm-ckpt": ("trtllm-bench",),
    "gguf": ("llama-bench",),
    "ollama": ("llama-bench",),
    "onnx": ("onnxruntime",),
}


@dataclass(frozen=True)
class Choice:
    runtime: str | None  # None: nothing can time this target here
    version: str | None
    card: dict[str, Any]
    libs: tuple[str, ...] = ()
    skip_reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@functools.lru_cache(maxsize=1)
def cuda_card() -> dict[str, Any] | None:
    """The first NVIDIA GPU as nvidia-smi reports it (name, compute capability, driver), or None without one.
    TOOLCHAIN_NO_GPU=1 hides it (CI, tests of the skip path)."""
    if os.environ.get("TOOLCHAIN_NO_GPU") == "1":
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    if out.returncode != 0 or not lines:
        return None
    name, cc, driver, mem = (p.strip() for p in lines[0].split(","))
    return {"kind": "cuda", "name": name, "compute_capability": cc, "driver": driver, "memory_mib": int(float(mem)),
            "count": len(lines)}


def cpu_card() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": "cpu", "name": model, "compute_capability": None, "cores": os.cpu_count()}


def _py_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _binary_version(name: str) -> str | None:
    """A binary's identity without running it: its path, size and modification time."""
    path = shutil.which(name)
    if path is None:
        return None
    st = os.stat(path)
    return f"{path} ({st.st_size} bytes, mtime {int(st.st_mtime)})"


def installed(runtime: str) -> str | None:
    """The version of a runtime if it can run here, else None."""
    if runtime == "vllm":
        return _py_version("vllm") if shutil.which("vllm") else None
    if runtime == "trtllm-bench":
        if shutil.which("trtllm-bench") is None:
            return None
        return _py_version("tensorrt_llm") or _py_version("tensorrt-llm") or "unknown"
    if runtime == "llama-bench":
        return _binary_version(os.environ.get("TOOLCHAIN_LLAMA_BENCH", "llama-bench"))
    if runtime == "onnxruntime":
        return _py_version("onnxruntime") or _py_version("onnxruntime-gpu")
    if runtime == "builtin":
        torch = _py_version("torch")
        return f"{BUILTIN_VERSION} (torch {torch}, triton {_py_version('triton')})" if torch else None
    raise ValueError(runtime)


def _card_key(card: dict[str, Any]) -> dict[str, Any]:
    return {"kind": card["kind"], "name": card["name"], "compute_capability": card["compute_capability"]}


def choose(fmt: str, requested: str) -> Choice:
    """The runtime that times format `fmt` here (`requested` is the profile's validate.speed.runtime)."""
    gpu = cuda_card()
    native = NATIVE.get(fmt, ())
    candidates = [requested] if requested != "auto" else [*native, "builtin"]
    reasons = []
    for rt in candidates:
        if rt != "builtin" and rt not in native:
            reasons.append(f"{rt} does not load format {fmt} (its runtimes: {', '.join(native) or 'none'})")
            continue
        if rt == "builtin" and fmt not in BUILTIN_FORMATS:
            reasons.append(f"the built-in runtime reads {', '.join(BUILTIN_FORMATS)} checkpoints, not {fmt}")
            continue
        version = installed(rt)
        if version is None:
            reasons.append(f"{rt} is not installed" if rt != "builtin" else "torch is not installed")
            continue
        needs_gpu = rt in ("builtin", "vllm", "trtllm-bench")
        if needs_gpu and gpu is None:
            reasons.append(f"{rt} needs a CUDA GPU and this machine has none (nvidia-smi finds no GPU)")
            continue
        card = gpu if needs_gpu or (rt == "llama-bench" and gpu is not None) else cpu_card()
        libs = {"builtin": ("torch", "triton"), "vllm": ("vllm", "torch"), "onnxruntime": ("onnxruntime",)}
        return Choice(rt, version, card, libs.get(rt, ()))
    return Choice(None, None, gpu or cpu_card(), skip_reason="speed not measured: " + "; ".join(reasons))


def stage_config(fmt: str, spec: Any) -> tuple[dict[str, Any], Choice]:
    """The speed stage's config (its key material beside the export key and the runtime's libraries)."""
    choice = choose(fmt, spec.runtime)
    settings = spec.model_dump(mode="json")
    gates = settings.pop("gates")
    config = {"format": fmt, "runtime": choice.runtime, "runtime_version": choice.version,
              "card": _card_key(choice.card), "settings": settings, "gates": gates}
    if choice.runtime == "builtin":  # its variant switches, environment defaults included (issue 22, item 6)
        from ..engine.config import EngineConfig

        config["engine"] = EngineConfig.from_env().canonical()
    return config, choice
