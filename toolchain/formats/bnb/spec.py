"""The bnb format as plans see it (torch-free): its options, the checks a recipe must pass before any work, and its
entry in the format registry (toolchain.formats)."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from typing import Any

from ...errors import InputError, MissingToolError
from ...stage import StageCode
from ..base import FormatSpec

CPU_TILE_ROWS = 32  # bitsandbytes' _convert_weight_packed_for_cpu block_n
INSTALL = "pip install bitsandbytes==0.50.2"


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    from ...arch import is_ignored, linear_shapes

    q = quantize_spec
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingToolError(f"quantize.method nf4 and format bnb need bitsandbytes: {INSTALL}")
    quantized = [(n, o, i) for n, o, i in linear_shapes(model_config) if not is_ignored(n, q.ignore)]
    if any(n == "lm_head" for n, _o, _i in quantized):
        raise InputError("targets: format bnb: vLLM keeps lm_head unquantized in bitsandbytes checkpoints; add "
                         "lm_head to quantize.ignore")
    for n, o, i in quantized:
        if i % q.blocksize and (err := straddle_misread(i, q.blocksize)):
            fits = [b for b in (32, 64, 128, 256) if all(ii % b == 0 for _n, _o, ii in quantized)]
            raise InputError(
                f"quantize.blocksize: {q.blocksize} does not divide in_features {i} of {n}, and the installed "
                f"bitsandbytes' CPU NF4 dequantize misreads blocks that straddle rows (off by up to {err:.3g} on a "
                f"probe here: its AVX512 path), so the artifact could not be validated (or run) on this CPU; "
                f"blocksizes that divide every layer: {', '.join(map(str, fits)) or 'none'}")
        if o % CPU_TILE_ROWS:
            raise InputError(f"targets: format bnb: out_features {o} of {n} is not a multiple of {CPU_TILE_ROWS}, "
                             "which bitsandbytes 0.50's AVX512-BF16 CPU matmul needs")


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise MissingToolError(f"the bnb target needs bitsandbytes: {INSTALL}") from None
    return F


@functools.cache
def straddle_misread(in_features: int, blocksize: int) -> float:
    """How far the installed bitsandbytes' CPU dequantize is from the true NF4 weights on a probe whose blocks
    straddle rows (4 rows of N(0,1), this in_features and blocksize); 0.0 where the kernel reads them right.
    The truth is our plain-torch dequantization, bit-exact to bitsandbytes wherever blocks stay within rows."""
    import torch

    from ...quant.nf4 import quant_state, quantize_nf4

    F = _bnb()
    q = quantize_nf4(torch.randn(4, in_features, generator=torch.Generator().manual_seed(0)), blocksize, False)
    return (F.dequantize_4bit(q.codes, quant_state(q)) - q.dequantize()).abs().max().item()


FORMATS = (FormatSpec(
    "bnb",
    export=StageCode("1", ("torch", "safetensors", "bitsandbytes", "transformers"), "toolchain.formats.bnb.export:run"),
    validator="toolchain.formats.bnb.check:run_validate",
    methods=("nf4",),
    notes="bitsandbytes NF4 (quant_method bitsandbytes, load_in_4bit): transformers, vLLM, Xinference `bnb`",
    runtimes={"transformers": "from_pretrained(dir) with bitsandbytes",
              "vllm": "LLM(model=dir) with a bitsandbytes plugin"},
    plan_check=plan_check,
),)
