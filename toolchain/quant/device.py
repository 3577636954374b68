"""Where a calibrated method will compute, resolved at plan time without importing torch, and what of that
device shapes the bytes (part of the quantize key): CPU and CUDA results differ (TF32 matmuls, the Triton sweep).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from typing import Any


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built with (torch/version.py, read as text), None for a CPU build."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    m = re.search(r"^cuda(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.M) if version_py.is_file() \
        else None
    return m.group(1) if m else None


def gpu_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def resolve(spec: str | None) -> str:
    """`auto` -> cuda when this torch has CUDA and a GPU is visible, else cpu; an explicit device stays."""
    if spec in (None, "auto"):
        return "cuda" if torch_cuda_build() and gpu_present() else "cpu"
    return spec


def kernel_identity(device: str, method: str) -> dict[str, Any]:
    """What beyond the device shapes a calibrated method's bytes there: on CUDA, float32 matmuls run as TF32
    (toolchain.quant.layerwise.tf32_matmuls), GPTQ's column sweep is the Triton kernel when triton is installed
    (toolchain.quant.gptq_triton), and the CUDA build of torch."""
    if not device.startswith("cuda"):
        return {}
    out: dict[str, Any] = {"tf32": True, "cuda": torch_cuda_build()}
    if method == "gptq":
        switched_on = os.environ.get("TOOLCHAIN_GPTQ_TRITON", "1") != "0"
        if switched_on and importlib.util.find_spec("triton") is not None:
            out["gptq_sweep"] = f"triton {importlib.metadata.version('triton')}"
        else:
            out["gptq_sweep"] = "torch"
    return out
