"""Reads the TensorRT-LLM checkpoints (toolchain.formats.trtllm.spec) back with code of its own, checks them against
the IR, and scores them with a torch forward.

transformers cannot be the reader: it loads ModelOpt FP8 checkpoints with their scales silently ignored, and knows
nothing of the legacy layout. So this module decodes the files itself (INT4 unpacking, FP8 scales, the legacy
tensor-parallel shards and names), written separately from the exporter so that a mistake there shows up here:
  1. conformance: every quantized weight decoded from the files equals the IR's own dequantization (exactly; FP8
     members the legacy layout had to requantize to a shared scale are compared with that requantization), and
     pre_quant_scales, norms, embeddings and KV scales equal what the IR dictates in the export dtype;
  2. logits: a transformers Llama (used as a plain torch forward, float32) holding the decoded weights, with what
     TensorRT-LLM does at run time emulated: FP8 activations (dynamic per tensor or per token, or static), FP8 KV
     cache (K and V after RoPE rounded to FP8 with their scales), INT4 group scales held in the activation dtype,
     pre_quant_scale multiplying the input, and (PyTorch backend) per-tensor FP8 q/k/v and gate/up requantized to
     their largest scale when loaded. The accuracy gates of toolchain.validate.accuracy judge those logits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import BuildError
from ...ir import IRReader, TensorReader
from ...stage import StageContext
from ...validate.accuracy import LogitsFn, finish_validation

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ATTN_IMPL = "toolchain-fp8-kv"


@dataclass
class Linear:
    """One quantized linear as decoded from the files (HF name, weights (out, in))."""

    kind: str  # "int4" | "fp8"
    dense: torch.Tensor  # float32, code * scale exactly as stored
    scale: torch.Tensor  # float32 as stored: (out, groups) int4, () or (out,) fp8
    codes: torch.Tensor | None = None  # int4 codes / fp8 weight
    pre_quant_scale: torch.Tensor | None = None  # multiplies the input
    input_scale: torch.Tensor | None = None


@dataclass
class Decoded:
    layout: str
    quant_algo: str
    dtype: torch.dtype  # of the unquantized tensors and of the activations at run time
    linears: dict[str, Linear]
    plain: dict[str, torch.Tensor]  # HF names
    hf_config: dict[str, Any]
    kv: dict[int, tuple[float, float]] = field(default_factory=dict)
    group_size: int | None = None


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8 (rows / 2, cols) -> int8 (rows, cols): byte (i, j) holds row 2i in its low nibble and row 2i+1 in
    its high nibble, each a two's-complement 4-bit number."""
    b = packed.view(torch.uint8).to(torch.int32)
    pair = torch.stack([b % 16, b // 16], dim=1)  # (rows/2, 2, cols): low, high
    pair = pair - 16 * (pair > 7).to(torch.int32)
    return pair.reshape(-1, packed.shape[1]).to(torch.int8)


def _int4(codes: torch.Tensor, scale: torch.Tensor) -> Linear:
    groups = scale.shape[1]
    if codes.shape[1] % groups:
        raise BuildError(f"INT4 weight {tuple(codes.shape)} does not split into {groups} groups")
    dense = codes.float().reshape(codes.shape[0], groups, -1) * scale.float()[:, :, None]
    return Linear("int4", dense.reshape(codes.shape), scale.float(), codes=codes)


def _fp8(weight: torch.Tensor, scale: torch.Tensor) -> Linear:
    s = scale.float()
    if s.dim() == 2:  # fp8_pb_wo: one scale per 128x128 block
        from ...quant.fp8 import expand_block_scale

        return Linear("fp8", weight.float() * expand_block_scale(s, weight.shape), s, codes=weight)
    dense = weight.float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
    return Linear("fp8", dense, s, codes=weight)


# -- reading the HF layout -----------------------------------------------------------------------------

def read_hf(directory: Path) -> Decoded:
    hq = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((directory / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "modelopt":
        raise BuildError("config.json has no quantization_config with quant_method 'modelopt'")
    algo = hq["quant_algo"]
    files = TensorReader(directory)
    names = set(files.keys())
    linears: dict[str, Linear] = {}
    plain: dict[str, torch.Tensor] = {}
    kv: dict[int, list[float]] = {}
    suffixes = (".weight_scale", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale")
    for key in sorted(names):
        if key.endswith((".k_scale", ".v_scale")):
            layer = int(key.split(".layers.")[1].split(".")[0])
            kv.setdefault(layer, [1.0, 1.0])[key.endswith(".v_scale")] = float(files.get(key).float())
            continue
        if key.endswith(suffixes):
            continue
        base = key.removesuffix(".weight")
        if not key.endswith(".weight") or f"{base}.weight_scale" not in names:
            plain[key] = files.get(key)
            continue
        w, s = files.get(key), files.get(f"{base}.weight_scale")
        if w.dtype == torch.uint8:
            if algo != "W4A16_AWQ":
                raise BuildError(f"{key}: packed INT4 under quant_algo {algo}")
            lin = _int4(unpack_int4(w), s)
            if lin.codes.shape[1] // s.shape[1] != hq.get("group_size"):
                raise BuildError(f"{key}: groups of {lin.codes.shape[1] // s.shape[1]} columns, "
                                 f"hf_quant_config says {hq.get('group_size')}")
        elif w.dtype == FP8:
            expect = {1: "FP8_PER_CHANNEL_PER_TOKEN", 2: "fp8_pb_wo"}.get(s.dim(), "FP8")
            if algo != expect:
                raise BuildError(f"{key}: FP8 weight with a {tuple(s.shape)} scale under quant_algo {algo}")
            lin = _fp8(w, s)
        else:
            raise BuildError(f"{key}: unexpected {w.dtype} weight beside a weight_scale")
        if f"{base}.pre_quant_scale" in names:
            lin.pre_quant_scale = files.get(f"{base}.pre_quant_scale")
        if f"{base}.input_scale" in names:
            lin.input_scale = files.get(f"{base}.input_scale").float()
        linears[base] = lin
    hf_config = {k: v for k, v in config.items() if k != "quantization_config"}
    dtype = DTYPES[config.get("dtype") or config.get("torch_dtype")]
    return Decoded("modelopt-hf", algo, dtype, linears, plain, hf_config,
                   {i: (k, v) for i, (k, v) in kv.items()}, hq.get("group_size"))


# -- reading the legacy layout ----------------------------------------------------------------------

HF_OF = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj", "mlp.gate": "mlp.up_proj",
         "mlp.proj": "mlp.down_proj"}
ROW_PARALLEL = {"attention.dense", "mlp.proj"}


def read_ckpt(directory: Path) -> Decoded:
    config = json.loads((directory / "config.json").read_text())
    mapping, quant = config["mapping"], config["quantization"]
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    if mapping["world_size"] != tp * pp:
        raise BuildError(f"mapping world_size {mapping['world_size']} != tp_size {tp} x pp_size {pp}")
    n_layers = config["num_hidden_layers"]
    per_stage = n_layers // pp
    ranks = []
    for r in range(tp * pp):
        path = directory / f"rank{r}.safetensors"
        if not path.is_file():
            raise BuildError(f"missing {path.name} (mapping world_size {tp * pp})")
        ranks.append(_load(path))
    hd = config["head_size"]
    q_rows, kv_rows = config["num_attention_heads"] * hd // tp, config["num_key_value_heads"] * hd // tp
    dtype = DTYPES[config["dtype"]]
    linears: dict[str, Linear] = {}
    plain: dict[str, torch.Tensor] = {}
    kv: dict[int, tuple[float, float]] = {}

    def shards(stage: int, name: str) -> list[torch.Tensor]:
        got = [ranks[stage * tp + t].get(name) for t in range(tp)]
        if any(g is None for g in got):
            raise BuildError(f"{name} missing on some rank of pipeline stage {stage}")
        return got

    def same(stage: int, name: str) -> torch.Tensor:
        got = shards(stage, name)
        if any(not torch.equal(g, got[0]) for g in got[1:]):
            raise BuildError(f"{name} differs between tensor-parallel ranks; it must be replicated")
        return got[0]

    plain["model.embed_tokens.weight"] = torch.cat(shards(0, "transformer.vocab_embedding.weight"), 0)
    plain["lm_head.weight"] = torch.cat(shards(pp - 1, "lm_head.weight"), 0)
    plain["model.norm.weight"] = same(pp - 1, "transformer.ln_f.weight")
    for i in range(n_layers):
        stage, local = divmod(i, per_stage)
        t = f"transformer.layers.{local}"
        h = f"model.layers.{i}"
        plain[f"{h}.input_layernorm.weight"] = same(stage, f"{t}.input_layernorm.weight")
        plain[f"{h}.post_attention_layernorm.weight"] = same(stage, f"{t}.post_layernorm.weight")
        if quant.get("kv_cache_quant_algo") == "FP8":
            kv[i] = (float(same(stage, f"{t}.attention.k_cache_scaling_factor")),
                     float(same(stage, f"{t}.attention.v_cache_scaling_factor")))
            both = float(same(stage, f"{t}.attention.kv_cache_scaling_factor"))
            if both != max(kv[i]):
                raise BuildError(f"{t}.attention.kv_cache_scaling_factor {both} != max(k, v) {max(kv[i])}")
            kv[i] = (both, both)  # the runtime uses the shared one for K and V
        # qkv: rank t holds [q_t; k_t; v_t]
        rows = (q_rows, kv_rows, kv_rows)
        for legacy, members, how in [("attention.qkv", ("q_proj", "k_proj", "v_proj"), "column")] + [
                (m, (HF_OF[m].split(".")[1],), "row" if m in ROW_PARALLEL else "column") for m in HF_OF]:
            prefix = "self_attn" if legacy.startswith("attention") else "mlp"
            targets = [f"{h}.{prefix}.{m}" for m in members]
            decoded = _legacy_module(stage, f"{t}.{legacy}", how, rows if len(members) == 3 else None,
                                     quant, shards, same, lambda n, st=stage: n in ranks[st * tp])
            for name, value in zip(targets, decoded, strict=True):
                (plain.__setitem__(f"{name}.weight", value) if isinstance(value, torch.Tensor)
                 else linears.__setitem__(name, value))
    hf_config = _hf_config_of(config)
    return Decoded("tensorrt-llm-checkpoint", quant["quant_algo"], dtype, linears, plain, hf_config, kv,
                   quant.get("group_size"))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _legacy_module(stage: int, name: str, how: str, rows: tuple[int, ...] | None, quant: dict[str, Any],
                   shards, same, has) -> list[Any]:
    """One TensorRT-LLM module reassembled from its rank shards and cut into its HF members: a Linear each, or a
    plain weight each when the module is not quantized (quantization.exclude_modules)."""
    weights = shards(stage, f"{name}.weight")
    members = len(rows) if rows else 1

    def columns(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per rank [m0_r; m1_r; ...] -> [m0, m1, ...] with every rank's rows in order."""
        if rows is None:
            return [torch.cat(parts, 0)]
        per_rank = [torch.split(p, list(rows), 0) for p in parts]
        return [torch.cat([pr[m] for pr in per_rank], 0) for m in range(members)]

    def join(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(parts, 1)] if how == "row" else columns(parts)

    dtype = weights[0].dtype
    if dtype == torch.int8 and has(f"{name}.weights_scaling_factor"):
        codes = join([unpack_int4(w) for w in weights])
        scales = join(shards(stage, f"{name}.weights_scaling_factor"))
        out = [_int4(c, s) for c, s in zip(codes, scales, strict=True)]
        if quant.get("pre_quant_scale"):
            pqs = shards(stage, f"{name}.prequant_scaling_factor")
            full = torch.cat(pqs, 0) if how == "row" else same(stage, f"{name}.prequant_scaling_factor")
            for lin in out:
                lin.pre_quant_scale = full
        return out
    if dtype == FP8:
        w = join(weights)
        if quant["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN":
            s = (join(shards(stage, f"{name}.per_channel_scale")) if how == "column"
                 else [same(stage, f"{name}.per_channel_scale")])
            return [_fp8(a, b) for a, b in zip(w, s, strict=True)]
        s = same(stage, f"{name}.weights_scaling_factor").reshape(())
        out = [_fp8(a, s) for a in w]
        if has(f"{name}.activation_scaling_factor"):
            for lin in out:
                lin.input_scale = same(stage, f"{name}.activation_scaling_factor").float().reshape(())
        return out
    return join(weights)


def _hf_config_of(c: dict[str, Any]) -> dict[str, Any]:
    """A transformers LlamaConfig from the legacy config.json alone (not the IR's): a wrong field here changes the
    logits the gates judge."""
    out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": c["hidden_size"],
           "intermediate_size": c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
           "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
           "head_dim": c["head_size"], "rms_norm_eps": c["norm_epsilon"], "vocab_size": c["vocab_size"],
           "max_position_embeddings": c["max_position_embeddings"], "hidden_act": c["hidden_act"],
           "tie_word_embeddings": False, "attention_bias": c.get("bias", False), "mlp_bias": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": c.get("rotary_base", 10000.0)}}
    if c.get("rotary_scaling"):
        out["rope_parameters"] = {**c["rotary_scaling"], "rope_theta": c.get("rotary_base", 10000.0)}
    return out


# -- conformance with the IR ------------------------------------------------------------------------

def conformance(dec: Decoded, ir_dir: Path) -> dict[str, Any]:
    """Decoded files vs the IR. Weights must be exact; so must everything the IR dictates (norms, embeddings,
    pre_quant_scales, KV scales) once cast to the export dtype. Structural gaps raise BuildError."""
    ir = IRReader(ir_dir)
    worst, worst_name = 0.0, None
    requant_err, requantized = 0.0, []
    non_finite: list[dict[str, str]] = []

    def note(name: str, err: float) -> None:
        nonlocal worst, worst_name
        if not math.isfinite(err):  # _diff: a NaN or inf on either side (shapes were checked)
            non_finite.append({"layer": name, "side": "loaded or IR"})
            err = math.inf
        if err > worst or worst_name is None:
            worst, worst_name = err, name

    missing = sorted(set(ir.layers) - set(dec.linears))
    if missing:
        raise BuildError(f"{len(missing)} quantized layers of the IR are not quantized in the checkpoint, "
                         f"e.g. {missing[0]}")
    extra = sorted(set(dec.linears) - set(ir.layers))
    if extra:
        raise BuildError(f"the checkpoint quantizes {extra[0]}, which the IR keeps in float")
    folded: dict[str, torch.Tensor] = {}  # norm -> the 1 / s the HF layout folds into it
    for name in ir.layers:
        q, lin = ir.layer(name), dec.linears[name]
        ref = q.dequantize(torch.float32)
        if lin.dense.shape != ref.shape:
            raise BuildError(f"{name}: checkpoint weight {tuple(lin.dense.shape)}, IR {tuple(ref.shape)}")
        expect = ref
        if q.type == "float8" and q.scale.numel() == 1 and not torch.equal(lin.scale.reshape(()), q.scale.float()
                                                                              .reshape(())):
            # the legacy layout's shared scale: it must be the group's largest, and the weight requantized to it
            if float(lin.scale) < float(q.scale.float()):
                raise BuildError(f"{name}: shared FP8 scale {float(lin.scale):.6g} is below the IR's "
                                 f"{float(q.scale.float()):.6g} (weights would clip)")
            expect = (ref / lin.scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * lin.scale
            requant_err = max(requant_err, (lin.dense - ref).abs().max().item())
            requantized.append(name)
        note(name, (lin.dense - expect).abs().max().item())
        s = q.extras.get("pre_quant_scale")
        want = None if s is None else (1.0 / s.float())
        if lin.pre_quant_scale is not None:
            target = want if want is not None else torch.ones_like(lin.pre_quant_scale, dtype=torch.float32)
            note(f"{name}.pre_quant_scale", _diff(lin.pre_quant_scale, target.to(lin.pre_quant_scale.dtype)))
        elif want is not None:
            norm = _norm_before(name)
            if norm is None:
                raise BuildError(f"{name}: the IR has a pre_quant_scale the checkpoint lost")
            folded[norm] = want
    for name in ir.plain_names():
        if name.endswith(("self_attn.k_scale", "self_attn.v_scale")):
            continue
        if name not in dec.plain:
            raise BuildError(f"{name} of the IR is missing from the checkpoint")
        t = ir.tensors.get(name).float()
        if name in folded:
            t = t * folded.pop(name)
        note(name, _diff(dec.plain[name], t.to(dec.plain[name].dtype)))
    if folded:
        raise BuildError(f"pre_quant_scale of the IR not found folded into {sorted(folded)[0]}")
    if "lm_head.weight" in dec.plain and "lm_head.weight" not in ir.tensors and "lm_head" not in ir.layers:
        # tied embeddings: the legacy layout writes lm_head out, a copy of the embedding
        emb = ir.tensors.get("model.embed_tokens.weight").float()
        note("lm_head.weight", _diff(dec.plain["lm_head.weight"], emb.to(dec.plain["lm_head.weight"].dtype)))
    if ir.scheme.get("kv_cache") == "fp8":
        n = ir.config["num_hidden_layers"]
        if sorted(dec.kv) != list(range(n)):
            raise BuildError(f"FP8 KV cache: scales for {len(dec.kv)} of {n} layers")
        for i in range(n):
            names = [f"model.layers.{i}.self_attn.{x}_scale" for x in "kv"]
            k, v = (float(ir.tensors.get(x).float()) if x in ir.tensors else 1.0 for x in names)
            if dec.layout != "modelopt-hf":  # the legacy layout: clamped to >= 1, one scale for both
                k = v = max(k, v, 1.0)
            note(f"model.layers.{i} KV-cache scales", max(abs(dec.kv[i][0] - k), abs(dec.kv[i][1] - v)))
    return {"layers_checked": len(ir.layers), "max_abs_err": worst, "worst_layer": worst_name, "tolerance": 0.0,
            "arithmetic": ARITHMETIC.format(dtype=str(dec.dtype).removeprefix("torch.")), "non_finite": non_finite,
            "plain_tensors_checked": len(ir.plain_names()), "requantized_to_shared_scale": len(requantized),
            "requantization_max_abs_err": requant_err}


# The files hold float32 scales (ours, widened exactly) beside INT4 codes / FP8 weights, so the stored weight is the
# exact float32 product on both sides. TensorRT-LLM computes with it in the activation dtype: the INT4 scale rounded
# to it, the product rounded once (runtime_weights emulates that for the logits, the same for any correct file).
ARITHMETIC = ("float32: code * scale exactly as stored (INT4 codes, FP8 weights; float32 scales); TensorRT-LLM then "
              "computes INT4 weights in {dtype}, emulated for the logits")


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    from ...validate.compare import max_abs_diff

    if a.shape != b.shape:
        raise BuildError(f"shape {tuple(a.shape)} where {tuple(b.shape)} was expected")
    return max_abs_diff(a.float(), b.float())


def _norm_before(name: str) -> str | None:
    prefix, _, module = name.rpartition(".layers.")[2].partition(".")
    base = name.split(".layers.")[0] + ".layers." + prefix
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{base}.input_layernorm.weight"
    if module in ("mlp.gate_proj", "mlp.up_proj"):
        return f"{base}.post_attention_layernorm.weight"
    return None


# -- the torch forward --------------------------------------------------------------------------------

def fake_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def runtime_weights(dec: Decoded) -> dict[str, torch.Tensor]:
    """The weights TensorRT-LLM computes with: INT4 group scales rounded to the activation dtype and the product
    code * scale rounded to it (its W4A16 kernels dequantize in the activation dtype); on the HF layout,
    per-tensor FP8 q/k/v and gate/up requantized to their largest scale at load (its fused-GEMM loader)."""
    out = {n: (lin.codes.float().reshape(lin.scale.shape[0], lin.scale.shape[1], -1)
               * lin.scale.to(dec.dtype).float()[:, :, None]).reshape(lin.dense.shape).to(dec.dtype).float()
           if lin.kind == "int4" else lin.dense for n, lin in dec.linears.items()}
    if dec.layout != "modelopt-hf" or dec.quant_algo != "FP8":
        return out
    groups: dict[str, list[str]] = {}
    for n in dec.linears:
        base, _, module = n.rpartition(".")
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(module)
        if key:
            groups.setdefault(f"{base.rpartition('.')[0]}.{key}", []).append(n)
    for members in groups.values():
        s_max = max(float(dec.linears[m].scale) for m in members)
        for m in members:
            lin = dec.linears[m]
            w = (lin.codes.to(dec.dtype) * lin.scale.to(dec.dtype)).to(dec.dtype) / torch.tensor(s_max).to(dec.dtype)
            out[m] = w.to(FP8).float() * s_max
    return out


def build_model(dec: Decoded, emulate: bool = True):
    """A transformers causal LM (float32) holding the decoded weights, with TensorRT-LLM's run-time rounding
    emulated when `emulate`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = dict(dec.hf_config)
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    kv_quant = emulate and bool(dec.kv)
    if kv_quant:
        _register_fp8_kv_attention()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=ATTN_IMPL if kv_quant else "sdpa")
    weights = runtime_weights(dec) if emulate else {n: lin.dense for n, lin in dec.linears.items()}
    state = {k: v.float() for k, v in dec.plain.items()}
    state.update({f"{n}.weight": w for n, w in weights.items()})
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.eval()
    modules = dict(model.named_modules())
    for name, lin in dec.linears.items():
        hook = _input_hook(dec, lin, emulate)
        if hook is not None:
            modules[name].register_forward_pre_hook(hook)
    if kv_quant:
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.toolchain_kv_scales = dec.kv[i]
    return model


def _input_hook(dec: Decoded, lin: Linear, emulate: bool):
    pqs = lin.pre_quant_scale.float() if lin.pre_quant_scale is not None else None
    act = None
    if emulate and lin.kind == "fp8":
        if lin.input_scale is not None:
            act = ("static", lin.input_scale)
        else:
            act = {"FP8_PER_CHANNEL_PER_TOKEN": ("token",), "fp8_pb_wo": ("group",)}.get(dec.quant_algo, ("tensor",))
    if pqs is None and act is None:
        return None

    def hook(_module, args):
        x = args[0]
        if pqs is not None:
            x = x * pqs
        if act is not None:
            if act[0] == "static":
                x = fake_fp8(x, act[1])
            elif act[0] == "group":  # FP8_BLOCK_SCALES: dynamic scales per 1x128 group of each token
                g = x.unflatten(-1, (-1, 128))
                x = fake_fp8(g, (g.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)).flatten(-2)
            else:
                amax = x.abs().amax(dim=-1, keepdim=True) if act[0] == "token" else x.abs().amax()
                x = fake_fp8(x, (amax / FP8_MAX).clamp(min=1e-12))
        return (x, *args[1:])

    return hook


def _register_fp8_kv_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
        k_s, v_s = module.toolchain_kv_scales
        return sdpa_attention_forward(module, query, fake_fp8(key, k_s), fake_fp8(value, v_s), attention_mask,
                                      **kwargs)

    AttentionInterface.register(ATTN_IMPL, fp8_kv_attention)


def logits_fn(model) -> LogitsFn:
    return lambda ids: model(ids.unsqueeze(0)).logits[0]


def describe(dec: Decoded) -> str:
    emulated = ["INT4 scales in " + str(dec.dtype).removeprefix("torch.")] if dec.quant_algo == "W4A16_AWQ" else []
    if dec.quant_algo == "fp8_pb_wo":
        emulated.append("FP8 activations per 1x128 group")
    elif dec.quant_algo.startswith("FP8"):
        emulated.append("FP8 activations " + ("per token" if "PER_TOKEN" in dec.quant_algo else "per tensor"))
    if dec.kv:
        emulated.append("FP8 KV cache")
    return (f"toolchain reader of the {dec.layout} layout + transformers {__import__('transformers').__version__} "
            f"forward (torch {torch.__version__}, float32, cpu; emulating {', '.join(emulated) or 'nothing'})")


# -- the stages -----------------------------------------------------------------------------------------

def _validate(ctx: StageContext, dec: Decoded) -> dict[str, Any]:
    conf = conformance(dec, ctx.inputs["quantize"])
    model = build_model(dec) if "reference" in ctx.inputs else None
    return finish_validation(ctx, describe(dec), conf, logits_fn(model) if model is not None else None)


def run_validate_hf(ctx: StageContext) -> dict[str, Any]:
    return _validate(ctx, read_hf(ctx.inputs["export"]))


def run_validate_ckpt(ctx: StageContext) -> dict[str, Any]:
    return _validate(ctx, read_ckpt(ctx.inputs["export"]))
