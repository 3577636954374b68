"""IR -> an ONNX model for onnxruntime (CPU, CUDA, DirectML...), INT4 weights as com.microsoft MatMulNBits built
from our own codes.

1. The IR's model (our dequantized weights, float32) is exported by torch.onnx (dynamo) with input_ids (1, seq)
   -> logits (1, seq, vocab), seq dynamic; no KV cache (prefill/scoring graph).
2. Every MatMul whose weight initializer is one of our quantized layers (found by its exact bytes, W^T) becomes
   MatMulNBits(A, B, scales, zero_points; K, N, bits=4, block_size=group_size):
     B            uint8 (N, K/block, block/2): q = codes + 8 in [0, 15], element k of a block in byte k//2, low
                  nibble for even k
     scales       float32 (N * K/block,): our scales, exactly (fp16/bf16/fp32 all widen exactly)
     zero_points  uint8 (N * ceil(K/block / 2),): zero + 8, two blocks per byte, low nibble first; absent when
                  symmetric (onnxruntime's default zero point is 8, i.e. our zero 0)
   onnxruntime dequantizes (q - zp) * scale = (codes - zero) * scale: bit-exact with the IR.
Groups must be blocks: group strategy, power-of-two group_size >= 16, no act-order (checked at plan time).
Memory: the float model is materialised once for the export (fine for small models; a 7B needs ~28 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError, MissingToolError
from .spec import DATA_FILE, MODEL_FILE

if TYPE_CHECKING:
    import numpy as np

    from ...ir import QuantizedLinear
    from ...stage import StageContext

OPSET = 18


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise MissingToolError("the onnx target needs onnx, onnxscript and onnxruntime: "
                               "pip install onnx onnxscript onnxruntime") from None
    return onnx


# -- MatMulNBits tensors from our codes ----------------------------------------------------------------------

def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15] along the last axis (even length) -> bytes, element 2i low nibble, 2i+1 high."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype("uint8")


def matmulnbits_tensors(q: QuantizedLinear) -> dict[str, np.ndarray]:
    import numpy as np

    from ...validate.compare import check_finite

    check_finite(f"MatMulNBits layer of shape {q.shape}", "of the IR", scale=q.scale)
    out_f, in_f = q.shape
    block = q.meta.get("group_size")
    if (q.type != "int" or "pre_quant_scale" in q.extras or q.g_idx is not None or not block or in_f % block
            or q.meta.get("bits") != 4 or q.scale.dim() != 2):
        raise BuildError(f"layer {q.shape} {q.meta} is not 4-bit blocks MatMulNBits can hold")
    nb = in_f // block
    codes = (q.codes.numpy().astype(np.int16) + 8).astype(np.uint8).reshape(out_f, nb, block)
    out = {"B": pack_nibbles(codes), "scales": q.scale.float().numpy().reshape(-1).astype(np.float32)}
    if q.zero is not None:
        zp = (q.zero.numpy().astype(np.int16) + 8).astype(np.uint8)  # (out, nb)
        if nb % 2:
            zp = np.concatenate([zp, np.zeros((out_f, 1), np.uint8)], axis=1)
        out["zero_points"] = pack_nibbles(zp).reshape(-1)
    return out


# -- export -------------------------------------------------------------------------------------------------

def dense_model(ir_dir: Path):
    """The IR as a transformers model holding our dequantized weights (float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ...ir import IRReader

    ir = IRReader(ir_dir)
    config = AutoConfig.from_pretrained(ir_dir)
    config.use_cache = False
    # On CPU, not meta: non-persistent buffers (RoPE's inv_freq) are computed at construction.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {n: ir.tensors.get(n).float() for n in ir.plain_names()}
    state.update({f"{n}.weight": ir.layer(n).dequantize() for n in ir.layers})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BuildError(f"ONNX export: IR tensors do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), ir


def export_dense(model, path: Path, max_len: int) -> None:
    """input_ids (1, seq) -> logits (1, seq, vocab), no cache: the graph onnxruntime runs."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.zeros((1, 8), dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=max_len)
    with torch.no_grad():
        torch.onnx.export(Logits(model), (ids,), str(path), dynamo=True, opset_version=OPSET,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {1: seq}}, external_data=True, verbose=False)


def replace_matmuls(model_proto, ir) -> dict[str, int]:
    """Swap each MatMul on one of our quantized weights (found by the sha256 of W^T) for MatMulNBits built from
    our codes."""
    import hashlib

    import numpy as np
    from onnx import helper, numpy_helper

    def digest(a: np.ndarray) -> tuple[tuple[int, ...], bytes]:
        return a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()

    by_bytes = {digest(ir.layer(name).dequantize().numpy().T): name for name in ir.layers}
    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    replaced: dict[str, str] = {}
    new_nodes = []
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = by_bytes.get(digest(numpy_helper.to_array(init))) if init is not None and len(init.dims) == 2 \
            else None
        if name is None:
            new_nodes.append(node)
            continue
        q = ir.layer(name)
        out_f, in_f = q.shape
        prefix = name.replace(".", "_")
        tensors = matmulnbits_tensors(q)
        inputs = [node.input[0]]
        for key in ("B", "scales", "zero_points"):
            if key in tensors:
                graph.initializer.append(numpy_helper.from_array(tensors[key], f"{prefix}.{key}"))
                inputs.append(f"{prefix}.{key}")
        new_nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{prefix}.MatMulNBits",
                                          domain="com.microsoft", K=in_f, N=out_f, bits=4,
                                          block_size=q.meta["group_size"], accuracy_level=0))
        replaced[name] = node.input[1]
    missing = sorted(set(ir.layers) - set(replaced))
    if missing:
        raise BuildError(f"ONNX export: no MatMul found for {len(missing)} quantized layers (e.g. {missing[0]})")
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"matmulnbits": len(replaced)}


def run(ctx: StageContext) -> dict[str, Any]:
    import tempfile

    onnx = _onnx()
    from ...ir import copy_model_metadata

    model, ir = dense_model(ctx.inputs["quantize"])
    if not ir.layers:
        raise BuildError("onnx export needs a quantized model (quantize.method is 'none')")
    max_len = int(ir.config.get("max_position_embeddings", 4096))
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        dense = Path(tmp) / "dense.onnx"
        ctx.reporter.info("  torch.onnx export (dynamo) of the dequantized model")
        export_dense(model, dense, max_len)
        del model
        proto = onnx.load(str(dense))
        counts = replace_matmuls(proto, ir)
        onnx.save_model(proto, str(ctx.out / MODEL_FILE), save_as_external_data=True, location=DATA_FILE,
                        all_tensors_to_one_file=True, size_threshold=1024)
    onnx.checker.check_model(str(ctx.out / MODEL_FILE))
    copy_model_metadata(ir.directory, ctx.out)
    return {"format": "onnx", "file": MODEL_FILE, "opset": OPSET, **counts,
            "block_size": ir.layer_field("group_size"), "inputs": ["input_ids (1, seq) int64"],
            "outputs": ["logits (1, seq, vocab) float32"], "kv_cache": False,
            "note": "MatMulNBits from our codes and scales: bit-exact with the IR in onnxruntime"}
