"""The stage contract, below the planner and the executor: what a stage is (kind, target, config, inputs, the code
that runs it and its key) and what its runner sees (StageContext). Formats, methods and stages depend on this
module; it depends on nothing of theirs. No torch here: planning imports it.

A stage's key is sha256 of canonical JSON of its *material*: its name, its code's version, its config, the keys of
its inputs, and the versions of the libraries that shape its bytes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hashing import key_of
from .progress import Reporter
from .store import Store

# Per-target stage kinds, named "<kind>:<target label>"; the others (source, quantize, reference) are shared.
TARGET_KINDS = ("export", "validate", "engine", "speed", "publish")


def load_entry(ref: str) -> Any:
    """The one "module:function" loader: stage runners, plan checks, checkers and engine stages are named so the
    registries stay light (importing the module is deferred until the entry is used)."""
    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError(f"entry {ref!r} is not of the form module:function")
    return getattr(importlib.import_module(module), name)


def lib_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


@dataclass(frozen=True)
class StageCode:
    """How a stage's code is declared, for every kind of stage: its version (bump it whenever the code changes
    what it writes), the distributions whose versions shape its bytes (both in the key), and its runner."""

    version: str
    libs: tuple[str, ...]
    runner: str  # "module:function(ctx: StageContext) -> dict"


@dataclass
class Stage:
    kind: str  # source | quantize | reference | export | validate | engine | speed | publish
    config: dict[str, Any]
    inputs: dict[str, str]  # role -> key of the input stage's artifact
    code: StageCode
    target: str | None = None  # the target label of a per-target stage
    skip_reason: str | None = None  # set when the stage is planned but cannot or need not run
    # Stages (by name) that must succeed before this one runs, beyond its inputs: ordering, not key material.
    after: tuple[str, ...] = ()
    # Resolved locations of data files the runner reads (profile paths resolved at plan time); not key material:
    # the key holds their content hashes through the config.
    data: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    material: dict[str, Any] = field(default_factory=dict)
    runtimes: list[dict[str, Any]] | None = None  # export stages: who loads the artifact (manifest, not key)

    def __post_init__(self) -> None:
        if (self.kind in TARGET_KINDS) != (self.target is not None):
            raise ValueError(f"stage kind {self.kind}: a target is {'required' if self.target is None else 'not used'}")
        self.material = {
            "stage": self.name,
            "version": self.code.version,
            "config": self.config,
            "inputs": self.inputs,
            "libs": lib_versions(self.code.libs),
        }
        self.key = key_of(self.material)

    @property
    def name(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target}"


@dataclass
class StageContext:
    """What a stage runner sees: its stage (config, input keys, key), its inputs' directories and manifests, where
    to write (`out`, a temporary directory committed as `final` when the runner returns), how to report, the
    source model's config, and the data files resolved from the profile, the store. Not the plan."""

    stage: Stage
    out: Path
    final: Path  # where `out` will live in the store: for files that name their own location (model.json)
    inputs: dict[str, Path]
    input_manifests: dict[str, dict[str, Any]]
    reporter: Reporter
    model_config: dict[str, Any]
    profile_name: str
    store: Store  # for stages that package several stored objects (publish); others read `inputs`

    @property
    def config(self) -> dict[str, Any]:
        return self.stage.config

    @property
    def data(self) -> dict[str, Any]:
        return self.stage.data
