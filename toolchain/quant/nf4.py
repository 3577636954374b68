"""NF4 weight quantization (QLoRA's 4-bit NormalFloat), done by bitsandbytes itself so that the packed bytes and
the quantization state are bitsandbytes' own: what transformers and vLLM load is exactly what we stored.

bitsandbytes (functional.quantize_4bit, quant_type "nf4") flattens the weight, takes the absmax of every block of
`blocksize` values, and maps each value / absmax to the nearest of 16 NormalFloat levels; two 4-bit indices per
byte, the first in the high nibble. With double quantization (compress_statistics) the absmax values are stored
as 8-bit codes too: absmax = nested_quant_map[code] * nested_absmax[block of 256] + nested_offset.
The IR layer (type "nf4", see toolchain.ir) keeps these tensors as they come; `QuantizedLinear.dequantize`
reconstructs the weight in plain torch, independently of bitsandbytes (tests check it bit for bit).
"""

from __future__ import annotations

import torch

from ..errors import MissingToolError
from ..ir import QuantizedLinear

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantized absmax


def bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise MissingToolError("quantize.method nf4 needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
    return F


def quantize_nf4(w: torch.Tensor, blocksize: int, double_quant: bool) -> QuantizedLinear:
    """One weight (out, in) -> NF4 in bitsandbytes' bytes. The weight keeps its dtype: bitsandbytes records it
    and dequantizes to it."""
    F = bnb_functional()
    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=double_quant, quant_storage=torch.uint8)
    meta = {"bits": 4, "quant_type": "nf4", "blocksize": blocksize, "double_quant": double_quant,
            "dtype": str(w.dtype).removeprefix("torch.")}
    extras = {"quant_map": state.code.float().contiguous()}
    if double_quant:
        meta.update(nested_blocksize=state.state2.blocksize,
                    nested_dtype=str(state.state2.dtype).removeprefix("torch."))
        extras.update(nested_absmax=state.state2.absmax.contiguous(), nested_quant_map=state.state2.code.contiguous(),
                      nested_offset=state.offset.reshape(()).float())
    return QuantizedLinear("nf4", tuple(w.shape), state.absmax.contiguous(), codes=packed.contiguous(), extras=extras,
                           meta=meta)


def quant_state(q: QuantizedLinear):
    """bitsandbytes' QuantState of an IR layer (what its dequantize_4bit, its serialisation and its loaders use)."""
    F = bnb_functional()
    dtype = getattr(torch, q.meta["dtype"])
    state2, offset = None, None
    if q.meta["double_quant"]:
        state2 = F.QuantState(absmax=q.extras["nested_absmax"], code=q.extras["nested_quant_map"],
                              blocksize=q.meta["nested_blocksize"], dtype=getattr(torch, q.meta["nested_dtype"]))
        offset = q.extras["nested_offset"]
    return F.QuantState(absmax=q.scale, shape=torch.Size(q.shape), code=q.extras["quant_map"],
                        blocksize=q.meta["blocksize"], quant_type="nf4", dtype=dtype, offset=offset, state2=state2)
