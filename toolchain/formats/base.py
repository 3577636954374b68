"""What a format declares to the registry (toolchain.formats), from its torch-free spec module: the export and
validate stages' code, the options a target may set, the methods it holds, and its plan-time checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..stage import StageCode


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class FormatSpec:
    name: str  # what a profile's `format:` says
    export: StageCode  # the export stage: its version (bump when the output changes), libraries, runner
    validator: str  # "module:function" reading the artifact back with an independent loader (the format's check)
    options: type[BaseModel] = NoOptions
    # Quantization schemes the format can hold; checked at plan time. Keys: method names; "*" = any.
    methods: tuple[str, ...] = ("*",)
    notes: str = ""
    # The serving runtimes it is for (the default of a target's `runtimes:`) and how each loads it; the rules of
    # what each refuses live in toolchain.runtimes.rules.
    runtimes: dict[str, str] = field(default_factory=dict)
    # (quantize_spec, model_config, options) raising InputError when the format cannot hold the recipe on this
    # model (plan time: no torch).
    plan_check: Callable[[Any, dict[str, Any], dict[str, Any]], None] | None = None
    # "module:function(label, options, export_key) -> (Stage, notes)": a stage compiling the export (an engine).
    engine: str = ""
    # (options) -> dict: which independent checker the validator will run (with its version), put in the
    # validate key so a weaker fallback check never shares a key with the real one.
    checker: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # The decoder families (toolchain.families names) its writer and checker handle; "*" = all. Any other is
    # refused at plan time with `families_rule`, which says why.
    families: tuple[str, ...] = ("*",)
    families_rule: str = ""

    @property
    def libs(self) -> tuple[str, ...]:
        return self.export.libs
