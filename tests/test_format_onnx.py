"""ONNX export: MatMulNBits built from our codes, dequantized by onnxruntime itself, and deliberately corrupted
graphs proven to be caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import have, needs_smollm2, needs_wikitext, smol_profile, tiny_profile, write_profile

pytestmark = pytest.mark.skipif(not (have("onnx") and have("onnxruntime") and have("onnxscript")),
                                reason="onnx target needs: pip install onnx onnxscript onnxruntime")

QUANT = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


def ort_dequantize(tensors: dict, k: int, n: int, block: int) -> np.ndarray:
    """onnxruntime's MatMulNBits on the identity: the W^T it computes with."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    names = [x for x in ("B", "scales", "zero_points") if x in tensors]
    node = helper.make_node("MatMulNBits", ["A", *names], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [k, n])],
                              [numpy_helper.from_array(tensors[x], x) for x in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("symmetric,group,in_f,scale_dtype", [
    (True, 32, 128, torch.float32), (False, 32, 96, torch.float32),  # 3 blocks: odd zero-point row
    (False, 64, 128, torch.bfloat16), (True, 16, 64, torch.float16)])
def test_our_blocks_are_what_onnxruntime_dequantizes(symmetric, group, in_f, scale_dtype):
    from toolchain.formats.onnx.export import matmulnbits_tensors
    from toolchain.quant.rtn import quantize_rtn

    w = torch.randn(48, in_f, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, 4, group, symmetric, "group", scale_dtype)
    t = matmulnbits_tensors(q)
    assert ("zero_points" in t) == (not symmetric)
    assert np.array_equal(ort_dequantize(t, in_f, 48, group), q.dequantize().numpy().T)


def build(cli, tmp_path: Path, targets=("onnx",), quantize=None) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tiny_profile(targets=list(targets), quantize=quantize or QUANT)
    return json.loads(cli("build", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"),
                          "--json").stdout)


def test_tiny_onnx_is_exact(cli, tmp_path):
    doc = build(cli, tmp_path)
    t = doc["targets"][0]
    assert t["status"] == "built", doc["stages"]
    assert t["conformance"]["layers_checked"] == 14 and t["conformance"]["max_abs_err"] == 0
    assert t["conformance"]["wiring"]["max_rel_err"] < 1e-5
    info = json.loads((Path(t["path"]) / "manifest.json").read_text())["info"]
    assert info["matmulnbits"] == 14
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(t["path"]) / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops


def _fails(doc: dict, what: str) -> str:
    export = next(s for s in doc["stages"] if s["name"] == "export:onnx")
    assert export["status"] == "built", export
    t = doc["targets"][0]
    assert t["status"] == "failed", t
    assert what in t["validation"]["reason"], t["validation"]["reason"]
    return t["validation"]["reason"]


def test_nibble_order_bug_caught(cli, tmp_path, monkeypatch):
    import toolchain.formats.onnx.export as O

    monkeypatch.setattr(O, "pack_nibbles", lambda u: (u[..., 1::2] | (u[..., 0::2] << 4)).astype("uint8"))
    _fails(build(cli, tmp_path), "reloaded weights differ")


def test_wrong_scale_or_transpose_caught(cli, tmp_path, monkeypatch):
    import toolchain.formats.onnx.export as O
    from toolchain.ir import QuantizedLinear

    real = O.matmulnbits_tensors

    def transposed(q):
        if q.shape[0] == q.shape[1]:
            q = QuantizedLinear(q.type, q.shape, q.scale, codes=q.codes.t().contiguous(), zero=q.zero, meta=q.meta)
        return real(q)

    monkeypatch.setattr(O, "matmulnbits_tensors", transposed)
    _fails(build(cli, tmp_path / "t"), "reloaded weights differ")
    monkeypatch.setattr(O, "matmulnbits_tensors", lambda q: {**real(q), "scales": real(q)["scales"] * 1.001})
    _fails(build(cli, tmp_path / "s"), "reloaded weights differ")


def test_miswired_layer_caught(cli, tmp_path, monkeypatch):
    """Layer 1's q_proj fed layer 0's normed input (a stale activation, still in topological order): every node
    holds the right weights, only the graph-level logits check can see it."""
    import toolchain.formats.onnx.export as O

    real = O.replace_matmuls

    def miswire(proto, ir):
        counts = real(proto, ir)
        nodes = {n.name: n for n in proto.graph.node}
        q0, q1 = (nodes[f"model_layers_{i}_self_attn_q_proj.MatMulNBits"] for i in (0, 1))
        q1.input[0] = q0.input[0]
        return counts

    monkeypatch.setattr(O, "replace_matmuls", miswire)
    doc = build(cli, tmp_path)
    assert doc["targets"][0]["conformance"]["max_abs_err"] == 0
    _fails(doc, "wired wrong")


def test_plan_refuses_what_matmulnbits_cannot_hold(cli, tmp_path):
    for quantize, text in [({"method": "rtn", "bits": 4, "strategy": "channel"}, "power-of-two"),
                           ({"method": "rtn", "bits": 8, "group_size": 32}, "4-bit"),
                           ({"method": "fp8"}, "cannot hold")]:
        data = tiny_profile(targets=["onnx"], quantize=quantize)
        r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
        assert r.exit_code == 2 and text in r.output, r.output


@needs_smollm2
@needs_wikitext
def test_smollm2_onnx_scores_like_compressed_tensors(smol_store, smol_source, tmp_path):
    """Same codes in two formats and two runtimes (onnxruntime MatMulNBits vs transformers + compressed-tensors):
    the perplexities agree to float32 noise."""
    from conftest import build_json

    profile = write_profile(tmp_path, smol_profile(source=smol_source, targets=["compressed-tensors", "onnx"]))
    doc = build_json(str(profile), "--store", str(smol_store))
    ct, ox = doc["targets"]
    assert {ct["status"], ox["status"]} <= {"built", "cached"}, doc["stages"]
    assert ox["conformance"]["max_abs_err"] == 0
    assert abs(ox["validation"]["ppl"] / ct["validation"]["ppl"] - 1) < 1e-3
