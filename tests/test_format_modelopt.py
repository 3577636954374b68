"""Conformance with NVIDIA ModelOpt: given the same quantized values, ModelOpt's own exporters
(`export_hf_checkpoint`, `export_tensorrt_llm_checkpoint`) must write what ours write, tensor for tensor, bit for
bit, for every recipe the TensorRT-LLM targets hold, tensor parallel included. ModelOpt runs in its own
interpreter (tests/modelopt_oracle.py), since its [hf] extra pins an older transformers than ours.

Deliberate differences, each explained where it is made (toolchain.formats.trtllm, tests/trtllm_testlib.py):
producer names, the "toolchain" entries, group_size in the inline config, FP8 `dynamic` flags, rotary_base (which
ModelOpt 0.47 loses under transformers 5), and pre_quant_scale=false in a legacy config without such tensors.
With AWQ pre_quant_scales ModelOpt re-derives the q/k/v scales from the weights at export (resmoothing; it
discards the calibrated ones), so there the q/k/v weights and scales are left out and everything else compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trtllm_testlib import (
    MODELOPT_SKIP,
    compare_ckpt_json,
    compare_hf_json,
    compare_tensors,
    export,
    make_ir,
    modelopt_python,
    run_oracle,
)

from toolchain.formats.trtllm import export as trtllm

pytestmark = pytest.mark.skipif(modelopt_python() is None, reason=MODELOPT_SKIP)

RECIPES = {
    "int4": dict(method="rtn", kv=True),
    "int4-pqs": dict(method="rtn", pqs=True),
    "fp8-tensor": dict(method="fp8", strategy="tensor", group_size=None, kv=True),
    "fp8-static": dict(method="fp8", strategy="tensor", group_size=None, input_scale=True, kv=True,
                       calibrated_kv=True),
    "fp8-channel": dict(method="fp8", strategy="channel", group_size=None, kv=True),
}
# (recipe, kind, tp, pp); per-tensor FP8 without static scales has no legacy form (trtllm-build needs them)
CASES = [("int4", "hf", 1, 1), ("int4-pqs", "hf", 1, 1), ("fp8-tensor", "hf", 1, 1), ("fp8-channel", "hf", 1, 1),
         ("int4", "ckpt", 1, 1), ("int4", "ckpt", 2, 1), ("int4", "ckpt", 1, 2), ("int4-pqs", "ckpt", 2, 1),
         ("fp8-static", "ckpt", 1, 1), ("fp8-static", "ckpt", 2, 1), ("fp8-channel", "ckpt", 2, 1)]
PQS_REDERIVED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attention.qkv.weight")


def case_id(case: tuple) -> str:
    recipe, kind, tp, pp = case
    return f"{recipe}-{kind}" + (f"-tp{tp}-pp{pp}" if kind == "ckpt" else "")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    """Our exports and ModelOpt's of the same IRs, in one ModelOpt run."""
    root = tmp_path_factory.mktemp("modelopt")
    jobs = []
    for recipe, kw in RECIPES.items():
        make_ir(root / f"ir-{recipe}", **kw)
    for case in CASES:
        recipe, kind, tp, pp = case
        export(kind, root / f"ir-{recipe}", root / f"ours-{case_id(case)}", tp_size=tp, pp_size=pp)
        jobs.append({"ir": str(root / f"ir-{recipe}"), "kind": kind, "tp": tp, "pp": pp, "dtype": "float16",
                     "out": str(root / f"modelopt-{case_id(case)}")})
    run_oracle(jobs, root)
    return root


def differences(ours: Path, theirs: Path, case: tuple) -> list[str]:
    recipe, kind, _tp, _pp = case
    skip = PQS_REDERIVED if RECIPES[recipe].get("pqs") else ()
    found = compare_tensors(ours, theirs, skip)
    return found + (compare_hf_json(ours, theirs) if kind == "hf" else compare_ckpt_json(ours, theirs))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_checkpoint_as_modelopt(oracle, case):
    ours, theirs = oracle / f"ours-{case_id(case)}", oracle / f"modelopt-{case_id(case)}"
    assert differences(ours, theirs, case) == []
    assert len(list(ours.glob("*.safetensors"))) == len(list(theirs.glob("*.safetensors")))


def _swapped_nibbles(codes):
    n = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return n[1::2] | (n[0::2] << 4)


def _wrap_hf_layer(change):
    orig = trtllm.hf_layer

    def hf_layer(name, q, dtype):
        out, fold = orig(name, q, dtype)
        change(name, out)
        return out, fold
    return hf_layer


def _transpose_o_proj(name, out):
    if name.endswith("o_proj"):
        out["weight"] = out["weight"].T.contiguous()


def _global_qkv_split(parts, how, tp, rank):
    if how == "row":
        return trtllm.split(parts[0], 1, tp, rank)
    return trtllm.split(torch.cat(parts, 0), 0, tp, rank)


BITES = {
    "nibble-order": (("int4", "hf", 1, 1), "pack_int4", _swapped_nibbles),
    "transpose": (("fp8-tensor", "hf", 1, 1), "hf_layer", _wrap_hf_layer(_transpose_o_proj)),
    "scale-convention": (("int4", "hf", 1, 1), "hf_layer",
                         _wrap_hf_layer(lambda n, out: out.__setitem__("weight_scale", out["weight_scale"] * 7.5 / 7))),
    "qkv-order": (("int4", "ckpt", 2, 1), "_split_rows_or_cols", _global_qkv_split),
    "kv-scale": (("fp8-tensor", "hf", 1, 1), "kv_scales", lambda ir, i: (1 / 448, 1 / 448, True)),
}


@pytest.mark.parametrize("which", sorted(BITES))
def test_comparison_catches_corrupted_exports(oracle, tmp_path, monkeypatch, which):
    case, attr, replacement = BITES[which]
    recipe, kind, tp, pp = case
    monkeypatch.setattr(trtllm, attr, replacement)
    export(kind, oracle / f"ir-{recipe}", tmp_path / "bad", tp_size=tp, pp_size=pp)
    monkeypatch.undo()
    found = differences(tmp_path / "bad", oracle / f"modelopt-{case_id(case)}", case)
    assert found, f"corruption {which} went unnoticed"
