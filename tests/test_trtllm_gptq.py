"""GPTQ for TensorRT-LLM: with static groups (act-order sweeps, groups in column order, no g_idx) a GPTQ result is
the groupwise symmetric INT4 the trtllm targets already write (W4A16_AWQ). Built end to end on a tiny llama, read
back by the validator, and compared tensor for tensor with ModelOpt's own exporter given the same GPTQ values."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_json, tiny_profile, write_profile
from trtllm_testlib import (
    MODELOPT_SKIP,
    compare_ckpt_json,
    compare_hf_json,
    compare_tensors,
    modelopt_python,
    run_oracle,
)

from toolchain.ir import IRReader
from toolchain.store import Store

GPTQ = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True, "act_order": True, "static_groups": True,
        "calibration": {"dataset": "random", "samples": 4, "seq_len": 32}, "device": "cpu"}


@pytest.fixture(scope="module")
def gptq_build(tmp_path_factory) -> tuple[dict, Store, Path]:
    tmp = tmp_path_factory.mktemp("gptq-trtllm")
    store = Store(tmp / "store")
    # bf16 scales: ModelOpt's scale is amax / 7 in float32, which reaches every bf16 value (not every float32 one)
    data = tiny_profile(source={"synthetic": {"arch": "llama-tiny", "seed": 0, "dtype": "bfloat16"}}, quantize=GPTQ,
                        targets=["trtllm", "trtllm-ckpt"])
    doc = build_json(str(write_profile(tmp, data)), "--store", str(store.root))
    assert [t["status"] for t in doc["targets"]] == ["built", "built"], doc
    return doc, store, tmp


def test_gptq_builds_and_reloads_exactly(gptq_build):
    doc, store, _ = gptq_build
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    assert ir.scheme["method"] == "gptq" and not any(f"{n}.g_idx" in ir.tensors for n in ir.layers)
    for stage in doc["stages"]:
        if stage["name"].startswith("validate:"):
            info = store.manifest(stage["key"])["info"]
            assert info["conformance"]["max_abs_err"] == 0, (stage["name"], info["conformance"])
        if stage["name"] == "export:trtllm":
            info = store.manifest(stage["key"])["info"]
            assert info["quant_algo"] == "W4A16_AWQ" and info["method"] == "gptq"


@pytest.mark.skipif(modelopt_python() is None, reason=MODELOPT_SKIP)
def test_same_checkpoints_as_modelopt(gptq_build):
    doc, store, tmp = gptq_build
    ir = store.object_dir(doc["stages"][1]["key"])
    jobs = [{"ir": str(ir), "kind": "hf", "out": str(tmp / "mo-hf"), "dtype": "bfloat16"},
            {"ir": str(ir), "kind": "ckpt", "out": str(tmp / "mo-ckpt"), "dtype": "bfloat16", "tp": 1, "pp": 1}]
    run_oracle(jobs, tmp)
    ours = {t["name"]: Path(t["path"]) for t in doc["targets"]}
    hf, ckpt = ours["trtllm"], ours["trtllm-ckpt"]
    assert compare_tensors(hf, tmp / "mo-hf") == [] and compare_hf_json(hf, tmp / "mo-hf") == []
    assert compare_tensors(ckpt, tmp / "mo-ckpt") == [] and compare_ckpt_json(ckpt, tmp / "mo-ckpt") == []
