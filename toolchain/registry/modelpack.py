"""A directory of files -> a CNCF ModelPack artifact: config blob and image manifest, as reproducible bytes.

What the spec asks (modelpack/model-spec, docs/spec.md, docs/config.md, docs/annotations.md,
specs-go/v1/mediatype.go):
- manifest `mediaType` application/vnd.oci.image.manifest.v1+json, `artifactType`
  application/vnd.cncf.model.manifest.v1+json, config `mediaType` application/vnd.cncf.model.config.v1+json;
- config {descriptor{name, family, ...}, config{architecture, format, paramSize, precision, quantization},
  modelfs{type: "layers", diffIds: [...] in layer order}}; `createdAt` is optional and left out (reproducible);
- layers `application/vnd.cncf.model.{weight,weight.config,doc}.v1.raw` (unarchived, uncompressed files: a
  layer's digest is then the file's sha256, its DiffID too), one per file, each annotated
  `org.cncf.model.filepath`.

Reproducible by construction: no wall-clock time, host or user anywhere; layers sorted by path; JSON written
with sorted keys and no whitespace. The same files and metadata give the same manifest digest on any machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
# Not a model file: the store's record of a stage, carried only by remote-cache entries.
STAGE_RECORD = "application/vnd.toolchain.stage.manifest.v1+json"
RAW_LAYER_TYPES = {WEIGHT, WEIGHT_CONFIG, DOC, STAGE_RECORD}

FILEPATH = "org.cncf.model.filepath"
ANNOTATION_PREFIX = "dev.toolchain."

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".onnx.data", ".data",
                   ".engine", ".plan", ".ckpt", ".npz", ".h5", ".msgpack")


def layer_media_type(path: str) -> str:
    name = PurePosixPath(path).name.lower()
    if name.endswith(WEIGHT_SUFFIXES):
        return WEIGHT
    if name.startswith(("readme", "license", "licence", "notice", "copying")) or name.endswith(".md"):
        return DOC
    return WEIGHT_CONFIG  # config.json, tokenizer files, Modelfile, model.json, ...


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def param_size(n: int) -> str:
    """`<count><scale-prefix>` with at most one decimal (docs/config.md, paramSize): 134515008 -> "134.5M"."""
    for div, prefix in ((10**15, "Q"), (10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            count = round(n / div, 1)
            return f"{count:g}{prefix}"
    return f"{n}"  # fewer than a thousand: no prefix


@dataclass(frozen=True)
class Layer:
    path: str
    digest: str  # sha256:...
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {FILEPATH: self.path}}


def layers_of(files: list[dict[str, Any]]) -> list[Layer]:
    """Store manifest entries ({path, size, sha256}) -> layers, sorted by path."""
    return [Layer(f["path"], "sha256:" + f["sha256"], int(f["size"]), f.get("media_type") or
                  layer_media_type(f["path"])) for f in sorted(files, key=lambda f: f["path"])]


def model_config(layers: list[Layer], descriptor: dict[str, Any], config: dict[str, Any]) -> bytes:
    """The config blob. Empty optional fields are dropped (the spec's schema has no nulls)."""
    doc = {
        "descriptor": {k: v for k, v in descriptor.items() if v not in (None, "", [])},
        "config": {k: v for k, v in config.items() if v not in (None, "", {})},
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    }
    return canonical(doc)


def manifest(layers: list[Layer], config_blob: bytes, annotations: dict[str, str]) -> bytes:
    bad = [k for k, v in annotations.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"annotation values must be strings: {bad}")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest_of(config_blob), "size": len(config_blob)},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return canonical(doc)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def annotate(meta: dict[str, Any]) -> dict[str, str]:
    """Our metadata as manifest annotations: strings as they are, anything else as canonical JSON."""
    out = {}
    for k, v in meta.items():
        if v is None:
            continue
        out[ANNOTATION_PREFIX + k] = v if isinstance(v, str) else canonical(v).decode()
    return out
