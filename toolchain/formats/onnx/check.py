"""Validate an ONNX artifact with onnxruntime:
  conformance  every MatMulNBits node, run alone by onnxruntime on the identity matrix, must give back our
               dequantized weight (W^T) exactly: the runtime's own dequantization of our packing
  wiring       the whole graph's logits on a probe sequence vs transformers running our dequantized weights
               (float32 noise only; a swapped or misplaced layer shows up here)
  accuracy     logits scored against the cached reference (finish_validation)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...ir import IRReader
from ...stage import StageContext
from ...validate.accuracy import finish_validation
from ...validate.compare import WeightComparison
from .spec import MODEL_FILE

# The model is float32 with float32 scales (ours widened exactly): MatMulNBits computes (q - zp) * scale in float32,
# as our dequantization does, so the weights it uses must equal ours bit for bit.
ARITHMETIC = "float32: (codes - zero) * scale in onnxruntime's MatMulNBits (float32 model, scales widened exactly)"
WIRING_RTOL = 1e-3  # max |logit difference| / max |logit|: float32 reassociation, far below any wiring error


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def node_weights(model_path: Path, ir: IRReader) -> dict[str, Any]:
    """Run each MatMulNBits node alone on A = I (K x K): onnxruntime returns its dequantized W^T."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model_path))
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    check = WeightComparison(ARITHMETIC)
    for name in ir.layers:
        node = nodes.get(name.replace(".", "_") + ".MatMulNBits")
        if node is None:
            return {"layers_checked": check.layers_checked, "max_abs_err": float("inf"), "worst_layer": name,
                    "tolerance": 0.0, "missing": name, "arithmetic": ARITHMETIC}
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        single = helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"], domain="com.microsoft", **attrs)
        graph = helper.make_graph(
            [single], "one", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [k, n])],
            [numpy_helper.from_array(numpy_helper.to_array(inits[i], base_dir=str(model_path.parent)), i)
             for i in node.input[1:] if i])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
        import onnxruntime as ort

        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        wt = s.run(None, {"A": np.eye(k, dtype=np.float32)})[0]
        check.add(name, torch.from_numpy(wt), ir.layer(name).dequantize().T)
    return check.result(compared_to="our dequantized weights, via onnxruntime's MatMulNBits on the identity")


def ort_logits(sess):
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"input_ids": ids[None].numpy().astype(np.int64)})[0][0])

    return fn


def wiring_check(sess, ir_dir: Path) -> dict[str, Any]:
    from .export import dense_model

    model, ir = dense_model(ir_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ir.config["vocab_size"], (48,), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=False).logits[0]
    got = ort_logits(sess)(ids)
    rel = float((got - ref).abs().max() / ref.abs().max())
    return {"tokens": len(ids), "max_rel_err": rel, "tolerance": WIRING_RTOL,
            "compared_to": "transformers on our dequantized weights (float32)"}


def run_validate(ctx: StageContext) -> dict[str, Any]:
    import onnxruntime as ort

    export = ctx.inputs["export"]
    ir = IRReader(ctx.inputs["quantize"])
    conformance = node_weights(export / MODEL_FILE, ir)
    sess = session(export / MODEL_FILE)
    wiring = wiring_check(sess, ctx.inputs["quantize"])
    conformance["wiring"] = wiring
    if conformance["max_abs_err"] == 0 and not wiring["max_rel_err"] <= wiring["tolerance"]:  # NaN fails too
        return {"format": ctx.config["format"], "conformance": conformance, "passed": False, "status": "failed",
                "reason": f"ONNX graph logits differ from our weights' (relative {wiring['max_rel_err']:.3g}): "
                          "a layer is wired wrong"}
    return finish_validation(ctx, f"onnxruntime {ort.__version__} (CPUExecutionProvider, float32)", conformance,
                             ort_logits(sess))
