"""The real model end to end: SmolLM2-135M from its GGUF, INT4 and FP8, reloaded by transformers and scored
against the fp32 reference. A short protocol (1,024 tokens) keeps these to a minute or two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT, needs_smollm2, needs_wikitext, run_cli, smol_profile, write_profile

from toolchain.store import Store

pytestmark = [needs_smollm2, needs_wikitext]


def build(tmp_path: Path, store: Path, **overrides) -> tuple[int, dict]:
    profile = write_profile(tmp_path, smol_profile(**overrides))
    r = run_cli("build", str(profile), "--store", str(store), "--json")
    return r.returncode, json.loads(r.stdout)


def test_int4_build_reports_protocol_and_metrics(tmp_path, smol_store):
    code, doc = build(tmp_path, smol_store)
    assert code == 0, doc
    target = doc["targets"][0]
    assert target["status"] in ("built", "cached")
    v = target["validation"]
    assert v["dataset"] == str(WIKITEXT) and v["seq_len"] == 256 and v["stride"] == 256
    assert v["tokens"] == 4 * 255  # 4 windows of 256 tokens, each scoring 255
    assert "TokenizersBackend" in v["tokenizer"] and v["runtime"].startswith("transformers")
    # The GGUF's own weights are 4-bit g32, so g64 RTN on top costs something but not everything.
    assert 10 < v["reference_ppl"] < 60
    assert 0 < v["ppl_increase_pct"] < 100
    assert 0 < v["kl_mean"] < 1 and 0.5 < v["top1_agreement"] < 1
    assert target["conformance"]["max_abs_err"] == 0 and target["conformance"]["layers_checked"] == 210
    # The converted source keeps the GGUF's special tokens (transformers' converter alone swaps eos for bos).
    tok_cfg = json.loads((Store(smol_store).object_dir(doc["stages"][0]["key"]) / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["bos_token"] == "<|im_start|>"


def test_fp8_is_closer_to_the_reference_than_int4(tmp_path, smol_store):
    _, int4 = build(tmp_path, smol_store)
    code, fp8 = build(tmp_path, smol_store, quantize={"method": "fp8"})
    assert code == 0, fp8
    # The reference is shared (same source, same protocol): built once, cached for the second recipe.
    ref = [s for s in fp8["stages"] if s["name"] == "reference"][0]
    assert ref["status"] == "cached"
    a, b = int4["targets"][0]["validation"], fp8["targets"][0]["validation"]
    assert a["reference_ppl"] == b["reference_ppl"]
    assert b["kl_mean"] < a["kl_mean"] and b["ppl_increase_pct"] < a["ppl_increase_pct"]


def test_failed_gate_exits_1_and_marks_the_artifact_failed(tmp_path, smol_store):
    acc = {"dataset": str(WIKITEXT), "seq_len": 256, "max_tokens": 1024, "gates": {"max_ppl_increase_pct": 0.01}}
    code, doc = build(tmp_path, smol_store, validate={"accuracy": acc})
    assert code == 1
    assert doc["targets"][0]["status"] == "failed"
    val = [s for s in doc["stages"] if s["name"].startswith("validate:")][0]
    assert val["status"] == "failed" and "gate failed: perplexity" in val["reason"]
    assert Store(smol_store).manifest(val["key"])["status"] == "failed"
    code, again = build(tmp_path, smol_store, validate={"accuracy": acc})
    assert code == 1 and again["targets"][0]["status"] == "failed", "a cached failure stays a failure"


def test_topk_kl_is_a_tight_lower_bound_of_the_full_kl(tmp_path, smol_store):
    """The reference keeps only its top-1024 log-probs; check that KL against the exact full-vocabulary KL."""
    from toolchain.validate.accuracy import full_kl, load_hf_model, topk_kl

    code, doc = build(tmp_path, smol_store)
    assert code == 0
    source = Store(smol_store).object_dir(doc["stages"][0]["key"])
    ref_model, q_model = load_hf_model(source), load_hf_model(Path(doc["targets"][0]["path"]))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(WIKITEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.inference_mode():
        p = torch.log_softmax(ref_model(ids).logits[0].float(), -1)
        q = torch.log_softmax(q_model(ids).logits[0].float(), -1)
    v, i = p.topk(1024, -1)
    exact = full_kl(p, q)
    assert (topk_kl(v, i, q) <= exact + 1e-5).all(), "lumping the tail can only lower KL"
    stored = topk_kl(v.half().float(), i, q)  # as the reference artifact keeps them: float16
    assert stored.mean().item() == pytest.approx(exact.mean().item(), rel=0.06)
