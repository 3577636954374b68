"""Block-streamed scoring (toolchain.validate.streamed) and export fidelity (toolchain.validate.fidelity), issue 10."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    build_shared_stages,
    needs_smollm2,
    needs_wikitext,
    run_cli,
    smol_profile,
    tiny_profile,
    write_profile,
)

from toolchain.ir import TensorReader
from toolchain.progress import Reporter


def _ppl(logits_fn, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    from toolchain.validate.accuracy import score, windows

    targets = ids[[p for _b, e, f in windows(len(ids), seq_len, stride) for p in range(f, e)]]
    nll, off = 0.0, 0
    for lp in score(logits_fn, ids, seq_len, stride, Reporter(quiet=True), "t"):
        nll -= lp.gather(1, targets[off : off + len(lp), None]).sum().item()
        off += len(lp)
    assert off == len(targets)
    return math.exp(nll / off)


def _source(tmp_path: Path, profile: dict) -> Path:
    return build_shared_stages(profile, tmp_path / "s")["source"]


@needs_smollm2
@needs_wikitext
def test_streamed_equals_whole_model_on_smollm2(tmp_path):
    """SmolLM2's perplexity scored one block at a time equals transformers' whole-model forward (CPU, float32),
    with overlapping windows, to 1e-4 relative."""
    from conftest import WIKITEXT

    from toolchain.validate.accuracy import hf_logits, load_hf_model, streamed_logits_fn, tokenize
    from toolchain.validate.streamed import StreamedModel

    src = _source(tmp_path, smol_profile(validate={}))
    ids, _tok = tokenize(src, WIKITEXT, 768)
    whole = _ppl(hf_logits(load_hf_model(src)), ids, 256, 192)
    model = StreamedModel(json.loads((src / "config.json").read_text()), TensorReader(src).get, "cpu", "auto")
    streamed = _ppl(streamed_logits_fn(model, ids, 256, 192), ids, 256, 192)
    assert model.stats.blocks == 30 and model.stats.dtype == "float32"
    assert abs(streamed / whole - 1) < 1e-4, (streamed, whole)


def test_export_fidelity_is_zero_for_the_ir_and_large_for_a_wrong_file(tmp_path):
    """Same runner, same windows: our IR against itself gives KL exactly 0; a file with one layer's weights off
    by 2x fails the gate, on random weights, where perplexity says nothing."""
    from toolchain.validate.fidelity import MAX_KL, export_fidelity, fidelity_ids, ir_weights

    profile = tiny_profile()
    profile["source"]["synthetic"]["dtype"] = "bfloat16"
    ir_dir = build_shared_stages(profile, tmp_path / "s")["quantize"]
    cfg = json.loads((ir_dir / "config.json").read_text())
    ours = ir_weights(ir_dir)
    ids = fidelity_ids(cfg["vocab_size"], None)
    same = export_fidelity(cfg, ir_weights(ir_dir), ours, ids, "cpu", "auto", torch.bfloat16)
    assert same["passed"] and same["kl_mean"] == 0 and same["max_abs_logit_diff"] == 0, same
    assert same["dtype"] == "bfloat16" and same["device"] == "cpu"

    def wrong(name: str) -> torch.Tensor:
        w = ours(name)
        return w * 2 if name == "model.layers.1.mlp.down_proj.weight" else w

    bad = export_fidelity(cfg, wrong, ours, ids, "cpu", "auto", torch.bfloat16)
    assert not bad["passed"] and bad["kl_mean"] > MAX_KL, bad


def test_bf16_build_reports_fidelity_and_scoring_device(tmp_path):
    """A bf16 synthetic build: the validator measures export fidelity on the profile's device, in the checkpoint's
    dtype, and says so; accuracy gates are skipped (synthetic)."""
    profile = tiny_profile()
    profile["source"]["synthetic"]["dtype"] = "bfloat16"
    profile["validate"] = {"accuracy": {"dataset": str(Path(__file__).resolve().parent.parent / "data" /
                                                        "wikitext-2-raw" / "wiki.test.raw"), "device": "cpu",
                                        "gates": {"max_ppl_increase_pct": 10}}}
    r = run_cli("build", str(write_profile(tmp_path, profile)), "--store", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["reference"]["status"] == "skipped"
    from toolchain.store import Store

    info = json.loads((Store(tmp_path / "s").object_dir(stages["validate:compressed-tensors"]["key"]) /
                       "manifest.json").read_text())["info"]
    fid = info["export_fidelity"]
    assert fid["passed"] and fid["kl_mean"] == 0 and (fid["device"], fid["dtype"]) == ("cpu", "bfloat16"), fid


@pytest.mark.parametrize("bad", [{"device": "tpu"}, {"dtype": "int8"}])
def test_scoring_options_are_checked(cli, tmp_path, bad):
    profile = tiny_profile()
    profile["validate"] = {"accuracy": {"dataset": "x.txt", **bad}}
    r = run_cli("plan", str(write_profile(tmp_path, profile)), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and f"validate.accuracy.{next(iter(bad))}" in r.stderr, r.stderr
