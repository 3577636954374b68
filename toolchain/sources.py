"""Where a model comes from: a local HF directory, an HF hub id in the local cache, a GGUF file, or a synthetic
model of a named shape. Resolution and identity (content hash) are light; materialising (GGUF -> HF,
synthetic weights) happens in the `source` stage and imports torch lazily."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import arch
from .errors import InputError


class ProfileLike(Protocol):
    """What resolve() reads of a loaded profile (toolchain.profile.LoadedProfile): its parsed profile and how its
    relative paths resolve. A protocol, not an import: profile.py sits above this module."""

    profile: Any

    def resolve(self, path: str) -> Path: ...

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "hf" | "gguf" | "synthetic"
    label: str
    path: Path | None = None
    synthetic: dict[str, Any] | None = None

    def model_config(self) -> dict[str, Any]:
        """The HF config.json of the model, read without loading weights."""
        if self.kind == "hf":
            return read_config_json(self.path / "config.json")
        if self.kind == "synthetic":
            s = self.synthetic
            return arch.synthetic_config(s["arch"], s.get("num_layers"), s["dtype"])
        return gguf_llama_config(self.path)


def read_config_json(path: Path) -> dict[str, Any]:
    """A model's config.json, or an error naming the file and what is wrong with it."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"source: {path} is not valid JSON ({e}); restore the model's config.json "
                         "(e.g. from the model's hub page)") from None
    if not isinstance(cfg, dict):
        raise InputError(f"source: {path} holds a {type(cfg).__name__}, not a JSON object; restore the model's "
                         "config.json")
    return cfg


def model_dir(manifest: dict[str, Any], artifact_dir: Path) -> Path:
    """Where a source artifact's HF directory is: in the store, or the user's own directory."""
    external = manifest.get("info", {}).get("external_path")
    return Path(external) if external else artifact_dir


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_hub(repo_id: str, revision: str) -> Path:
    """A hub id + revision -> its snapshot in the local HF cache. Offline by design: nothing is downloaded."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None and (repo_dir / "refs" / revision).is_file():
        commit = (repo_dir / "refs" / revision).read_text().strip()
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise InputError(
            f"source.hub: {repo_id}@{revision} is not in the local Hugging Face cache ({repo_dir}). "
            f"Download it where the hub is reachable (`hf download {repo_id} --revision {revision}`) and copy "
            f"the cache here, point source.path at a local copy, or run on random weights of the same shape "
            f"with `--source synthetic` (speed only; accuracy gates are then skipped)."
        )
    return snapshot


def resolve(loaded: ProfileLike) -> ResolvedSource:
    src = loaded.profile.source
    if src.synthetic is not None:
        s = src.synthetic
        if s.arch not in arch.ARCHS:
            raise InputError(f"source.synthetic.arch: unknown architecture {s.arch!r}; "
                             f"known: {', '.join(sorted(arch.ARCHS))}")
        return ResolvedSource("synthetic", f"synthetic:{s.arch} (seed {s.seed})", synthetic=s.model_dump())
    if src.hub is not None:
        path = resolve_hub(src.hub, src.revision)
        prequantized(read_config_json(path / "config.json"), "source.hub")
        return ResolvedSource("hf", f"{src.hub}@{src.revision}", path=path)
    path = loaded.resolve(src.path)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource("gguf", str(path), path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"source.path: {path} has no config.json; point it at a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise InputError(f"source.path: {path} has no *.safetensors weights (only safetensors are read; "
                             "convert .bin weights with transformers' save_pretrained first)")
        prequantized(read_config_json(path / "config.json"), "source.path")
        return ResolvedSource("hf", str(path), path=path)
    if not path.exists():
        raise InputError(f"source.path: {path} does not exist; give an HF model directory or a .gguf file")
    raise InputError(f"source.path: {path} is neither a directory nor a .gguf file")


def prequantized(cfg: dict[str, Any], where: str) -> str | None:
    """A source that is already quantized: "fp8-block" for FP8 with 128x128 block scales (DeepSeek-V3, Qwen3-FP8:
    `quantization_config {quant_method: fp8, weight_block_size: [128, 128]}`, tensors `weight` e4m3 and
    `weight_scale_inv` float32 per block), which the source stage dequantizes; None for a float checkpoint. Any
    other quantized checkpoint is refused: its packed tensors are not weights."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if (method == "fp8" and qc.get("weight_block_size") == [128, 128] and qc.get("fmt", "e4m3") == "e4m3"
            and qc.get("activation_scheme", "dynamic") == "dynamic"):
        return "fp8-block"
    raise InputError(f"{where}: the checkpoint is already quantized (config.json quantization_config quant_method "
                     f"{method!r}); the sources read are float checkpoints and FP8 checkpoints with 128x128 block "
                     "scales (quant_method fp8, weight_block_size [128, 128], e4m3, dynamic activations). Point it "
                     "at the original float model")


def gguf_llama_config(path: Path) -> dict[str, Any]:
    """Read a Llama GGUF's hyper-parameters from its metadata (memory-mapped; no tensor is read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputError("reading a .gguf source needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct/numpy errors, ... on a corrupt or cut file
        raise InputError(f"source.path: {path} is not a readable GGUF file ({type(e).__name__}: {e}); it is "
                         "corrupt or truncated: download it again and compare its sha256") from None
    missing = object()

    def field(name: str, default: Any = missing) -> Any:
        f = reader.fields.get(name)
        if f is None:
            if default is missing:
                raise InputError(f"source.path: {path} lacks the GGUF metadata field {name!r} that a llama model "
                                 "needs; re-convert it with llama.cpp's convert_hf_to_gguf.py")
            return default
        return f.contents()

    arch_name = field("general.architecture", None)
    if arch_name != "llama":
        raise InputError(f"source.path: GGUF architecture {arch_name!r} is not supported yet (only llama)")
    if "tokenizer.ggml.tokens" not in reader.fields:
        field("tokenizer.ggml.tokens")  # raises, naming the missing field
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    heads = int(field("llama.attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(field("llama.embedding_length")),
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("llama.attention.head_count_kv", heads)),
        "vocab_size": vocab,
    }
