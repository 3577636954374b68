"""What a store artifact becomes in a registry: its files, a ModelPack config, and our annotations.

The annotations say where the artifact came from and how it was checked: profile, target, every stage key,
the source's content digest, the toolchain version that built it, validation and speed results, the runtimes
the format serves and, for engines, the GPU architecture. Nothing machine-specific (paths, times, hosts,
seconds, memory) goes in, so the manifest digest depends only on the artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..progress import Reporter
from ..store import Store
from . import auth, transfer
from . import modelpack as mp
from .client import RegistryClient
from .reference import Reference

# Keys of stage info that depend on the machine or the run, not on the artifact.
MACHINE_KEYS = {"dataset", "seconds", "peak_rss_bytes", "created_unix", "path", "directory"}


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if k not in MACHINE_KEYS}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _weights_format(files: list[dict[str, Any]]) -> str | None:
    names = [f["path"].lower() for f in files]
    for suffix, fmt in ((".engine", "tensorrt"), (".gguf", "gguf"), (".onnx", "onnx"), (".safetensors", "safetensors"),
                        (".bin", "pytorch")):
        if any(n.endswith(suffix) for n in names):
            return fmt
    return None


def _precision(q: dict[str, Any], model_config: dict[str, Any]) -> str | None:
    method = q.get("method")
    if method in (None, "none"):
        dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "")
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype)
    from ..methods import METHODS

    entry = METHODS.get(method)
    return entry.precision if entry is not None and entry.precision else f"int{q.get('bits', 4)}"


def describe(name: str, files: list[dict[str, Any]], model_config: dict[str, Any] | None,
             quantize: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ModelPack descriptor and config sections (docs/config.md)."""
    from .. import arch

    model_config = model_config or {}
    params = None
    try:
        params = mp.param_size(arch.dense_params(model_config)) if model_config else None
    except (KeyError, ValueError, TypeError):
        params = None
    q = quantize or {}
    method = q.get("method")
    descriptor = {"name": name, "family": model_config.get("model_type")}
    config = {
        "architecture": "transformer" if model_config.get("model_type") else None,
        "format": _weights_format(files),
        "paramSize": params,
        "precision": _precision(q, model_config) if q else None,
        "quantization": None if method in (None, "none") else method,
    }
    return descriptor, config


def target_package(store: Store, all_stages: list[Any], label: str, fmt: str, profile_name: str, profile_ref: str,
                   model_config: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict, dict, dict]:
    """(key, files, descriptor, config, annotations) of a built target (`all_stages`: the plan's, toolchain.stage),
    its engine when it has one, else its export. InputError when it is not built; a failed validation is refused
    by the caller."""
    from ..formats import EXPORTERS

    stages = {s.name: s for s in all_stages}
    mine = [s for s in all_stages if s.target == label and s.kind != "publish"]
    missing = [s.name for s in mine if not s.skip_reason and not store.has(s.key)]
    if missing:
        raise InputError(f"target {label} is not built ({', '.join(missing)} missing from {store.root}); run "
                         f"`toolchain build {profile_ref}` first")
    chosen = stages.get(f"engine:{label}") or stages[f"export:{label}"]
    manifest = store.manifest(chosen.key)
    q = store.manifest(stages["quantize"].key).get("config", {}) if store.has(stages["quantize"].key) else {}
    descriptor, config = describe(profile_name, manifest["files"], model_config, q)
    results = {}
    for s in mine:
        if s.name == chosen.name or s.skip_reason or s.kind == "export":
            continue
        info = store.manifest(s.key).get("info", {})
        results[s.kind] = _scrub({k: v for k, v in info.items() if k != "status"})
    keys = {s.name: s.key for s in all_stages
            if s.kind != "publish" and s.target in (None, label) and not s.skip_reason}
    engine = stages.get(f"engine:{label}")
    meta = {
        "profile": profile_name,
        "target": label,
        "format": fmt,
        "stage": chosen.name,
        "key": chosen.key,
        "stage-keys": keys,
        "source-digest": stages["source"].config.get("content"),
        "version": manifest.get("tool_versions", {}).get("toolchain"),
        "validation": results.get("validate"),
        "speed": results.get("speed"),
        "runtime": EXPORTERS[fmt].notes,
        "gpu-arch": engine.config.get("gpu_compute_capability") if engine else None,
    }
    annotations = {"org.opencontainers.image.title": f"{profile_name}:{label}", **mp.annotate(meta)}
    return chosen.key, manifest["files"], descriptor, config, annotations


def key_package(store: Store, key: str) -> tuple[list[dict[str, Any]], dict, dict, dict]:
    """(files, descriptor, config, annotations) of any store artifact, from its own manifest."""
    m = store.manifest(key)
    root = store.object_dir(key)
    model_config = None
    if (root / "config.json").is_file():
        try:
            model_config = json.loads((root / "config.json").read_text())
        except json.JSONDecodeError:
            model_config = None
    q = m.get("config") if m.get("stage") == "quantize" else None
    descriptor, config = describe(m.get("profile") or m["stage"], m["files"], model_config, q)
    meta = {"stage": m["stage"], "key": key, "profile": m.get("profile"), "inputs": m.get("inputs") or None,
            "version": m.get("tool_versions", {}).get("toolchain"),
            "result": _scrub({k: v for k, v in (m.get("info") or {}).items()}) or None}
    return m["files"], descriptor, config, mp.annotate(meta)


def push_files(ref: Reference, root: Path, files: list[dict[str, Any]], descriptor: dict, config: dict,
               annotations: dict[str, str], insecure: bool, reporter: Reporter,
               interruptible: bool = False) -> transfer.Pushed:
    """Push one artifact. `interruptible` (the push command): Ctrl-C/SIGTERM stop between chunks, resumably."""
    from contextlib import nullcontext

    layers = mp.layers_of(files)
    config_blob = mp.model_config(layers, descriptor, config)
    with RegistryClient(ref.host, auth.lookup(ref.host), insecure=insecure) as client:
        with transfer.stop_between_chunks(client) if interruptible else nullcontext():
            return transfer.push(client, ref, root, config_blob, layers, annotations, reporter)


def destination(to: str, label: str, n_targets: int) -> Reference:
    """A publish destination for one target: `{target}` in the tag is replaced by its label; with several
    targets and no placeholder, the label is appended (`:int4` -> `:int4-gguf`) so they never overwrite."""
    from .reference import parse_reference

    try:
        ref = parse_reference(to.replace("{target}", label), need_tag=True)
        if n_targets > 1 and "{target}" not in to:
            ref = ref.with_tag(f"{ref.tag}-{label}")
    except InputError as e:
        raise InputError(f"target {label!r} cannot be published to {to}: {e}. Fix: name the target with letters, "
                         "digits, . _ - only") from None
    return ref
