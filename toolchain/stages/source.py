"""The source stage: make the model an HF safetensors directory the rest of the pipeline can read lazily.

- hf: nothing to copy; the artifact records the directory (its content hash is already in the key). An FP8
  block-scaled checkpoint (toolchain.sources.prequantized) is dequantized into the store instead, tensor by tensor.
- gguf: dequantize through transformers' GGUF loader and save as safetensors, with tokenizer and chat template.
- synthetic: random weights of a named shape, written tensor by tensor (memory: one tensor), seeded per tensor.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BuildError, MissingToolError
from ..sources import model_dir  # noqa: F401  (where a source artifact's model is; its home is sources.py)

if TYPE_CHECKING:  # (the benchmarks synthesize models on a bare GPU box, without the pipeline's imports)
    from ..progress import Reporter
    from ..stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    src = ctx.data["source"]
    if src.kind == "hf":
        from ..sources import prequantized, read_config_json

        if prequantized(read_config_json(src.path / "config.json"), "source") == "fp8-block":
            n = dequantize_fp8_block(src.path, ctx.out, ctx.reporter)
            return {"label": src.label, "converted_from": "fp8-block", "dequantized_layers": n}
        return {"external_path": str(src.path), "label": src.label}
    if src.kind == "gguf":
        convert_gguf(src.path, ctx.out, ctx)
        return {"label": src.label, "converted_from": "gguf"}
    synthesize(ctx.model_config, src.synthetic["seed"], ctx.out, ctx.reporter)
    return {"label": src.label, "synthetic": src.synthetic}


def convert_gguf(path: Path, out: Path, ctx: StageContext) -> None:
    try:
        import gguf  # noqa: F401
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingToolError(f"converting a GGUF source needs torch, transformers and gguf ({e}); "
                               "pip install 'toolchain[quant]'") from None
    ctx.reporter.info(f"  dequantizing {path.name} with transformers' GGUF loader")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are now plain float tensors; drop the marker that makes transformers refuse to save them.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    # transformers' GGUF tokenizer converter gives eos the bos token (SmolLM2: both <|im_start|>); the model
    # config holds the GGUF's own ids, so take the special tokens from there.
    for role in ("bos", "eos"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(token_id))
    tok.save_pretrained(out)


def dequantize_fp8_block(src: Path, out: Path, reporter: Reporter) -> int:
    """An FP8 block-scaled checkpoint as float weights: w = e4m3 * weight_scale_inv[row // 128, col // 128] in
    float32, rounded once to the config's dtype (what DeepSeek-V3's weight_dequant and vLLM's block dequantization
    compute; `weight_scale_inv` is the multiplier, despite its name). One tensor in memory at a time."""
    import shutil

    import torch

    from ..ir import ShardWriter, TensorReader
    from ..quant.fp8 import expand_block_scale
    from ..sources import TOKENIZER_FILES, read_config_json

    cfg = read_config_json(src / "config.json")
    dtype = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    reader = TensorReader(src)
    writer = ShardWriter(out, prefix="model")
    n = 0
    with reporter.task("dequantizing the FP8 block-scaled source", total=len(reader.keys())) as task:
        for name in reader.keys():
            task.advance()
            if name.endswith(".weight_scale_inv"):
                continue
            t = reader.get(name)
            scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
            if t.dtype == torch.float8_e4m3fn:
                if scale_name not in reader:
                    raise BuildError(f"source: {name} is FP8 without a {scale_name}")
                t = (t.float() * expand_block_scale(reader.get(scale_name).float(), t.shape)).to(dtype)
                n += 1
            writer.add(name, t)
    writer.close(hf_layout=True)
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)
    return n


def synthesize(cfg: dict[str, Any], seed: int, out: Path, reporter: Reporter, device: str = "cpu") -> None:
    """Random weights (std 0.02, norms 1) of the shape in `cfg`, one tensor in memory at a time. Seeded per tensor:
    on the CPU the bytes depend only on (seed, name); a GPU `device` makes them faster (other bytes)."""
    import torch

    from ..ir import ShardWriter

    dtype = getattr(torch, cfg["dtype"])
    names = synthetic_tensor_shapes(cfg)
    writer = ShardWriter(out, prefix="model")
    total = sum(_numel(shape) for _, shape in names)
    with reporter.task("synthesizing weights", total=total) as task:
        for name, shape in names:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                t = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).cpu()
            writer.add(name, t)
            task.advance(_numel(shape))
    writer.close(hf_layout=True)
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": cfg["dtype"]}, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def synthetic_tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in order: embedding, each block's (its family's: biases, q/k norms), final
    norm, and lm_head unless tied."""
    from ..families import block_prefix, family_of

    fam = family_of(cfg)
    h = cfg["hidden_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    block = fam.block_tensors(cfg)
    for layer in range(cfg["num_hidden_layers"]):
        out += [(block_prefix(layer) + rel, shape) for rel, shape in block]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out
