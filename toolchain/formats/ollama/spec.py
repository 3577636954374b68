"""The ollama format as plans see it (torch-free): its options, the checks a recipe must pass before any work, and
its entry in the format registry (toolchain.formats)."""

from __future__ import annotations

from pydantic import ConfigDict

from ...stage import StageCode
from ..base import FormatSpec
from ..gguf.spec import GGUFOptions
from ..gguf.spec import plan_check as gguf_plan_check

MODELFILE = "Modelfile"


class OllamaOptions(GGUFOptions):
    model_config = ConfigDict(extra="forbid", frozen=True)
    system: str | None = None  # overrides the template's default system prompt ("" = none)
    license: str | None = None  # license text or SPDX id for the LICENSE layer
    parameters: dict[str, str | int | float] = {}  # extra PARAMETER lines (temperature, num_ctx, ...)


FORMATS = (FormatSpec(
    "ollama",
    # 2: a bfloat16 source's embedding/lm_head kept in BF16 (was F16)
    export=StageCode("2", ("torch", "gguf", "transformers"), "toolchain.formats.ollama.export:run"),
    validator="toolchain.formats.ollama.check:run_validate_ollama",
    options=OllamaOptions,
    methods=("none", "rtn", "fp8", "gptq", "awq", "nf4"),
    notes="ollama: model.gguf + Modelfile (TEMPLATE in Go syntax, SYSTEM, PARAMETER stop, LICENSE)",
    runtimes={"ollama": "ollama create NAME -f Modelfile"},
    plan_check=gguf_plan_check,
),)
