"""Profile matrices: `matrix:` expands one profile into variants, one per combination of its axes' values.

An axis is named by the dotted path of the profile field it sets (`quantize.group_size`, `validate.accuracy.seq_len`),
or by a short alias for the common ones (`method`, `bits`, `group_size`, `strategy`, `symmetric`). One axis is not a
profile field: `card`, the accelerator type (a Ray `accelerator_type:<card>` resource) the variant's card-bound
stages (engine, speed) run on; it enters those stages' keys, since a figure timed on an H100 is not an H200's.

    matrix:
      method: [gptq, awq]
      quantize.group_size: [64, 128]
      card: [H100, H200]

gives 8 variants named `<profile>@method=gptq,group_size=64,card=H100`, ... (the last path component names an axis
in the variant name). Each variant is a whole profile, planned as usual: stages whose keys agree across variants
(source, reference, an export the card does not change) are one stage, which the executor runs once.
A bad matrix (empty axis, unknown field, a combination the profile schema refuses) is bad input: exit 2 with the
YAML path of the axis.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InputError

ALIASES = {"method": "quantize.method", "bits": "quantize.bits", "group_size": "quantize.group_size",
           "strategy": "quantize.strategy", "symmetric": "quantize.symmetric"}
CARD = "card"
CARD_BOUND = ("engine", "speed")  # the stage kinds whose result holds only for the card they ran on


@dataclass
class Variant:
    name: str  # <profile>@axis=value,... (the profile's own name when it has no matrix)
    loaded: Any  # profile.LoadedProfile, its profile.name set to `name`
    axes: dict[str, Any] = field(default_factory=dict)  # short axis name -> value
    card: str | None = None  # accelerator type of the card-bound stages, from the `card` axis


def _short(path: str, paths: list[str]) -> str:
    last = path.rsplit(".", 1)[-1]
    return last if sum(p.rsplit(".", 1)[-1] == last for p in paths) == 1 else path


def _set(data: dict, path: str, value: Any, where: str) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise InputError(f"{where}: {path} does not name a profile field ({part} is not a mapping); name a field "
                             "by its dotted path, e.g. quantize.group_size")
        node = nxt
    node[parts[-1]] = value


def _axes(raw: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{where}: a mapping of axis -> list of values, e.g. `matrix: {{method: [gptq, awq]}}` "
                         f"(got {raw!r})")
    axes: dict[str, list[Any]] = {}
    for name, values in raw.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: axis {name!r}: name an axis by a field path, e.g. quantize.group_size")
        if not isinstance(values, list) or not values:
            raise InputError(f"{at}: give a non-empty list of values, e.g. [64, 128] (got {values!r})")
        if not all(isinstance(v, str | int | float | bool) for v in values):
            raise InputError(f"{at}: values are scalars (a string, number or boolean), got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise InputError(f"{at}: a value appears twice in {values!r}")
        path = CARD if name == CARD else ALIASES.get(name, name)
        if path in axes:
            raise InputError(f"{at}: sets {path}, which another axis already sets")
        if path == CARD and not all(isinstance(v, str) and v.replace("-", "").replace("_", "").isalnum()
                                    for v in values):
            raise InputError(f"{at}: card types are names such as H100 or A100-80G (Ray's accelerator_type), "
                             f"got {values!r}")
        axes[path] = values
    return axes


def expand(path: str | Path) -> list[Variant]:
    """The variants of the profile at `path`: one (the profile itself) when it has no `matrix:`."""
    from . import profile as prof

    path = Path(path).resolve()
    data = prof._read_yaml(path)
    raw = data.pop("matrix", None)
    if raw is None:
        loaded = prof.from_dict(data, path)
        return [Variant(loaded.profile.name, loaded)]
    where = f"{path}: matrix"
    axes = _axes(raw, where)
    paths = list(axes)
    variants = []
    for values in itertools.product(*axes.values()):
        chosen = dict(zip(paths, values, strict=True))
        vdata = copy.deepcopy(data)
        for p, v in chosen.items():
            if p != CARD:
                _set(vdata, p, v, f"{where}.{p}")
        short = {_short(p, paths): v for p, v in chosen.items()}
        base = vdata.get("name", "?")
        name = f"{base}@" + ",".join(f"{k}={v}" for k, v in short.items())
        try:
            loaded = prof.from_dict(vdata, path)
        except InputError as e:
            locs = [line.strip().split(":", 1)[0] for line in str(e).splitlines()[1:]]
            axis = next((p for p in paths for loc in locs if p != CARD
                         and (loc == p or p.startswith(loc + ".") or loc.startswith(p + "."))), None)
            at = f"{where}.{axis}" if axis else where
            detail = str(e).split("\n", 1)[-1].strip()
            raise InputError(f"{at}: variant {name} is not a valid profile: {detail}") from None
        # The schema's name pattern is for what users write; a variant's name adds @axis=value,...
        loaded = loaded.model_copy(update={"profile": loaded.profile.model_copy(update={"name": name})})
        variants.append(Variant(name, loaded, short, chosen.get(CARD)))
    return variants


def place_card(plan: Any, card: str | None) -> None:
    """Bind the card-bound stages of a variant's plan to its card: `card_type` joins their config (so their keys),
    and every stage downstream of them is re-keyed. A no-op without a card axis: keys stay those of a plain build."""
    if card is None:
        return
    from .stage import Stage  # noqa: F401  (the dataclass `replace` rebuilds, recomputing each key)

    renamed: dict[str, str] = {}
    stages = []
    for s in plan.stages:
        config = {**s.config, "card_type": card} if s.kind in CARD_BOUND else s.config
        inputs = {r: renamed.get(k, k) for r, k in s.inputs.items()}
        if config is s.config and inputs == s.inputs:
            stages.append(s)
            continue
        new = replace(s, config=config, inputs=inputs)
        renamed[s.key] = new.key
        stages.append(new)
    plan.stages = stages
