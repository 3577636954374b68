"""The source stage: make the model an HF safetensors directory the rest of the pipeline can read lazily.

- hf: nothing to copy; the artifact records the directory (its content hash is already in the key).
- gguf: dequantize through transformers' GGUF loader and save as safetensors, with tokenizer and chat template.
- synthetic: random weights of a named shape, written tensor by tensor (memory: one tensor), seeded per tensor.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingToolError
from ..sources import model_dir  # noqa: F401  (where a source artifact's model is; its home is sources.py)

if TYPE_CHECKING:  # (the benchmarks synthesize models on a bare GPU box, without the pipeline's imports)
    from ..progress import Reporter
    from ..stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    src = ctx.data["source"]
    if src.kind == "hf":
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
