"""Profile -> a small graph of stages, each with a cache key; and "what changed" against the last build.

A stage's key is sha256 of canonical JSON of its *material*: stage name, stage code version, its config slice,
the keys of its inputs, and the versions of the libraries that shape its bytes. Nothing here imports torch:
planning a fully cached build must take well under a second.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import arch, checks
from .errors import InputError
from .formats import EXPORTERS
from .gates import NO_GATES, has_gate
from .hashing import StatCache, key_of, tree_digest
from .methods import METHODS
from .methods.fp8 import check_block_shapes
from .profile import LoadedProfile
from .progress import Reporter
from .sources import ResolvedSource, resolve
from .stage import Stage, StageCode, lib_versions, load_entry
from .store import Store

# The shared stages' code. Exporters and their validators are declared by their formats (toolchain.formats).
SOURCE = StageCode("2", ("torch", "transformers", "gguf", "safetensors"), "toolchain.stages.source:run")
QUANTIZE = StageCode("1", ("torch", "safetensors"), "toolchain.stages.quantize:run")
REFERENCE = StageCode("3", ("torch", "transformers"), "toolchain.stages.reference:run")  # 3: streamed
VALIDATE_VERSION = "3"  # 3: weights compared in the loader's arithmetic; NaN/inf fail
VALIDATE_LIBS = ("torch", "transformers")
# Version of the evaluation protocol (windowing, statistics kept); part of reference and validate keys.
PROTOCOL = "ppl-windows-v1/kl-top1024+tail"


STREAMED_FORMATS = {"compressed-tensors"}


def scoring_config(acc: Any, cfg: dict[str, Any]) -> dict[str, str]:
    """Where and in what dtype models are scored, resolved now (it is part of the keys: a CPU float32 reference
    and a CUDA bf16 one are different measurements). auto: CUDA when an NVIDIA driver is present; the checkpoint's
    dtype. Decided without importing torch (plans stay fast)."""
    import os

    device = acc.device if acc is not None else "auto"
    if device == "auto":
        device = "cuda" if any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl")) else "cpu"
    dtype = acc.dtype if acc is not None else "auto"
    if dtype == "auto":
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        dtype = dtype if dtype in ("bfloat16", "float16", "float32") else "float32"
    return {"device": device, "dtype": dtype}


@dataclass
class Plan:
    profile: LoadedProfile
    source: ResolvedSource
    model_config: dict[str, Any]
    stages: list[Stage]
    notes: list[str]
    runtimes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # target label -> verdicts

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def profile_ref(self) -> str:
        """How the user names this profile on the command line (messages: `toolchain build <ref>`)."""
        return str(self.profile.path or self.profile.profile.name)


def check_group_size(cfg: dict[str, Any], q: Any) -> None:
    """Every quantized layer's in_features must be a multiple of the group size: say which layer and what works."""
    if q.method not in ("rtn", "gptq", "awq") or q.strategy != "group":
        return
    layers = [(n, i) for n, _o, i in arch.linear_shapes(cfg) if not arch.is_ignored(n, q.ignore)]
    bad = [(n, i) for n, i in layers if i % q.group_size]
    if not bad:
        return
    g = 0
    for _n, i in layers:
        g = math.gcd(g, i)
    working = [d for d in (16, 32, 64, 128, 256) if g % d == 0]
    name, in_f = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    hint = (f"group sizes that divide every layer: {', '.join(map(str, working))}" if working
            else "no power-of-two group size divides every layer")
    raise InputError(
        f"quantize.group_size: {q.group_size} does not divide in_features {in_f} of {name}{more}. "
        f"INT4 kernels need in_features % group_size == 0; {hint} (or strategy: channel)."
    )


def check_gates(gates: Any) -> None:
    """A profile that measures accuracy says what passes: at least one gate, or `gates: none` explicitly."""
    if gates != NO_GATES and not has_gate(gates.model_dump()):
        raise InputError("validate.accuracy.gates: no gate is set, so every result would pass; set at least one of "
                         "max_ppl_increase_pct, max_kl, min_top1_agreement (e.g. gates: {max_ppl_increase_pct: 10}), "
                         "or write `gates: none` to measure without gating")


def _dataset_digest(loaded: LoadedProfile, cache: StatCache) -> tuple[Path, str] | None:
    acc = loaded.profile.validate_.accuracy
    if acc is None:
        return None
    path = loaded.resolve(acc.dataset)
    if not path.is_file():
        raise InputError(f"validate.accuracy.dataset: {path} does not exist; give a UTF-8 text file "
                         "(e.g. WikiText-2's wiki.test.raw)")
    checks.check_eval_file(path)
    from .quant.calibration import check_utf8

    check_utf8(path, "validate.accuracy.dataset")
    return path, cache.hash(path)


# Formats whose exporters write the IR's calibrated FP8 KV scales (self_attn.k_scale / v_scale).
KV_SCALE_FORMATS = ("compressed-tensors", "trtllm", "trtllm-ckpt")


def kv_calibrated(q: Any) -> bool:
    """quantize.kv_cache: fp8 with a calibration section: K/V scales are calibrated into the IR."""
    return q.kv_cache == "fp8" and q.calibration is not None


# What only calibrated methods read; the others leave it out of the key.
CALIBRATION_FIELDS = ("calibration", "device")


def quantize_config(loaded: LoadedProfile, cache: StatCache, eval_sha256: str | None) -> dict[str, Any]:
    """The quantize stage's config (and key material): the profile's quantize section as its method's model holds
    it (toolchain.methods); a calibration file is identified by its content hash, not its path."""
    from .quant.calibration import parse, refuse_eval_text

    q = loaded.profile.quantize
    method = METHODS[q.method]
    qcfg = q.model_dump(mode="json")
    if method.key_libs:  # the library itself writes the bytes
        qcfg["quantized_with"] = lib_versions(method.key_libs)
    if kv_calibrated(q):  # its samples shape the KV scales (toolchain.quant.kv_cache)
        from .quant.kv_cache import KV_CALIBRATION

        qcfg["kv_scales"] = KV_CALIBRATION
    if not method.calibrated and not kv_calibrated(q):
        for f in CALIBRATION_FIELDS:
            qcfg.pop(f, None)
        return qcfg
    cal = qcfg["calibration"]
    src = parse(cal["dataset"], loaded.resolve)
    if src.kind == "file":
        cal["dataset_sha256"] = cache.hash(src.path)
        refuse_eval_text(cal["dataset_sha256"], eval_sha256, str(src.path))
        del cal["dataset"]  # the content is the identity: moving the file does not rebuild
    from .quant import device

    qcfg["device"] = device.resolve(q.device)  # the device that will run, not `auto`: CPU and CUDA bytes differ
    if not method.calibrated:  # only the KV scales are calibrated
        qcfg["calibrated_with"] = lib_versions(("transformers", "tokenizers"))
        return qcfg
    qcfg["kernels"] = device.kernel_identity(qcfg["device"], q.method)
    qcfg["method_version"] = method.version
    qcfg["calibrated_with"] = lib_versions(("transformers", "tokenizers"))
    return qcfg


def _source_key(src: ResolvedSource, cache: StatCache, reporter: Reporter) -> str:
    if src.kind == "synthetic":
        return key_of({"synthetic": src.synthetic})
    from .hashing import files_of

    files = files_of(src.path)
    todo = sum(f.stat().st_size for f in files if cache.lookup(f) is None)
    if todo == 0:
        return tree_digest(src.path, cache, files=files)
    with reporter.task(f"hashing {src.path.name}", total=todo, unit="bytes") as t:
        return tree_digest(src.path, cache, on_bytes=t.advance, files=files)


def _tokenizer_of(src: ResolvedSource, store: Store, source_key: str) -> tuple[Path | None, bool]:
    """(directory holding the source's tokenizer, if at hand; whether the source has one at all). A GGUF's
    tokenizer is at hand once its source stage has converted it."""
    if src.kind == "synthetic":
        return None, False
    if src.kind == "hf":
        return src.path, checks.has_tokenizer(src.path)
    built = store.object_dir(source_key)
    return (built if store.has(source_key) else None), True


def build_plan(loaded: LoadedProfile, store: Store, reporter: Reporter | None = None) -> Plan:
    reporter = reporter or Reporter(quiet=True)
    p = loaded.profile
    src = resolve(loaded)
    checks.check_source_files(src, "source.hub" if p.source.hub else "source.path")
    checks.check_publish_tags(p)
    cache = StatCache(store.root / "cache" / "stat.json")
    source_key = _source_key(src, cache, reporter)
    dataset = _dataset_digest(loaded, cache)
    qcfg = quantize_config(loaded, cache, dataset[1] if dataset else None)
    cache.save()
    source = Stage("source", {"kind": src.kind, "content": source_key}, {}, SOURCE, data={"source": src})

    # The converted source's config.json, when built, spares re-parsing a GGUF's metadata on every plan.
    built_config = store.object_dir(source.key) / "config.json"
    cfg = json.loads(built_config.read_text()) if built_config.is_file() else src.model_config()
    # an unsupported family or feature: exit 2 naming what is supported
    family = checks.check_architecture(cfg, "source.hub" if p.source.hub else "source.path")
    if src.kind == "synthetic" and not store.has(source.key):
        checks.check_synthetic_size(cfg, store.root)  # before anything lists its layers
    try:
        arch.linear_shapes(cfg)
    except (ValueError, KeyError) as e:
        raise InputError(f"source: {e}") from None
    check_group_size(cfg, p.quantize)
    check_block_shapes(cfg, p.quantize)
    checks.check_something_to_quantize(cfg, p.quantize)
    checks.check_positions(cfg, p.quantize)
    tokenizer_dir, tokenized = _tokenizer_of(src, store, source.key)
    notes: list[str] = []

    stages: list[Stage] = [source]
    quant = Stage("quantize", qcfg, {"source": source.key}, QUANTIZE)
    stages.append(quant)
    if p.quantize.calibration is not None:
        from .quant import calibration

        cal = p.quantize.calibration
        quant.data["calibration"] = calibration.parse(cal.dataset, loaded.resolve)
        if not store.has(quant.key):  # it will read the text: check it now
            calibration.check_source(quant.data["calibration"], cal.text_field)
            text = calibration.plan_text(quant.data["calibration"], cal.text_field)
            if text is not None:
                checks.check_calibration_tokens(text, cal.dataset, cal.seq_len, tokenizer_dir, tokenized)

    acc = p.validate_.accuracy
    reference = None
    # The reference and compressed-tensors are scored block by block; other formats' loaders hold the whole model.
    whole = sorted({t.format for t in p.targets} - STREAMED_FORMATS)
    if acc is not None and src.kind != "synthetic" and whole and not arch.fits_in_memory(cfg):
        gib = arch.dense_params(cfg) * 4 / 2**30
        raise InputError(f"validate.accuracy: the loaders of {', '.join(whole)} reload this model whole in float32 "
                         f"({gib:.0f} GiB), more than this machine can hold; run the build on a machine with more "
                         "memory, target compressed-tensors (scored block by block), or remove validate.accuracy")
    scoring = scoring_config(acc, cfg)
    if acc is not None:
        check_gates(acc.gates)
        protocol = {"dataset_sha256": dataset[1], "seq_len": acc.seq_len, "stride": acc.stride or acc.seq_len,
                    "max_tokens": acc.max_tokens, "protocol": PROTOCOL, **scoring}
        reference = Stage("reference", protocol, {"source": source.key}, REFERENCE, data={"dataset": dataset[0]})
        if src.kind != "synthetic" and not store.has(reference.key):  # it will score the text: long enough?
            checks.check_eval_tokens(dataset[0], tokenizer_dir)
        if src.kind == "synthetic":
            reference.skip_reason = "synthetic weights: accuracy is meaningless, gates skipped"
            notes.append("ACCURACY GATES SKIPPED: the source is synthetic (random weights). Only the reload "
                         "check runs; use a real checkpoint for accuracy.")
        stages.append(reference)

    runtimes: dict[str, list[dict[str, Any]]] = {}
    for i, target in enumerate(p.targets):
        exporter = EXPORTERS[target.format]
        if "*" not in exporter.methods and p.quantize.method not in exporter.methods:
            raise InputError(f"targets: format {target.format} cannot hold quantize.method {p.quantize.method} "
                             f"(it holds {', '.join(exporter.methods)})")
        fmt_of = target.options.get("of", target.format) if target.format == "xinference" else target.format
        if kv_calibrated(p.quantize) and fmt_of not in KV_SCALE_FORMATS:
            raise InputError(f"targets: format {target.label} has no FP8 KV cache, and the calibrated KV scales "
                             f"(quantize.kv_cache: fp8 with calibration) would be written into it as stray tensors; "
                             f"drop that target or quantize.kv_cache (formats with one: {', '.join(KV_SCALE_FORMATS)})")
        if "*" not in exporter.families and family.name not in exporter.families:
            raise InputError(f"targets: format {target.format} does not take {family.name} models yet (it takes "
                             f"{', '.join(exporter.families)}): {exporter.families_rule}")
        if exporter.plan_check:  # first: a format's own reason is the more precise one
            exporter.plan_check(p.quantize, cfg, target.options)
        # GPTQ act-order without static groups needs a per-column group index (g_idx) in the checkpoint; a
        # format holds it only if it lists "gptq-g_idx" (compressed-tensors 0.19 has no g_idx).
        if (p.quantize.method == "gptq" and p.quantize.act_order and not p.quantize.static_groups
                and p.quantize.strategy == "group" and not {"*", "gptq-g_idx"} & set(exporter.methods)):
            raise InputError(f"targets: format {target.format} cannot hold GPTQ act-order groups (a g_idx per "
                             "input column); set quantize.static_groups: true (act-order with groups in order, "
                             "what compressed-tensors calls actorder: weight) or act_order: false")
        verdicts = check_runtimes(i, target, p.quantize, cfg)
        runtimes[target.label] = verdicts
        export_cfg = target.model_dump(mode="json", exclude={"runtimes"})  # says who loads it, not its bytes
        engine_opts = export_cfg["options"].pop("engine", None)  # the engine stage's, not the export's
        export = Stage("export", export_cfg, {"quantize": quant.key}, exporter.export, target.label,
                       data={"source_gguf": src.path if src.kind == "gguf" else None}, runtimes=verdicts)
        stages.append(export)
        vconf: dict[str, Any] = {"format": target.format, "scoring": scoring}
        if exporter.checker:
            vconf.update(exporter.checker(target.options))
        vinputs = {"export": export.key, "quantize": quant.key, "source": source.key}
        if reference is not None and reference.skip_reason is None:
            vconf["gates"] = acc.gates if acc.gates == NO_GATES else acc.gates.model_dump(mode="json")
            vconf["protocol"] = reference.config
            vinputs["reference"] = reference.key
        check = StageCode(VALIDATE_VERSION, tuple(dict.fromkeys(VALIDATE_LIBS + exporter.libs)), exporter.validator)
        validate = Stage("validate", vconf, vinputs, check, target.label,
                         data={"dataset": dataset[0] if dataset else None,
                               "source_gguf": export.data["source_gguf"]})
        stages.append(validate)
        # A failed validation stops its target: the engine, speed and publish stages run after it passed.
        passed = (validate.name,)
        if engine_opts is not None and exporter.engine:
            engine, engine_notes = load_entry(exporter.engine)(target.label, target.options, export.key)
            engine.after = passed
            stages.append(engine)
            passed += (engine.name,)
            notes += engine_notes
        if p.validate_.speed is not None:
            speed = speed_stage(target.label, target.format, p.validate_.speed, export.key)
            if speed.config["runtime"] == "builtin" and speed.skip_reason is None and builtin_lacks(p.quantize):
                speed.skip_reason = f"speed not measured: {builtin_lacks(p.quantize)}"
            speed.after = passed
            stages.append(speed)
    from .stages.publish import publish_stages

    plan = Plan(loaded, src, cfg, stages, notes, runtimes)
    plan.stages += publish_stages(plan)  # last: a target is pushed only after all its stages
    return plan


def check_runtimes(index: int, target: Any, q: Any, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Which runtimes will load this target's artifact (toolchain.runtimes.rules); a runtime the profile names
    that would refuse it is bad input, said with the rule and its source."""
    from .runtimes import rules

    verdicts = rules.judge(target.format, rules.recipe_facts(q, target.format, target.options, cfg))
    for v in verdicts:
        if target.runtimes is not None and v["runtime"] in target.runtimes and not v["loads"]:
            raise InputError(rules.refusal_message(f"[{index}] ({target.label})", target.format, v))
    if target.runtimes is not None:
        verdicts = [v for v in verdicts if v["runtime"] in target.runtimes]
    if verdicts and not any(v["loads"] for v in verdicts):  # an artifact nothing it is for would load
        raise InputError(rules.refusal_message(f"[{index}] ({target.label})", target.format, verdicts[0], False))
    return verdicts


def builtin_lacks(q: Any) -> str | None:
    """Schemes the built-in runtime has no GEMM for yet: timing them would time something else."""
    if q.method == "fp8" and q.strategy == "block":
        return "the built-in runtime has no block-scaled FP8 GEMM (128x128 weight scales, 1x128 activation groups) yet"
    if q.method == "smoothquant":
        return "the built-in runtime has no INT8 x INT8 GEMM for W8A8 yet"
    return None


def speed_stage(label: str, fmt: str, spec: Any, export_key: str) -> Stage:
    """speed:<target>, after its validation: keyed by the export, the runtime and its version, the card and the
    settings (toolchain.runtimes.select); skipped, with the reason, where nothing here can time it."""
    from .runtimes.select import BUILTIN_VERSION, stage_config

    config, choice = stage_config(fmt, spec)
    code = StageCode(BUILTIN_VERSION, choice.libs, "toolchain.stages.speed:run")
    return Stage("speed", config, {"export": export_key}, code, label, skip_reason=choice.skip_reason)


# -- explaining rebuilds ---------------------------------------------------------------------------

def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path} {old!r} -> {new!r}"]


def explain(stage: Stage, previous: dict[str, Any] | None, store: Store) -> str:
    """Why `stage` would build: the fields that differ from the last build of this profile."""
    if store.has(stage.key):
        return "cached"
    if previous is None:
        return "never built"
    old = previous.get("material", {})
    reasons = []
    if old.get("version") != stage.material["version"]:
        reasons.append(f"stage code version {old.get('version')} -> {stage.material['version']}")
    reasons += [f"{stage.kind}: {d}" for d in _diff(old.get("config", {}), stage.config, "")]
    reasons += [f"library {d}" for d in _diff(old.get("libs", {}), stage.material["libs"], "")]
    changed_inputs = [r for r, k in stage.inputs.items() if old.get("inputs", {}).get(r) != k]
    if changed_inputs and not reasons:
        reasons.append("input changed: " + ", ".join(changed_inputs))
    # refs are written before a build's first stage: an unfinished (or running, or killed) build leaves this too
    return "; ".join(reasons) or "not in the store: the last build of this profile did not finish it, or gc removed it"


def ref_name(profile_name: str, source: ResolvedSource) -> str:
    """Refs are keyed by profile and source: a `--source synthetic` run keeps its own roots and history instead
    of replacing the real build's (whose artifacts the next gc would then delete)."""
    if source.kind == "synthetic":
        return f"{profile_name}@synthetic-{source.synthetic['arch']}"
    return profile_name


def ref_record(plan: Plan) -> dict[str, Any]:
    return {"profile": plan.profile.profile.name, "source": plan.source.label,
            "stages": [{"name": s.name, "key": s.key, "material": s.material} for s in plan.stages]}
