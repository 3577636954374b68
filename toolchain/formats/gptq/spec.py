"""The gptq format as plans see it (torch-free): its options, the checks a recipe must pass before any work, and its
entry in the format registry (toolchain.formats)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from ...errors import InputError, MissingToolError
from ...oracles import venv_python
from ...stage import StageCode
from ..base import FormatSpec

FORMAT_BITS = (4, 8)  # what our IR produces; the format also has 2 and 3
# GPTQModel 7.6 pins numpy==2.2.6 (7.7 needs transformers >= 5.20), so it lives in its own venv that reuses our
# torch and transformers (layered on this environment, toolchain.oracles): <venv root>/gptqmodel.
INSTALL = ("run scripts/setup, which makes the oracle venv gptqmodel (gptqmodel==7.6.0 optimum==2.3.0, layered on "
           "this environment), or set TOOLCHAIN_GPTQMODEL_PYTHON to an interpreter that has gptqmodel and optimum")


def loader_python() -> str:
    """The interpreter the validator loads the checkpoint in: ours if it has GPTQModel and optimum, else
    TOOLCHAIN_GPTQMODEL_PYTHON, else the venv scripts/setup makes."""
    if all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum")):
        return sys.executable
    py = os.environ.get("TOOLCHAIN_GPTQMODEL_PYTHON") or str(venv_python("gptqmodel"))
    if not Path(py).is_file():
        raise MissingToolError(f"the gptq target is validated with transformers + optimum + GPTQModel: {INSTALL}")
    return py


def plan_check(quantize_spec: Any, model_config: dict[str, Any], options: dict[str, Any]) -> None:
    """What the GPTQ loaders cannot take, refused before any quantization runs."""
    from ...arch import is_ignored, linear_shapes

    q = quantize_spec
    if q.method == "awq" and not getattr(q, "awq_fold", True):
        raise InputError("targets: format gptq has no place for AWQ's pre_quant_scale; set quantize.awq_fold: true "
                         "(scales folded into the preceding norm/linear) or use format compressed-tensors")
    if q.bits not in FORMAT_BITS:
        raise InputError(f"targets: format gptq is written for bits {FORMAT_BITS}, not {q.bits}")
    pf = 32 // q.bits
    shapes = linear_shapes(model_config)
    quantized = [(n, o, i) for n, o, i in shapes if not is_ignored(n, q.ignore)]
    if any(n == "lm_head" for n, _o, _i in quantized):
        raise InputError("targets: format gptq: transformers/optimum quantize only the decoder blocks' linears, so "
                         "a quantized lm_head would not load; add lm_head to quantize.ignore")
    skipped = [n for n, _o, _i in shapes if n != "lm_head" and is_ignored(n, q.ignore)]
    if skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise InputError(f"targets: format gptq needs every linear of the decoder blocks quantized; "
                         f"quantize.ignore leaves {skipped[0]}{more} unquantized")
    for n, o, i in quantized:
        if i % pf or o % pf:
            raise InputError(f"targets: format gptq packs {pf} values per int32 word; {n} is {o}x{i} "
                             f"(out x in), not a multiple of {pf}")
    loader_python()  # the validator's loader, checked before any quantization


FORMATS = (FormatSpec(
    "gptq",
    export=StageCode("1", ("torch", "safetensors"), "toolchain.formats.gptq.export:run"),
    validator="toolchain.formats.gptq.check:run_validate",
    # Integer codes only (not fp8/nf4); act-order g_idx included; AWQ only with folded scales (plan_check).
    methods=("rtn", "gptq", "gptq-g_idx", "awq"),
    notes="GPTQ v1 (quant_method gptq): vLLM, SGLang, transformers (optimum + GPTQModel), Xinference `gptq`",
    runtimes={"vllm": "LLM(model=dir)", "sglang": "--model-path dir",
              "transformers": "from_pretrained(dir) with optimum + GPTQModel"},
    plan_check=plan_check,
),)
