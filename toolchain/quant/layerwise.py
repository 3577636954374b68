"""The block-by-block runner for calibrated quantizers (GPTQ, AWQ): memory bounded by one decoder block.

How it runs (`run_layerwise`):
  1. the calibration token ids (n_samples, seq_len) go through the source's embedding table: X0;
  2. for each decoder block i, its weights are read lazily from the source's safetensors into a transformers
     decoder layer built from the config (fp32 by default, on `device`), and the method is called:
         method.quantize_block(block, prefix, calib, args) -> BlockResult
  3. the runner puts the dequantized weights (and any `replaced` tensors) into the block, runs it over X_i to
     get X_{i+1} (so every block is calibrated on the outputs of the *quantized* blocks before it), writes the
     block's IR tensors and frees it.
Peak memory: two activation buffers (n, seq, hidden) + one block + one embedding table; nothing else.
On CUDA the block's float32 matmuls (forwards, Hessians) use TF32: 3x faster on a Llama-2-7B block, and the
GPTQ result it leads to is the same to 1e-6 in the layer's loss (measured; the GPTQ sweep itself turns TF32
off: see toolchain.quant.gptq).

The method's side of the contract (toolchain.quant.gptq and toolchain.quant.awq implement it):

    def quantize_block(block: nn.Module, prefix: str, calib: BlockCalibration, args: dict) -> BlockResult

  block   the decoder layer (e.g. LlamaDecoderLayer) with the source weights, on calib.device, in eval mode.
          The method may change its weights in place while it works (GPTQ writes each layer's dequantized
          weight back so that later layers see quantized inputs: true-sequential); the runner overwrites every
          quantized linear with `dequantize()` of its result afterwards either way.
  prefix  the block's name in the checkpoint, e.g. "model.layers.3"; full module names are prefix + "." + rel.
  calib   the block's calibration inputs and helpers to run it (see BlockCalibration):
            calib.targets           {full name: nn.Linear} of this block's linears to quantize (ignore applied)
            calib.inputs            (n, seq, hidden) input hidden states of the block (calib.dtype, calib.device)
            calib.kwargs            what block(x, **kwargs) needs besides x: position_embeddings, attention_mask
            calib.forward()         runs the block over all samples in batches (current weights), returns outputs
            calib.collect(mods, fn) runs the block and calls fn(name, x) with each batch's input (..., in) of the
                                    given linears (by full name); stops as soon as all of them were fed
            calib.capture(mods)     {name: input tensor (n, seq, in)} of the given linears (all samples at once)
          For sub-module experiments (AWQ's scale search), run e.g. block.self_attn(hidden_states=x,
          **calib.kwargs)[0] or block.mlp(x) directly on captured inputs.
  args    the profile's quantize section as a dict (bits, group_size, symmetric, method options...), plus
          "scale_dtype" as a torch.dtype.
  returns BlockResult(quantized={full name: QuantizedLinear}, replaced={full tensor name: tensor}).
          `replaced` holds plain tensors the method changed (e.g. AWQ folding a scale into
          "model.layers.3.input_layernorm.weight"); they are written to the IR instead of the source's and
          loaded into the block before its outputs are computed. A QuantizedLinear whose extras hold
          "pre_quant_scale" (in,) is run as x / pre_quant_scale feeding the dequantized weight.
          Optional BlockResult.outputs: the block's outputs with the quantized weights, if the method has them.

An optional `quantize_head(linear, name, inputs, args) -> QuantizedLinear` on the method quantizes an unignored
lm_head from its inputs (final-norm hidden states, (n, seq, hidden)); without it the head gets RTN.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import blocks
from ..arch import is_ignored
from ..ir import IRWriter, QuantizedLinear, TensorReader


@dataclass
class BlockResult:
    """What a method returns for one block (see the module docstring)."""

    quantized: dict[str, QuantizedLinear]
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    # The block's outputs on calib.inputs with the quantized weights, when the method computed them anyway
    # (spares the runner one forward of the block). Must equal what the runner would compute.
    outputs: torch.Tensor | None = None


class _Stop(Exception):
    """Raised from a hook once every wanted input was seen: the rest of the block need not run."""


@dataclass
class BlockCalibration:
    """One block's calibration inputs, and ways to run the block over them (see the module docstring)."""

    block: nn.Module
    prefix: str
    inputs: torch.Tensor
    kwargs: dict[str, Any]
    targets: dict[str, nn.Linear]
    batch_size: int
    device: torch.device
    dtype: torch.dtype

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name.removeprefix(self.prefix + "."))

    def batches(self) -> Iterable[torch.Tensor]:
        for i in range(0, self.inputs.shape[0], self.batch_size):
            yield self.inputs[i : i + self.batch_size]

    @torch.no_grad()
    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block's outputs for every calibration sample with its current weights (into `out` if given)."""
        out = torch.empty_like(self.inputs) if out is None else out
        for i, x in enumerate(self.batches()):
            out[i * self.batch_size : i * self.batch_size + len(x)] = _block_output(self.block(x, **self.kwargs))
        return out

    @torch.no_grad()
    def collect(self, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run the block over all samples, calling fn(name, x) with the input batch of each named linear.
        The forward of a batch stops once all named linears have been fed (later modules are not needed)."""
        names = list(names)
        seen: set[str] = set()

        def hook(name: str):
            def pre(_mod: nn.Module, args: tuple) -> None:
                fn(name, args[0])
                seen.add(name)
                if len(seen) == len(names):
                    raise _Stop

            return pre

        handles = [self.module(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            for x in self.batches():
                seen.clear()
                try:
                    self.block(x, **self.kwargs)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()

    def capture(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Inputs of the named linears over all samples, {name: (n, seq, in)} (memory: n*seq*in per name)."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.collect(parts, lambda n, x: parts[n].append(x.detach().clone()))
        return {n: torch.cat(v) for n, v in parts.items()}


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# -- model pieces from transformers, one block at a time: toolchain.blocks (shared with validation) ------------

def hf_config(src_dir: Path):
    return blocks.hf_config(src_dir)


def load_block(cfg, reader: TensorReader, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Decoder layer `index` with its weights from the source, on `device` in `dtype`."""
    return blocks.load_block(cfg, reader.get, index, device, dtype)


def rotary(cfg, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return blocks.rotary(cfg, seq_len, device, dtype)


def pick_device(device: str | None) -> torch.device:
    return blocks.pick_device(device, "quantize.device")


def _block_tensor_names(reader: TensorReader, index: int) -> list[str]:
    prefix = f"model.layers.{index}."
    return [k for k in reader.keys() if k.startswith(prefix)]


# -- the runner ---------------------------------------------------------------------------------------------

def load_method(name: str, module: str | None = None):
    """The method's block quantizer: `module` (its registry entry's `layerwise`, passed by the quantize stage), or
    by convention toolchain.quant.<name>. Not looked up in the method registry: quant/ sits below methods/."""
    path = module or f"{__package__}.{name}"
    try:
        mod = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name != path:
            raise
        raise ValueError(f"no layer-wise method {name!r} ({path} is not a module)") from None
    if not hasattr(mod, "quantize_block"):
        raise ValueError(f"no layer-wise method {name!r} ({mod.__name__} has no quantize_block)")
    return mod


@torch.no_grad()
def _apply_result(block: nn.Module, prefix: str, result: BlockResult, compute_dtype: torch.dtype,
                  source_dtype: torch.dtype) -> None:
    """Make the block compute what the quantized checkpoint will: dequantized weights, replaced tensors (as
    stored, i.e. rounded to the source dtype), activation pre-scales."""
    for name, q in result.quantized.items():
        lin = block.get_submodule(name.removeprefix(prefix + "."))
        lin.weight.data = q.dequantize(compute_dtype).to(lin.weight.device)
        pqs = q.extras.get("pre_quant_scale")
        if pqs is not None:
            s = pqs.to(device=lin.weight.device, dtype=compute_dtype)
            lin.register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s, *a[1:]))
    for name, t in result.replaced.items():
        rel = name.removeprefix(prefix + ".")
        mod_name, _, attr = rel.rpartition(".")
        mod = block.get_submodule(mod_name)
        getattr(mod, attr).data = t.to(source_dtype).to(device=getattr(mod, attr).device, dtype=compute_dtype)


@contextmanager
def tf32_matmuls(device: torch.device, enabled: bool) -> Iterator[None]:
    """Whether float32 matmuls on a CUDA device may use TF32 inside the block (restored after)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def run_layerwise(
    src_dir: Path,
    writer_factory: Callable[[torch.dtype], IRWriter],
    ids: torch.Tensor,
    args: dict[str, Any],
    reporter: Any,
    device: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Quantize the model in `src_dir` block by block with method args["method"] on calibration ids (n, seq).

    `writer_factory(source_dtype)` makes the IRWriter (the scheme records the source dtype). Tensors are
    written in checkpoint order: embeddings, each block, then the final norm and lm_head. Returns stage info.
    """
    dev = pick_device(device)
    with tf32_matmuls(dev, True):
        return _run_layerwise(src_dir, writer_factory, ids, args, reporter, dev, compute_dtype, batch_size)


def _run_layerwise(src_dir: Path, writer_factory: Callable[[torch.dtype], IRWriter], ids: torch.Tensor,
                   args: dict[str, Any], reporter: Any, dev: torch.device, compute_dtype: torch.dtype,
                   batch_size: int | None) -> dict[str, Any]:
    method = load_method(args["method"], args.get("layerwise_module"))
    reader = TensorReader(src_dir)
    cfg = hf_config(src_dir)
    n_layers = cfg.num_hidden_layers
    embed = reader.get("model.embed_tokens.weight")
    source_dtype = embed.dtype
    writer = writer_factory(source_dtype)
    ignore = tuple(args.get("ignore", ()))
    n, seq = ids.shape
    # Samples per forward: an MLP intermediate of ~128 MiB on CPU (larger batches are no faster there and
    # only raise the peak), ~1 GiB on a GPU (where they keep the kernels busy).
    budget = (1 << 28) if dev.type == "cuda" else (1 << 25)
    bs = batch_size or max(1, min(n, budget // max(1, seq * cfg.intermediate_size)))
    timings: dict[str, float] = {}

    writer.add_plain("model.embed_tokens.weight", embed)
    x = embed.to(dev)[ids.to(dev)].to(compute_dtype)  # (n, seq, hidden), built where it will live
    del embed
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    kwargs = blocks.block_kwargs(cfg, seq, dev, compute_dtype)
    y: torch.Tensor | None = None
    quantized_names: list[str] = []
    t_total = time.perf_counter()
    with reporter.task(f"quantize {args['method']} (layer by layer, {dev.type})", total=n_layers) as task:
        for i in range(n_layers):
            t0 = time.perf_counter()
            prefix = f"model.layers.{i}"
            reader = TensorReader(src_dir)
            block = load_block(cfg, reader, i, dev, compute_dtype)
            targets = {f"{prefix}.{rel}": m for rel, m in block.named_modules()
                       if isinstance(m, nn.Linear) and not is_ignored(f"{prefix}.{rel}", ignore)}
            calib = BlockCalibration(block, prefix, x, kwargs, targets, bs, dev, compute_dtype)
            task.describe(f"quantize {args['method']} {prefix}")
            result = method.quantize_block(block, prefix, calib, args)
            _apply_result(block, prefix, result, compute_dtype, source_dtype)
            # The quantized block's outputs feed the next block.
            if result.outputs is not None:
                x = result.outputs
            else:
                y = calib.forward(out=y if y is not None and y.shape == x.shape else None)
                x, y = y, x
            for name in _block_tensor_names(reader, i):
                mod = name.removesuffix(".weight")
                if mod in result.quantized:
                    writer.add_quantized(mod, result.quantized[mod])
                    quantized_names.append(mod)
                elif name in result.replaced:
                    writer.add_plain(name, result.replaced[name].to(source_dtype).cpu())
                else:
                    writer.add_plain(name, reader.get(name))
            del block, calib, result
            _free(dev)
            timings[prefix] = time.perf_counter() - t0
            task.advance()
    del y
    reader = TensorReader(src_dir)
    head_info = _write_tail(reader, writer, cfg, x, n_layers, method, args, dev, compute_dtype, quantized_names)
    info = {"method": args["method"], "device": str(dev), "quantized_layers": len(quantized_names),
            "calibration_shape": [n, seq], "batch_size": bs, "seconds_layers": round(time.perf_counter() - t_total, 3),
            "seconds_per_block": [round(t, 3) for t in timings.values()], **head_info}
    if dev.type == "cuda":
        info["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _write_tail(reader: TensorReader, writer: IRWriter, cfg, x: torch.Tensor, n_layers: int, method: Any,
                args: dict[str, Any], dev: torch.device, compute_dtype: torch.dtype,
                quantized_names: list[str]) -> dict[str, Any]:
    """Everything after the blocks: final norm, lm_head (quantized from its real inputs when not ignored)."""
    written = {"model.embed_tokens.weight"} | {k for i in range(n_layers) for k in _block_tensor_names(reader, i)}
    info: dict[str, Any] = {}
    for name in reader.keys():
        if name in written:
            continue
        if name == "lm_head.weight" and not is_ignored("lm_head", tuple(args.get("ignore", ()))):
            w = reader.get(name)
            quantize_head = getattr(method, "quantize_head", None)
            if quantize_head is None:
                from .rtn import quantize_rtn

                q = quantize_rtn(w, args["bits"], args["group_size"], args["symmetric"], args["strategy"],
                                 args["scale_dtype"])
                info["lm_head"] = "rtn (the method has no quantize_head)"
            else:
                norm = _final_norm(cfg, reader, dev, compute_dtype)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=compute_dtype)
                lin.weight.data = w.to(device=dev, dtype=compute_dtype)
                with torch.no_grad():
                    q = quantize_head(lin, "lm_head", norm(x), args)
                info["lm_head"] = args["method"]
            writer.add_quantized("lm_head", q)
            quantized_names.append("lm_head")
        else:
            writer.add_plain(name, reader.get(name))
    return info


def _final_norm(cfg, reader: TensorReader, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    return blocks.final_norm(cfg, reader.get("model.norm.weight"), dev, dtype)


def _free(dev: torch.device) -> None:
    blocks.free(dev, collect=True)
