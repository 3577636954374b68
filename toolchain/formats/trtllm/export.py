"""IR -> TensorRT-LLM checkpoints in ModelOpt's two layouts (described in toolchain.formats.trtllm.spec):
`trtllm` (HF names + hf_quant_config.json, the PyTorch backend) and `trtllm-ckpt` (the legacy rank{N}.safetensors
checkpoint that trtllm-build compiles).

What we write is our quantizer's values, never re-derived: FP8 weights as they are, INT4 codes packed two per byte
and our scales in float32 (our symmetric INT4 scale is amax / 7.5 where ModelOpt's is amax / 7; both are just
"the scale" to the loader, which computes code * scale). The exceptions, each forced by the layout and recorded
in the artifact's info:
- legacy FP8 per tensor: q/k/v (and gate/up) share one scale, the largest; members with a smaller one are
  requantized to it, as ModelOpt does;
- AWQ scales the IR keeps as pre_quant_scale s (input x / s) are written as ModelOpt's multiplier 1 / s, and on
  the HF path those of the fused q/k/v and gate/up are folded into the norm before them (TensorRT-LLM's fused
  W4A16 layers read no pre_quant_scale), which needs one s per fused group.
toolchain.formats.trtllm.check reads both layouts back with its own code and checks them against the IR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ...errors import BuildError
from ...ir import IRReader, QuantizedLinear, ShardWriter, copy_model_metadata
from ...stage import StageContext
from .spec import (
    FP8_MAX,
    FUSED_GROUPS,
    GROUP_SIZES,
    LEGACY_FP8_STATIC,
    quant_algo,
    resolve_dtype,
    rope_scaling,
    rope_theta,
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
NORM_OF_GROUP = {FUSED_GROUPS[0]: "input_layernorm", FUSED_GROUPS[1]: "post_attention_layernorm"}
# The plain tensors that carry calibrated KV-cache scales in the IR (amax / 448, float32 scalars), when present.
IR_KV = ("self_attn.k_scale", "self_attn.v_scale")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) signed codes in [-8, 7] -> uint8 (out / 2, in): rows 2i and 2i+1 share a byte, the even row in the
    low nibble (two's complement nibbles). The layout of ModelOpt's W4A16 export and TensorRT-LLM's loader."""
    if codes.shape[0] % 2:
        raise BuildError(f"INT4 packing needs an even number of output rows, got {codes.shape[0]}")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def check_layer(name: str, q: QuantizedLinear) -> None:
    """What the format cannot hold, caught again at export time (the plan checks the recipe)."""
    from ...validate.compare import check_finite

    check_finite(name, "of the IR", scale=q.scale, **q.extras)
    if q.type == "float8":
        return
    problems = []
    if q.meta.get("bits") != 4:
        problems.append(f"{q.meta.get('bits')} bits (the format holds INT4)")
    if q.zero is not None:
        problems.append("a zero point (the format holds symmetric INT4 only)")
    if q.g_idx is not None:
        problems.append("an act-order g_idx")
    if q.meta.get("group_size") not in GROUP_SIZES or q.scale.dim() != 2:
        problems.append(f"group_size {q.meta.get('group_size')} (TensorRT-LLM takes {GROUP_SIZES})")
    if problems:
        raise BuildError(f"{name}: cannot be written for TensorRT-LLM: " + "; ".join(problems))


def kv_scales(ir: IRReader, layer: int) -> tuple[float, float, bool]:
    """(k_scale, v_scale, calibrated) of one layer: the IR's calibrated values (amax / 448) when it has them, else
    1.0. With 1.0, K and V are cast to FP8 unscaled: values up to 448 are representable, and 1.0 is also what
    ModelOpt's TensorRT-LLM export writes for any calibrated amax below 448 (it clamps the scale to >= 1)."""
    names = [f"model.layers.{layer}.{s}" for s in IR_KV]
    if all(n in ir.tensors for n in names):
        k, v = (float(ir.tensors.get(n).float().reshape(())) for n in names)
        return k, v, True
    return 1.0, 1.0, False


def _pqs(q: QuantizedLinear) -> torch.Tensor | None:
    """The IR's AWQ scale s (input x / s) as ModelOpt's pre_quant_scale, which multiplies the input: 1 / s."""
    s = q.extras.get("pre_quant_scale")
    return None if s is None else 1.0 / s.float()


def _toolchain_note(method: str, algo: str) -> dict[str, Any]:
    note = {"method": method, "version": __version__}
    if algo == "W4A16_AWQ" and method != "awq":
        note["note"] = ("quant_algo W4A16_AWQ is TensorRT-LLM's name of the groupwise INT4 weight-only format "
                        "(ModelOpt writes it for INT4_BLOCKWISE_WEIGHT_ONLY_CFG as well, which runs no AWQ search); "
                        f"these weights are {method.upper()}, and every pre_quant_scale is 1")
    return note


def _group_of(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(layer prefix, fused group) of a fused member's name, e.g. model.layers.3.self_attn.k_proj."""
    for group in FUSED_GROUPS:
        for member in group:
            if name.endswith("." + member):
                return name[: -len(member) - 1], group
    return None


# -- trtllm: Hugging Face names + hf_quant_config.json ------------------------------------------------

def export_hf(ir_dir: Path, out: Path, options: dict[str, Any], reporter: Any) -> dict[str, Any]:
    ir = IRReader(ir_dir)
    if not ir.layers:
        raise BuildError("the trtllm target needs a quantized model (quantize.method is 'none')")
    method, strategy = ir.scheme["method"], ir.layer_field("strategy")
    algo = quant_algo(method, strategy)
    dtype_name = resolve_dtype(options.get("dtype", "auto"), ir.scheme["source_dtype"])
    dtype = DTYPES[dtype_name]
    writer = ShardWriter(out, prefix="model")
    norm_fold: dict[str, torch.Tensor] = {}  # norm weight name -> pre_quant_scale folded into it
    identity_pqs = 0
    with reporter.task("export trtllm (ModelOpt HF)", total=len(ir.layers) + 1) as task:
        for name in ir.layers:
            q = ir.layer(name)
            check_layer(name, q)
            tensors, fold = hf_layer(name, q, dtype)
            identity_pqs += int(q.type == "int" and _group_of(name) is None and _pqs(q) is None)
            if fold is not None:
                prefix, group = _group_of(name)
                norm = f"{prefix}.{NORM_OF_GROUP[group]}.weight"
                if norm in norm_fold and not torch.equal(norm_fold[norm], fold):
                    raise BuildError(f"{name}: TensorRT-LLM folds one pre_quant_scale per fused group "
                                     f"({', '.join(group)}) into {norm}; this IR has different ones")
                norm_fold[norm] = fold
            for k, v in tensors.items():
                writer.add(f"{name}.{k}", v)
            task.advance()
        kv = ir.scheme.get("kv_cache") == "fp8"
        calibrated_kv = False
        if kv:
            for i in range(ir.config["num_hidden_layers"]):
                k, v, calibrated_kv = kv_scales(ir, i)
                writer.add(f"model.layers.{i}.self_attn.k_proj.k_scale", torch.tensor(k, dtype=torch.float32))
                writer.add(f"model.layers.{i}.self_attn.v_proj.v_scale", torch.tensor(v, dtype=torch.float32))
        for name in ir.plain_names():
            if name.endswith(IR_KV):
                continue
            t = ir.tensors.get(name)
            if name in norm_fold:
                t = t.float() * norm_fold.pop(name)
            writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        if norm_fold:
            raise BuildError(f"no norm weight {sorted(norm_fold)[0]} to fold the pre_quant_scale into")
        task.advance()
    writer.close(hf_layout=True)
    copy_model_metadata(ir.directory, out)
    exclude = excluded_modules(ir)
    hf_quant = {"producer": {"name": "toolchain", "version": __version__},
                "quantization": quantization_section(ir, algo, exclude),
                "toolchain": _toolchain_note(method, algo)}
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    config = json.loads((out / "config.json").read_text())
    # Both spellings: transformers 5 reads `dtype`; TensorRT-LLM releases on transformers 4 read `torch_dtype`.
    config["dtype"] = config["torch_dtype"] = dtype_name
    config["quantization_config"] = inline_quantization_config(hf_quant, ir)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    info: dict[str, Any] = {"format": "trtllm", "layout": "modelopt-hf", "quant_algo": algo, "method": method,
                            "dtype": dtype_name, "layers": len(ir.layers), "identity_pre_quant_scales": identity_pqs}
    if kv:
        info["kv_cache"] = {"quant_algo": "FP8", "scales": "calibrated" if calibrated_kv else "1.0 (uncalibrated)"}
    return info


def hf_layer(name: str, q: QuantizedLinear, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Any]:
    """One linear's tensors under ModelOpt's HF suffixes, and the pre_quant_scale to fold into its norm (or None)."""
    if q.type == "float8":
        per_tensor = q.scale.numel() == 1
        out = {"weight": q.weight_fp8,
               "weight_scale": q.scale.float().reshape(()) if per_tensor else q.scale.float().reshape(-1)}
        if q.meta.get("strategy") == "block":  # (out/128, in/128), as ModelOpt writes fp8_pb_wo
            out["weight_scale"] = q.scale.float()
        if "input_scale" in q.extras:
            out["input_scale"] = q.extras["input_scale"].float().reshape(())
        return out, None
    out = {"weight": pack_int4(q.codes), "weight_scale": q.scale.float()}
    pqs = _pqs(q)
    if _group_of(name) is not None:
        return out, pqs  # fused: TensorRT-LLM reads no pre_quant_scale here; it goes into the norm
    # TensorRT-LLM's W4A16 loader reads a pre_quant_scale on every unfused layer (o_proj, down_proj): identity
    # when the IR has none.
    out["pre_quant_scale"] = (pqs if pqs is not None else torch.ones(q.shape[1])).to(dtype)
    return out, None


def excluded_modules(ir: IRReader) -> list[str]:
    """HF names of the linears left unquantized, plus the embedding (as ModelOpt lists it)."""
    from ...arch import linear_shapes

    names = {n for n, _o, _i in linear_shapes(ir.config)} - set(ir.layers)
    return sorted(names | {"model.embed_tokens"})


def quantization_section(ir: IRReader, algo: str, exclude: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"quant_algo": algo,
                           "kv_cache_quant_algo": "FP8" if ir.scheme.get("kv_cache") == "fp8" else None}
    if algo == "W4A16_AWQ":
        out.update(group_size=ir.layer_field("group_size"), has_zero_point=False, pre_quant_scale=True)
    out["exclude_modules"] = exclude
    return out


def inline_quantization_config(hf_quant: dict[str, Any], ir: IRReader) -> dict[str, Any]:
    """config.json's quantization_config, in the shape ModelOpt's convert_hf_quant_config_format gives it. Two
    deliberate differences: FP8 input_activations say `dynamic: true` when there is no input_scale (ModelOpt always
    says false), and W4A16 carries group_size (without it TensorRT-LLM warns that the inline config diverges)."""
    q = hf_quant["quantization"]
    out: dict[str, Any] = {}
    if q["quant_algo"] == "FP8":
        static = any("input_scale" in ir.layer(n).extras for n in list(ir.layers)[:1])
        out["config_groups"] = {"group_0": {
            "input_activations": {"dynamic": not static, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}
    out["ignore"] = q["exclude_modules"]
    out["quant_algo"] = q["quant_algo"]
    if q["quant_algo"] == "W4A16_AWQ":
        out["group_size"] = q["group_size"]
    if q["kv_cache_quant_algo"] == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf_quant["producer"]
    out["quant_method"] = "modelopt"
    out["toolchain"] = hf_quant["toolchain"]
    return out


def run_hf(ctx: StageContext) -> dict[str, Any]:
    return export_hf(ctx.inputs["quantize"], ctx.out, ctx.config["options"], ctx.reporter)


# -- trtllm-ckpt: the legacy checkpoint of trtllm-build ----------------------------------------------

# HF module (relative to model.layers.N) -> (TensorRT-LLM module, how tensor parallelism splits it)
LEGACY_NAMES = {
    "self_attn.o_proj": ("attention.dense", "row"),
    "mlp.gate_proj": ("mlp.fc", "column"),  # the activated half of the gated MLP
    "mlp.up_proj": ("mlp.gate", "column"),
    "mlp.down_proj": ("mlp.proj", "row"),
}


class SafetensorsStream:
    """Writes one .safetensors file with memory bounded by one tensor: data goes to a side file as it comes, and
    close() writes the header (8-byte length, JSON, space padding to 8 bytes) followed by that data."""

    CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", FP8: "F8_E4M3",
             torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, Any] = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.header:
            raise BuildError(f"tensor {name} written twice to {self.path.name}")
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.header[name] = {"dtype": self.CODES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self.data.write(raw)
        self.offset += len(raw)

    def close(self) -> None:
        self.data.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as f, open(self.data_path, "rb") as d:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            while chunk := d.read(8 << 20):
                f.write(chunk)
        os.remove(self.data_path)


def split(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim)[rank].contiguous() if tp > 1 else t


def legacy_fp8_group(qs: list[QuantizedLinear]) -> tuple[list[torch.Tensor], torch.Tensor, list[bool]]:
    """Per-tensor FP8 linears that TensorRT-LLM's legacy layout gives one scale: the largest. A member with a
    smaller scale is requantized to it, w / s_max rounded to FP8 (what ModelOpt's export does). Returns the
    weights, s_max (1,) and which members were requantized."""
    s_max = torch.stack([q.scale.float().reshape(()) for q in qs]).max().reshape(1)
    weights, changed = [], []
    for q in qs:
        same = torch.equal(q.scale.float().reshape(1), s_max)
        weights.append(q.weight_fp8 if same else (q.dequantize(torch.float32) / s_max).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        changed.append(not same)
    return weights, s_max, changed


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def legacy_layer_tensors(layer: dict[str, QuantizedLinear], prefix: str, tp: int, rank: int, pqs_mode: bool,
                         dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The quantized tensors of one decoder layer for one tensor-parallel rank, in TensorRT-LLM's names. `layer`
    maps "self_attn.q_proj" etc. to the IR's quantized linears. Also returns the members requantized to a shared
    FP8 scale."""
    out: dict[str, torch.Tensor] = {}
    modules = [("attention.qkv", QKV, "column")] + [(legacy, (hf,), how) for hf, (legacy, how) in LEGACY_NAMES.items()]
    modules = [(legacy, members, how) for legacy, members, how in modules if all(m in layer for m in members)]
    shared: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    requantized: list[str] = []
    if any(q.type == "float8" and q.scale.numel() == 1 for q in layer.values()):
        # gate and up are separate tensors (fc, gate) but TensorRT-LLM fuses them: they share a scale too.
        for family in (QKV, GATE_UP, ("self_attn.o_proj",), ("mlp.down_proj",)):
            qs = [layer[m] for m in family if m in layer]
            if not qs:
                continue
            weights, s_max, changed = legacy_fp8_group(qs)
            act = None
            if all("input_scale" in q.extras for q in qs):
                act = torch.stack([q.extras["input_scale"].float().reshape(()) for q in qs]).max().reshape(1)
            for m, wgt, ch in zip(family, weights, changed, strict=True):
                shared[m] = (wgt, s_max, act)
                if ch:
                    requantized.append(m)
    for legacy, members, how in modules:
        qs = [layer[m] for m in members]
        name = f"{prefix}.{legacy}"
        if members[0] in shared:
            out[f"{name}.weight"] = _split_rows_or_cols([shared[m][0] for m in members], how, tp, rank)
            out[f"{name}.weights_scaling_factor"] = shared[members[0]][1]
            if shared[members[0]][2] is not None:
                out[f"{name}.activation_scaling_factor"] = shared[members[0]][2]
        elif qs[0].type == "float8":  # per channel: the scales follow the rows
            out[f"{name}.weight"] = _split_rows_or_cols([q.weight_fp8 for q in qs], how, tp, rank)
            scales = [q.scale.float().reshape(-1) for q in qs]
            out[f"{name}.per_channel_scale"] = (torch.cat([split(s, 0, tp, rank) for s in scales]) if how == "column"
                                                else scales[0])
        else:
            codes = _split_rows_or_cols([q.codes for q in qs], how, tp, rank)
            out[f"{name}.weight"] = pack_int4(codes).view(torch.int8)
            out[f"{name}.weights_scaling_factor"] = _split_rows_or_cols([q.scale.float() for q in qs], how, tp, rank)
            if pqs_mode:
                pqs = [p if (p := _pqs(q)) is not None else torch.ones(q.shape[1]) for q in qs]
                if any(not torch.equal(p, pqs[0]) for p in pqs[1:]):
                    raise BuildError(f"{name}: one prequant_scaling_factor per fused module; the IR's differ")
                pqs_r = split(pqs[0], 0, tp, rank) if how == "row" else pqs[0]
                out[f"{name}.prequant_scaling_factor"] = pqs_r.to(dtype)
    return out, requantized


def _split_rows_or_cols(parts: list[torch.Tensor], how: str, tp: int, rank: int) -> torch.Tensor:
    """Column parallel: each rank takes its slice of every member's rows ([q_r; k_r; v_r] for qkv); row parallel
    (one member): its slice of the input columns."""
    if how == "row":
        return split(parts[0], 1, tp, rank)
    return torch.cat([split(p, 0, tp, rank) for p in parts], 0)


def legacy_config(ir: IRReader, algo: str, dtype_name: str, tp: int, pp: int, pqs_mode: bool) -> dict[str, Any]:
    c = ir.config
    heads = c["num_attention_heads"]
    quant: dict[str, Any] = {"quant_algo": algo,
                             "kv_cache_quant_algo": "FP8" if ir.scheme.get("kv_cache") == "fp8" else None}
    if algo == "W4A16_AWQ":
        quant.update(group_size=ir.layer_field("group_size"), has_zero_point=False, pre_quant_scale=pqs_mode)
    from ...arch import linear_shapes

    skipped = sorted({n for n, _o, _i in linear_shapes(c)} - set(ir.layers) - {"lm_head"})
    quant["exclude_modules"] = ["lm_head"] + [legacy_name(n) for n in skipped]
    config = {
        "producer": {"name": "toolchain", "version": __version__},
        "architecture": "LlamaForCausalLM", "dtype": dtype_name,
        "logits_dtype": "float16" if dtype_name == "bfloat16" else dtype_name,  # as ModelOpt writes it
        "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_key_value_heads", heads), "hidden_size": c["hidden_size"],
        "norm_epsilon": c.get("rms_norm_eps", 1e-6), "vocab_size": c["vocab_size"],
        "max_position_embeddings": c.get("max_position_embeddings", 2048), "hidden_act": c.get("hidden_act", "silu"),
        "use_parallel_embedding": True, "embedding_sharding_dim": 0,
        "head_size": c.get("head_dim") or c["hidden_size"] // heads, "intermediate_size": c["intermediate_size"],
        "position_embedding_type": "rope_gpt_neox", "share_embedding_table": False, "residual_mlp": False,
        "bias": False, "rotary_pct": 1.0, "rank": 0, "decoder": "llama", "rmsnorm": True, "lm_head_bias": False,
        # ModelOpt 0.47 under transformers 5 loses rope_theta (now under rope_parameters): always write it.
        "rotary_base": rope_theta(c),
    }
    if rope_scaling(c):
        config["rotary_scaling"] = rope_scaling(c)
    config["mapping"] = {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    config["quantization"] = quant
    config["toolchain"] = _toolchain_note(ir.scheme["method"], algo)
    return config


def legacy_name(hf_name: str) -> str:
    """model.layers.3.mlp.down_proj -> transformer.layers.3.mlp.proj (q/k/v -> attention.qkv)."""
    prefix, _, rel = hf_name.partition(".layers.")
    idx, _, module = rel.partition(".")
    if module.startswith("self_attn.") and module.endswith(("q_proj", "k_proj", "v_proj")):
        return f"transformer.layers.{idx}.attention.qkv"
    return f"transformer.layers.{idx}.{LEGACY_NAMES[module][0]}"


def export_ckpt(ir_dir: Path, out: Path, options: dict[str, Any], reporter: Any) -> dict[str, Any]:
    ir = IRReader(ir_dir)
    if not ir.layers:
        raise BuildError("the trtllm-ckpt target needs a quantized model (quantize.method is 'none')")
    method, strategy = ir.scheme["method"], ir.layer_field("strategy")
    algo = quant_algo(method, strategy)
    tp, pp = options.get("tp_size", 1), options.get("pp_size", 1)
    dtype_name = resolve_dtype(options.get("dtype", "auto"), ir.scheme["source_dtype"])
    dtype = DTYPES[dtype_name]
    c = ir.config
    n_layers = c["num_hidden_layers"]
    per_stage = n_layers // pp
    pqs_mode = any("pre_quant_scale" in ir.layer(n).extras for n in ir.layers)
    kv = ir.scheme.get("kv_cache") == "fp8"
    writers = [SafetensorsStream(out / f"rank{r}.safetensors") for r in range(tp * pp)]
    requantized: list[str] = []
    calibrated_kv = False

    def plain(name: str) -> torch.Tensor:
        return ir.tensors.get(name).to(dtype)

    with reporter.task("export trtllm-ckpt", total=n_layers + 2) as task:
        embed = plain("model.embed_tokens.weight")
        head = plain("lm_head.weight") if "lm_head.weight" in ir.tensors else embed
        for r in range(tp):
            writers[r].add("transformer.vocab_embedding.weight", split(embed, 0, tp, r))
            last = writers[(pp - 1) * tp + r]
            last.add("lm_head.weight", split(head, 0, tp, r))
            last.add("transformer.ln_f.weight", plain("model.norm.weight"))
        del embed, head
        task.advance()
        for i in range(n_layers):
            p = f"model.layers.{i}"
            stage, local = divmod(i, per_stage)
            layer = {n[len(p) + 1:]: ir.layer(n) for n in ir.layers if n.startswith(p + ".")}
            for name, q in layer.items():
                check_layer(f"{p}.{name}", q)
                if q.type == "float8" and q.scale.numel() == 1 and "input_scale" not in q.extras:
                    raise BuildError(LEGACY_FP8_STATIC.removeprefix("targets: "))
            for fused in FUSED_GROUPS:
                inside = [m for m in fused if m in layer]
                if inside and len(inside) != len(fused):
                    raise BuildError(f"{p}: {', '.join(fused)} are one fused module in TensorRT-LLM; the IR "
                                     f"quantizes only {', '.join(inside)}")
            for r in range(tp):
                prefix = f"transformer.layers.{local}"
                w = writers[stage * tp + r]
                tensors, req = legacy_layer_tensors(layer, prefix, tp, r, pqs_mode, dtype)
                if r == 0:
                    requantized += [f"{p}.{m}" for m in req]
                for k, v in tensors.items():
                    w.add(k, v)
                _legacy_plain_linears(ir, p, prefix, layer, dtype, tp, r, w)
                w.add(f"{prefix}.input_layernorm.weight", plain(f"{p}.input_layernorm.weight"))
                w.add(f"{prefix}.post_layernorm.weight", plain(f"{p}.post_attention_layernorm.weight"))
                if kv:
                    k_s, v_s, calibrated_kv = kv_scales(ir, i)
                    # ModelOpt's legacy export clamps these to >= 1 and adds the max of the two.
                    k_s, v_s = max(k_s, 1.0), max(v_s, 1.0)
                    w.add(f"{prefix}.attention.k_cache_scaling_factor", torch.tensor([k_s]))
                    w.add(f"{prefix}.attention.v_cache_scaling_factor", torch.tensor([v_s]))
                    w.add(f"{prefix}.attention.kv_cache_scaling_factor", torch.tensor([max(k_s, v_s)]))
            task.advance()
        for w in writers:
            w.close()
        task.advance()
    config = legacy_config(ir, algo, dtype_name, tp, pp, pqs_mode)
    copy_model_metadata(ir.directory, out)  # tokenizer files, for the runtime; config.json is replaced
    (out / "config.json").write_text(json.dumps(config, indent=4))
    info: dict[str, Any] = {"format": "trtllm-ckpt", "layout": "tensorrt-llm-checkpoint", "quant_algo": algo,
                            "method": method, "dtype": dtype_name, "mapping": config["mapping"],
                            "layers": len(ir.layers), "requantized_to_shared_scale": requantized}
    if kv:
        info["kv_cache"] = {"quant_algo": "FP8", "scales": "calibrated" if calibrated_kv else "1.0 (uncalibrated)"}
    return info


def _legacy_plain_linears(ir: IRReader, p: str, prefix: str, layer: dict[str, QuantizedLinear],
                          dtype: torch.dtype, tp: int, rank: int, w: SafetensorsStream) -> None:
    """Linears the recipe leaves unquantized (quantize.ignore), split like their quantized kin."""
    if not any(m in layer for m in QKV):
        parts = [ir.tensors.get(f"{p}.{m}.weight").to(dtype) for m in QKV]
        w.add(f"{prefix}.attention.qkv.weight", _split_rows_or_cols(parts, "column", tp, rank))
    for hf, (legacy, how) in LEGACY_NAMES.items():
        if hf not in layer:
            t = ir.tensors.get(f"{p}.{hf}.weight").to(dtype)
            w.add(f"{prefix}.{legacy}.weight", _split_rows_or_cols([t], how, tp, rank))


def run_ckpt(ctx: StageContext) -> dict[str, Any]:
    return export_ckpt(ctx.inputs["quantize"], ctx.out, ctx.config["options"], ctx.reporter)
