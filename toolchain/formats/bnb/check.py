"""Validate a bitsandbytes NF4 checkpoint: transformers + bitsandbytes reload it on CPU, every Linear4bit's weight
as bitsandbytes dequantizes it must equal our IR's dequantization bit for bit, then the model's logits are scored
against the reference (`finish_validation`).

Order matters: on a CPU with AVX512-BF16, bitsandbytes' first forward repacks each Linear4bit's weight in place
(its CPU tile layout, absmax cast to bfloat16), after which the stored bytes and quant state are no longer the
checkpoint's. So the weights are compared before any forward (a model saved after a forward reloads wrong for the
same reason). The logits then come from the block-streamed runner (toolchain.validate.streamed) over the weights
bitsandbytes dequantized, on the profile's scoring device and dtype: no bitsandbytes forward runs at all.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from ...errors import BuildError, MissingToolError
from ...ir import IRReader
from ...stage import StageContext

# bitsandbytes' dequantize_4bit: level * absmax in float32 (its absmax is float32), rounded once to the dtype the
# weight had when quantized (QuantState.dtype); QuantizedLinear.dequantize does the same in plain torch.
ARITHMETIC = "float32: NF4 level * float32 absmax, rounded once to the checkpoint dtype, as dequantize_4bit does"


def weight_conformance(model, ir: IRReader) -> dict[str, Any]:
    from ...validate.compare import WeightComparison

    check = WeightComparison(ARITHMETIC)
    for name, theirs, ours in layer_pairs(model, ir):
        check.add(name, theirs, ours)
    return check.result()


def layer_errors(model, ir: IRReader) -> dict[str, float]:
    """Per quantized layer: max |bitsandbytes' dequantization of the loaded weight - ours| (inf: wrong shape or a
    non-finite value)."""
    from ...validate.compare import max_abs_diff

    return {name: max_abs_diff(a.float(), b.float()) for name, a, b in layer_pairs(model, ir)}


def layer_pairs(model, ir: IRReader):
    """(name, bitsandbytes' dequantization of the loaded weight, ours) per quantized layer, one at a time."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    modules = dict(model.named_modules())
    for name in ir.layers:
        mod = modules.get(name)
        if not isinstance(mod, bnb.nn.Linear4bit):
            raise BuildError(f"{name} was not loaded as a bitsandbytes Linear4bit ({type(mod).__name__})")
        state = mod.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise BuildError(f"{name}: weight already repacked for the CPU kernel; compare before any forward")
        theirs = F.dequantize_4bit(mod.weight.data, state)
        q = ir.layer(name)
        yield name, theirs, q.dequantize(getattr(torch, q.meta["dtype"]))


def run_validate(ctx: StageContext) -> dict[str, Any]:
    from ...validate.accuracy import finish_validation, hf_logits, load_hf_model

    try:
        import bitsandbytes.functional  # noqa: F401  (the loader needs it)
    except ImportError:
        raise MissingToolError("validating the bnb target needs bitsandbytes: pip install bitsandbytes==0.50.2") \
            from None
    model = load_hf_model(ctx.inputs["export"])
    conformance = weight_conformance(model, IRReader(ctx.inputs["quantize"]))
    loader = (f"transformers {importlib.metadata.version('transformers')} + bitsandbytes "
              f"{importlib.metadata.version('bitsandbytes')} (dequantize_4bit)")
    return finish_validation(ctx, loader, conformance, hf_logits(model), bnb_weights(model))


def bnb_weights(model):
    """The loaded model as a weight source: each Linear4bit's weight as bitsandbytes dequantizes it (read before
    any forward: its CPU kernel repacks in place), other tensors as loaded."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from ...validate.accuracy import hf_model_weights

    modules = dict(model.named_modules())
    plain = hf_model_weights(model)

    def get(name: str) -> torch.Tensor:
        mod = modules.get(name.rpartition(".")[0])
        if isinstance(mod, bnb.nn.Linear4bit) and name.endswith(".weight"):
            return F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        return plain(name)

    return get
