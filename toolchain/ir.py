"""The canonical quantized form: what quantization produces once and every exporter reads.

A directory holding
  quant.json            {"format": "toolchain-ir", "version", "scheme", "layers": {name: layer meta}}
  tensors-NNNNN.safetensors + tensors.index.json
  config.json, tokenizer files, generation_config.json   copied from the source

Per quantized linear `<name>` (weights are (out, in), as in torch):
  integer (type "int"):   <name>.codes  int8 (out, in), signed range [-2^(b-1), 2^(b-1)-1]
                          <name>.scale  (out, n_groups) in the scheme's scale dtype
                          <name>.zero   int8 (out, n_groups), same signed range; absent when symmetric
                          <name>.g_idx  int32 (in,) group of each input column; absent unless act-order
                          w = (codes - zero) * scale[:, g_idx]
  float (type "float8"):  <name>.weight float8_e4m3fn (out, in)
                          <name>.scale  (out, 1) per channel or (1,) per tensor;  w = weight * scale
                          strategy "block": <name>.scale (ceil(out/b0), ceil(in/b1)) for the blocks
                          meta.block_structure [b0, b1] (128x128); w = weight * scale[row // b0, col // b1]
  nf4 (type "nf4"):       bitsandbytes' own NF4 tensors (toolchain.quant.nf4), over the flattened weight:
                          <name>.codes  uint8 (ceil(out*in/2), 1)  two 4-bit level indices per byte, first high
                          <name>.scale  absmax per block of meta.blocksize values: float32 (n_blocks,), or with
                                        meta.double_quant uint8 codes of it (absmax - nested_offset, 8-bit)
                          <name>.quant_map float32 (16,)  the NF4 levels
                          double quant: <name>.nested_absmax float32 (n_blocks / 256,), <name>.nested_quant_map
                                        float32 (256,), <name>.nested_offset float32 ()
                          absmax = nested_quant_map[scale] * nested_absmax[block // 256] + nested_offset
                          w = (quant_map[index] * absmax[block]) in float32, then rounded to meta.dtype
                          (as bitsandbytes' dequantize_4bit does)
  optional:               <name>.pre_quant_scale (in,)  AWQ's activation scale (x / s feeds the weight)
                          <name>.input_scale            static activation scale
Every other tensor (embeddings, norms, unquantized layers) is kept under its own name. Signed codes with a
signed zero point are compressed-tensors' convention; exporters to unsigned formats shift both by 2^(b-1).

A quantized layer's scheme (bits, strategy, group_size, symmetric, actorder, blocksize, ...) has one source of
truth: its entry in `layers`, read as QuantizedLinear.meta, or IRReader.layer_field for what a format holds once
for the whole model. `scheme` is the recipe that produced the layers (the method and its options, the scale and
source dtypes, the KV cache, `ignore`), never read for a layer's own fields.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

IR_VERSION = 1
NF4_EXTRAS = ("quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
SHARD_BYTES = 2 << 30
IR_SHARD_BYTES = 512 << 20


@dataclass
class QuantizedLinear:
    """One quantized weight in canonical form (see the module docstring)."""

    type: str  # "int" | "float8" | "nf4"
    shape: tuple[int, int]
    scale: torch.Tensor
    codes: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    weight_fp8: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.scale": self.scale}
        if self.codes is not None:
            out[f"{name}.codes"] = self.codes
        if self.zero is not None:
            out[f"{name}.zero"] = self.zero
        if self.g_idx is not None:
            out[f"{name}.g_idx"] = self.g_idx
        if self.weight_fp8 is not None:
            out[f"{name}.weight"] = self.weight_fp8
        out.update({f"{name}.{k}": v for k, v in self.extras.items()})
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.type == "float8":
            scale = self.scale.to(torch.float32)
            if self.meta.get("strategy") == "block":
                scale = expand_block_scale(scale, self.shape, tuple(self.meta["block_structure"]))
            return (self.weight_fp8.to(torch.float32) * scale).to(dtype)
        if self.type == "nf4":
            return self._dequantize_nf4().to(getattr(torch, self.meta["dtype"])).to(dtype)
        out_f, in_f = self.shape
        if self.g_idx is None and scale_is_grouped(self.scale) and self.scale.shape[1] > 1 \
                and in_f % self.scale.shape[1] == 0:
            # groups in column order: broadcast over (out, groups, group_size) instead of gathering per column
            # (the same products, several times faster on a 7B layer)
            n_groups = self.scale.shape[1]
            codes = self.codes.to(torch.float32).reshape(out_f, n_groups, in_f // n_groups)
            if self.zero is not None:
                codes = codes - self.zero.to(torch.float32)[:, :, None]
            return (codes * self.scale.to(torch.float32)[:, :, None]).reshape(out_f, in_f).to(dtype)
        g_idx = self.g_idx.long() if self.g_idx is not None else default_g_idx(in_f, self.meta.get("group_size"))
        scale = self.scale.to(torch.float32)[:, g_idx] if scale_is_grouped(self.scale) else self.scale.float()
        codes = self.codes.to(torch.float32)
        if self.zero is not None:
            zero = self.zero.to(torch.float32)[:, g_idx] if self.zero.numel() > 1 else self.zero.float()
            codes = codes - zero
        return (codes * scale).to(dtype)

    def _dequantize_nf4(self) -> torch.Tensor:
        """float32 weight from the NF4 tensors, in plain torch (bitsandbytes' arithmetic, not its code)."""
        n, bs = self.shape[0] * self.shape[1], self.meta["blocksize"]
        packed = self.codes.reshape(-1).to(torch.int64)
        index = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
        absmax = self.scale
        if self.meta["double_quant"]:
            nbs = self.meta["nested_blocksize"]
            nested = self.extras["nested_absmax"].float().repeat_interleave(nbs)[: absmax.numel()]
            absmax = self.extras["nested_quant_map"].float()[absmax.long()] * nested + self.extras["nested_offset"]
        per_value = absmax.float().repeat_interleave(bs)[:n]
        return (self.extras["quant_map"].float()[index] * per_value).reshape(self.shape)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int] | torch.Size,
                       block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A (blocks_out, blocks_in) scale spread over the (out, in) weight it scales (FP8 block: 128x128)."""
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def scale_is_grouped(scale: torch.Tensor) -> bool:
    return scale.dim() == 2


def default_g_idx(in_features: int, group_size: int | None) -> torch.Tensor:
    """Group of each input column without act-order: column // group_size (one group for per-channel)."""
    if not group_size or group_size >= in_features:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever SHARD_BYTES is reached: memory stays bounded."""

    def __init__(self, out_dir: Path, prefix: str = "tensors", shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.prefix, self.shard_bytes = out_dir, prefix, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / fname), metadata={"format": "pt"})
        self.files.append(fname)
        self.weight_map.update(dict.fromkeys(self.pending, fname))
        self.pending, self.pending_bytes = {}, 0

    def close(self, hf_layout: bool = False) -> dict[str, str]:
        """Write what is pending and the index. `hf_layout` names files as transformers expects:
        model.safetensors alone, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
        self.flush()
        if hf_layout:
            n = len(self.files)
            names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            renames = dict(zip(self.files, names, strict=True))
            for old, new in renames.items():
                (self.out_dir / old).rename(self.out_dir / new)
            self.files = names
            self.weight_map = {k: renames[v] for k, v in self.weight_map.items()}
            if n == 1:
                return self.weight_map
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        name = "model.safetensors.index.json" if hf_layout else f"{self.prefix}.index.json"
        (self.out_dir / name).write_text(json.dumps(index, indent=2))
        return self.weight_map


class TensorReader:
    """Lazy access to the tensors of a directory of safetensors files (one tensor in memory at a time)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.weight_map: dict[str, str] = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.weight_map[k] = f.name

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """An owned copy. A tensor backed by the file's memory map would keep the whole map, and every page of
        it read so far, counted in this process's RSS for as long as it lives (a norm weight kept for a later
        shard held a whole source shard's pages: 4 GiB of file pages on a Llama-2-7B-shaped model)."""
        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as h:
            return h.get_tensor(name).clone()


class IRWriter:
    def __init__(self, out_dir: Path, scheme: dict[str, Any]):
        self.out_dir = out_dir
        self.scheme = scheme
        self.layers: dict[str, dict[str, Any]] = {}
        # Small shards: what is pending is held in memory until written (the quantize stage's peak).
        self.shards = ShardWriter(out_dir, shard_bytes=IR_SHARD_BYTES)

    def add_quantized(self, name: str, q: QuantizedLinear) -> None:
        self.layers[name] = {"type": q.type, "shape": list(q.shape), **q.meta}
        for k, t in q.tensors(name).items():
            self.shards.add(k, t)

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def close(self, source_dir: Path | None) -> None:
        self.shards.close()
        doc = {"format": "toolchain-ir", "version": IR_VERSION, "scheme": self.scheme, "layers": self.layers}
        (self.out_dir / "quant.json").write_text(json.dumps(doc, indent=2))
        if source_dir is not None:
            copy_model_metadata(source_dir, self.out_dir)


def copy_model_metadata(src: Path, dst: Path) -> None:
    """config.json, tokenizer and generation config: what a loader needs beside the weights."""
    from .sources import TOKENIZER_FILES

    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class IRReader:
    def __init__(self, directory: Path):
        self.directory = directory
        doc = json.loads((directory / "quant.json").read_text())
        if doc.get("format") != "toolchain-ir":
            raise ValueError(f"{directory} is not a toolchain IR directory")
        self.scheme: dict[str, Any] = doc["scheme"]
        self.layers: dict[str, dict[str, Any]] = doc["layers"]
        self.tensors = TensorReader(directory)
        self.config: dict[str, Any] = json.loads((directory / "config.json").read_text())

    def layer_field(self, field: str) -> Any:
        """The value of a layer field (group_size, bits, ...) shared by every quantized layer, from the layers
        themselves (None without quantized layers); BuildError where layers differ, for formats that hold one."""
        from .errors import BuildError

        values = {json.dumps(meta.get(field)) for meta in self.layers.values()}
        if len(values) > 1:
            raise BuildError(f"the IR's layers differ in {field} ({', '.join(sorted(values))}); this format holds "
                             "one for the whole model")
        return json.loads(values.pop()) if values else None

    def layers_scheme(self) -> dict[str, Any]:
        """The recipe with the layers' own fields (bits, strategy, group_size, symmetric) taken from the layers."""
        fields = ("bits", "strategy", "group_size", "symmetric")
        return {**self.scheme, **{f: self.layer_field(f) for f in fields if self.layers}}

    def plain_names(self) -> list[str]:
        """Tensors that are not part of a quantized layer, in the source's naming. A quantized linear's bias
        (Qwen2's q/k/v) is plain: never quantized, carried as the source has it."""
        quant_prefixes = tuple(n + "." for n in self.layers)
        return [k for k in self.tensors.keys()
                if not k.startswith(quant_prefixes) or k.removesuffix(".bias") in self.layers]

    def layer(self, name: str) -> QuantizedLinear:
        meta = dict(self.layers[name])
        typ, shape = meta.pop("type"), tuple(meta.pop("shape"))
        t = self.tensors

        def opt(suffix: str) -> torch.Tensor | None:
            return t.get(f"{name}.{suffix}") if f"{name}.{suffix}" in t else None

        extras = {s: t.get(f"{name}.{s}") for s in ("pre_quant_scale", "input_scale", *NF4_EXTRAS)
                  if f"{name}.{s}" in t}
        return QuantizedLinear(
            type=typ, shape=shape, scale=t.get(f"{name}.scale"), codes=opt("codes"), zero=opt("zero"),
            g_idx=opt("g_idx"), weight_fp8=opt("weight") if typ == "float8" else None, extras=extras, meta=meta,
        )
