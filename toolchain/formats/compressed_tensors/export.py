"""IR -> compressed-tensors checkpoint (vLLM, SGLang, TensorRT-LLM's PyTorch backend, transformers).

The packing is done by the compressed-tensors library itself: each quantized layer becomes a torch Linear
carrying our scale / zero point and a QuantizationScheme, and `compress_module` packs it (pack-quantized INT,
float-quantized FP8). Every layer is then decompressed again by the same library and compared with our own
dequantization, so a packing mismatch fails the export instead of shipping.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ...arch import resolved_ignore
from ...errors import BuildError, MissingToolError
from ...ir import IRReader, QuantizedLinear, ShardWriter, copy_model_metadata
from ...stage import StageContext
from ...validate.compare import WeightComparison


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MissingToolError("the compressed-tensors target needs the compressed-tensors package: "
                               "pip install compressed-tensors") from None
    from compressed_tensors.compressors import compress_module, decompress_module
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    return compress_module, decompress_module, QuantizationArgs, QuantizationConfig, QuantizationScheme, \
        QuantizationStatus


# compressed-tensors decompresses (codes - zero) * scale in the scale's dtype (compressed_tensors/quantization/
# lifecycle/forward.py `dequantize`: dtype defaults to scale.dtype; forward_helpers.py `_dequantize`), and vLLM's
# kernels for these checkpoints hold the scales in the model dtype, which `scale_dtype: auto` makes the same.
ARITHMETIC = "{dtype}: (codes - zero) * scale, one rounding to the scale's dtype, as compressed-tensors decompresses"


def consumer_dtype(q: QuantizedLinear) -> torch.dtype:
    """The dtype compressed-tensors (and a runtime holding the scales as stored) computes this layer's weight in."""
    return q.scale.dtype if q.scale.is_floating_point() else torch.float32


def scheme_for(meta: dict[str, Any], layer_type: str):
    """The compressed-tensors QuantizationScheme that expresses one IR layer, from the layer's own meta."""
    _c, _d, QuantizationArgs, _qc, QuantizationScheme, _s = _ct()
    if layer_type == "float8":
        block = meta["strategy"] == "block"
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=meta["strategy"],
                                   dynamic=False, observer=meta.get("observer", "memoryless_minmax"),
                                   block_structure=meta["block_structure"] if block else None)
        # FP8_BLOCK's activations: dynamic groups of 128 along the input (compressed-tensors quant_scheme.py).
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="group" if block else "token",
                                dynamic=True, group_size=meta.get("act_group_size") if block else None)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    # Our RTN is what llm-compressor calls a memoryless min-max observer; say so as it does.
    args: dict[str, Any] = {"num_bits": meta["bits"], "type": "int", "symmetric": meta["symmetric"],
                            "strategy": meta["strategy"], "dynamic": False,
                            "observer": meta.get("observer", "memoryless_minmax")}
    if meta["strategy"] == "group":
        args["group_size"] = meta["group_size"]
        if meta.get("actorder"):
            args["actorder"] = meta["actorder"]
    acts = None
    if meta.get("activations") == "dynamic-per-token-int8":  # W8A8 INT8 (SmoothQuant): compressed-tensors' W8A8
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args), input_activations=acts)


def compress_layer(q: QuantizedLinear, scheme, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Pack one layer with compressed-tensors; returns its tensors (names relative to the module), on the CPU.
    `device` is where the library computes (a GPU packs a 7B layer in milliseconds; same integer results)."""
    compress_module, _d, _a, _qc, _s, QuantizationStatus = _ct()
    out_f, in_f = q.shape
    lin = torch.nn.Linear(in_f, out_f, bias=False, device="meta")  # no random init: the weight is ours
    lin.weight = torch.nn.Parameter(q.dequantize(torch.float32).to(device), requires_grad=False)
    lin.quantization_scheme = scheme
    lin.quantization_status = QuantizationStatus.FROZEN
    lin.register_parameter("weight_scale", torch.nn.Parameter(q.scale.clone().to(device), requires_grad=False))
    if q.type == "int":
        zero = q.zero if q.zero is not None else torch.zeros_like(q.scale, dtype=torch.int8)
        lin.register_parameter("weight_zero_point", torch.nn.Parameter(zero.clone().to(device), requires_grad=False))
    if q.g_idx is not None:
        lin.register_parameter("weight_g_idx", torch.nn.Parameter(q.g_idx.to(device=device, dtype=torch.int32),
                                                                  requires_grad=False))
    compress_module(lin)
    state = {k: v.cpu() for k, v in lin.state_dict().items()}
    if q.type == "int" and q.zero is None:
        state.pop("weight_zero_point", None)  # symmetric checkpoints carry no zero point
    return state


def decompress_layer(tensors: dict[str, torch.Tensor], scheme, shape: tuple[int, int]) -> torch.Tensor:
    """The dense weight compressed-tensors reconstructs from a layer's stored tensors."""
    _c, decompress_module, _a, _qc, _s, QuantizationStatus = _ct()
    lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
    del lin.weight
    for k, v in tensors.items():
        lin.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))
    lin.quantization_scheme = scheme
    lin.quantization_status = QuantizationStatus.COMPRESSED
    decompress_module(lin)
    return lin.weight.data


def write_quantization_config(out_dir, ir: IRReader, schemes: dict[str, Any]) -> dict[str, Any]:
    """config.json's quantization_config, written by the library's own ModelCompressor (as llm-compressor
    does): one config group per distinct scheme, unquantized linears in `ignore`."""
    from compressed_tensors.compressors import ModelCompressor

    _c, _d, _a, QuantizationConfig, _s, QuantizationStatus = _ct()
    groups: dict[str, Any] = {}
    for sch in schemes.values():
        if not any(g == sch for g in groups.values()):
            groups[f"group_{len(groups)}"] = sch
    formats = {str(getattr(sch.format, "value", sch.format)) for sch in schemes.values()}
    if len(formats) != 1:
        raise BuildError(f"mixed compressed-tensors formats are not supported: {sorted(formats)}")
    # `ignore` as resolved module names: loaders match exact names or re: only (vLLM should_ignore_layer,
    # TensorRT-LLM _matches_target), so the profile's shorthand (a bare `down_proj`) would match nothing there.
    ignore = resolved_ignore(ir.config, ir.scheme.get("ignore", []))
    # Calibrated FP8 KV scales (the IR's self_attn.k_scale / v_scale, written as they are): the kv_cache_scheme
    # llm-compressor writes, which vLLM requires as float8, strategy tensor, symmetric (compressed_tensors.py).
    kv = None
    if any(n.endswith(".self_attn.k_scale") for n in ir.plain_names()):
        kv = _ct()[2](num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    qc = QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.COMPRESSED,
                            format=formats.pop(), ignore=ignore, kv_cache_scheme=kv)
    ModelCompressor(quantization_config=qc).update_config(str(out_dir))
    return json.loads((out_dir / "config.json").read_text())["quantization_config"]


def run(ctx: StageContext) -> dict[str, Any]:
    ir = IRReader(ctx.inputs["quantize"])
    if not ir.layers:
        raise BuildError("compressed-tensors export needs a quantized model (quantize.method is 'none')")
    writer = ShardWriter(ctx.out, prefix="model")
    schemes: dict[str, Any] = {}
    check = WeightComparison(ARITHMETIC.format(dtype=ir.scheme.get("scale_dtype", "float32")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with ctx.reporter.task("export compressed-tensors", total=len(ir.layers) + 1) as task:
        for name in ir.plain_names():
            writer.add(name, ir.tensors.get(name))
        task.advance()
        for name in ir.layers:
            q = ir.layer(name)
            schemes[name] = scheme_for(q.meta, q.type)
            packed = compress_layer(q, schemes[name], device)
            # Read back through the library: what a loader will see must equal what we quantized, computed as
            # the library computes it (in the scale's dtype), bit for bit.
            back = decompress_layer({k: v.to(device) for k, v in packed.items()}, schemes[name], q.shape)
            check.add(name, back, q.dequantize(consumer_dtype(q)).to(device))
            failure = check.failure()
            if failure:
                raise BuildError(f"{name}: compressed-tensors round trip: {failure}")
            for k, v in packed.items():
                writer.add(f"{name}.{k}", v)
            task.advance()
    writer.close(hf_layout=True)
    copy_model_metadata(ir.directory, ctx.out)
    qconfig = write_quantization_config(ctx.out, ir, schemes)
    info = {"format": "compressed-tensors", "layers": len(ir.layers), "roundtrip_max_abs_err": check.max_abs_err,
            "roundtrip_arithmetic": check.arithmetic, "quantization_config": qconfig}
    if ir.scheme.get("kv_cache") == "fp8" and qconfig.get("kv_cache_scheme") is None:
        info["kv_cache"] = ("not written: compressed-tensors' kv_cache_scheme holds calibrated K/V scales and this "
                            "IR has none; add a quantize.calibration section")
        ctx.reporter.info(f"  note: FP8 KV cache {info['kv_cache']}")
    return info
