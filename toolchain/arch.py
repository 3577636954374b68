"""Model shapes without loading weights: named architectures for synthetic sources, and the linear layers of a
decoder computed from its config.json through its family (toolchain.families). Used at plan time, so it must stay
free of torch."""

from __future__ import annotations

from typing import Any

from . import families

# Shapes of real models (from their published config.json), for synthetic sources: each family module's named
# shapes (toolchain.families), e.g. llama-2-7b, qwen3-8b, mistral-7b, and a tiny one per family for tests.
ARCHS: dict[str, dict[str, Any]] = families.named_shapes()

LLAMA_LIKE = {mt for f in families.FAMILIES.values() for mt in f.model_types}


def synthetic_config(arch: str, num_layers: int | None, dtype: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise KeyError(arch)
    cfg = dict(ARCHS[arch])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    cfg["dtype"] = dtype
    return cfg


def head_dim(cfg: dict[str, Any]) -> int:
    return families.family_of(cfg).dims(cfg).head_dim


def linear_shapes(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every nn.Linear in the causal LM, blocks in order, then lm_head.
    Raises families.UnsupportedModel (a ValueError) for a model_type no family describes."""
    fam = families.family_of(cfg)
    block = fam.block_linears(cfg)
    out = [(f"{families.block_prefix(i)}{rel}", o, i_f) for i in range(cfg["num_hidden_layers"])
           for rel, o, i_f in block]
    out.append(("lm_head", cfg["vocab_size"], cfg["hidden_size"]))
    return out


def is_ignored(name: str, ignore: tuple[str, ...] | list[str]) -> bool:
    """compressed-tensors' convention: a plain entry matches the module name or its last component;
    `re:<pattern>` is a regular expression."""
    import re

    for pat in ignore:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def resolved_ignore(cfg: dict[str, Any], ignore: tuple[str, ...] | list[str]) -> list[str]:
    """The linears `ignore` leaves unquantized, by their exact module names: what a checkpoint's own ignore list
    must say, since loaders match exact names or re: patterns only (not our bare last-name shorthand)."""
    return [n for n, _o, _i in linear_shapes(cfg) if is_ignored(n, ignore)]


def dense_params(cfg: dict[str, Any]) -> int:
    """Parameters of the linears plus the embedding (norms are negligible)."""
    return sum(o * i for _n, o, i in linear_shapes(cfg)) + cfg["vocab_size"] * cfg["hidden_size"]


def fits_in_memory(cfg: dict[str, Any], bytes_per_param: int = 4, fraction: float = 0.4) -> bool:
    """Whether the whole model, dense at `bytes_per_param`, fits in `fraction` of this machine's RAM."""
    import psutil

    return dense_params(cfg) * bytes_per_param < fraction * psutil.virtual_memory().total
