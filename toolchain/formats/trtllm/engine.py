"""engine:<target>: `trtllm-build` compiles a trtllm-ckpt checkpoint into TensorRT engines (TensorRT-LLM <= 1.2).

An engine is tied to the TensorRT-LLM (and TensorRT) version that built it and to the GPU's compute capability
("expecting compute 9.0 got compute 8.9, please rebuild"), so both are part of the stage's key, with every build
flag. Planning stays light: the version comes from package metadata and the GPU from `nvidia-smi`, nothing is
imported. Where trtllm-build is absent (it is not installable from PyPI: the packages there are placeholders for
NVIDIA's own index) the plan says so up front and the build stops this target with the install instruction.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ...errors import BuildError, MissingToolError
from ...stage import Stage, StageCode
from .spec import INSTALL_TRTLLM, EngineOptions

CODE = StageCode("1", ("tensorrt_llm", "tensorrt"), "toolchain.formats.trtllm.engine:run")  # bump on output change
LAST_ENGINE_RELEASE = (1, 2)  # the TensorRT engine path was removed from TensorRT-LLM after 1.2


def trtllm_version() -> str | None:
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpu_compute_capability() -> list[str] | None:
    """Compute capability of each visible NVIDIA GPU ("9.0"), from nvidia-smi; None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    caps = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return caps if out.returncode == 0 and caps else None


def _release(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def engine_stage(label: str, options: dict[str, Any], export_key: str) -> tuple[Any, list[str]]:
    """The engine stage of a trtllm-ckpt target (its `engine:` options) and the plan notes about it."""
    build = EngineOptions.model_validate(options.get("engine") or {}).model_dump(mode="json")
    caps = gpu_compute_capability()
    version = trtllm_version()
    config = {"build": build, "mapping": {"tp_size": options.get("tp_size", 1), "pp_size": options.get("pp_size", 1)},
              "gpu_compute_capability": caps, "tensorrt_llm": version}
    stage = Stage("engine", config, {"export": export_key}, CODE, label)
    notes = []
    if shutil.which("trtllm-build") is None:
        notes.append(f"engine:{label} will not build: trtllm-build not installed ({INSTALL_TRTLLM}); the build "
                     f"stops target {label} there and finishes the others")
    elif version is not None and _release(version) > LAST_ENGINE_RELEASE:
        notes.append(f"engine:{label}: tensorrt_llm {version} has no TensorRT engine path (removed after 1.2); "
                     "serve the trtllm target with its PyTorch backend, or install tensorrt_llm<=1.2")
    if caps is None:
        notes.append(f"engine:{label}: no NVIDIA GPU visible (nvidia-smi); trtllm-build needs the GPU the engine "
                     "will run on")
    return stage, notes


def command(checkpoint_dir: Path, output_dir: Path, build: dict[str, Any]) -> list[str]:
    return ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
            "--max_batch_size", str(build["max_batch_size"]), "--max_input_len", str(build["max_input_len"]),
            "--max_seq_len", str(build["max_seq_len"]), "--max_num_tokens", str(build["max_num_tokens"]),
            "--gemm_plugin", str(build["gemm_plugin"]), "--workers", str(build["workers"])]


def run(ctx: Any) -> dict[str, Any]:
    label = ctx.stage.target
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise MissingToolError(f"engine:{label}: trtllm-build is not installed; {INSTALL_TRTLLM}")
    cfg = ctx.config
    ckpt = ctx.inputs["export"]
    argv = command(ckpt, ctx.out, cfg["build"])
    ctx.reporter.info(f"  {' '.join(argv)}")
    log_path = ctx.out / "build.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([exe, *argv[1:]], stdout=log, stderr=subprocess.STDOUT, cwd=ctx.out)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"engine:{label}: trtllm-build exited with {proc.returncode}; its log ends:\n{tail}")
    world = json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"]
    missing = [f"rank{r}.engine" for r in range(world) if not (ctx.out / f"rank{r}.engine").is_file()]
    if missing or not (ctx.out / "config.json").is_file():
        raise BuildError(f"engine:{label}: trtllm-build succeeded but wrote no {', '.join(missing) or 'config.json'}")
    built = json.loads((ctx.out / "config.json").read_text())
    recorded = {"argv": ["trtllm-build", *argv[1:]], "checkpoint": str(ckpt), "tensorrt_llm": cfg["tensorrt_llm"],
                "gpu_compute_capability": cfg["gpu_compute_capability"]}
    (ctx.out / "toolchain-build.json").write_text(json.dumps(recorded, indent=2))
    return {"engines": world, "tensorrt_llm": cfg["tensorrt_llm"], "engine_version": built.get("version"),
            "gpu_compute_capability": cfg["gpu_compute_capability"], "command": recorded["argv"]}
