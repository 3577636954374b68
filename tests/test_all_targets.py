"""profiles/smollm2-all-targets.yaml: one quantize stage feeds every exporter that can run here."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, WIKITEXT, needs_smollm2, needs_wikitext, run_cli, write_profile

PROFILE = str(REPO / "profiles" / "smollm2-all-targets.yaml")
pytestmark = [needs_smollm2, needs_wikitext]


def test_plan_shows_one_quantize_feeding_every_exporter(tmp_path):
    r = run_cli("plan", PROFILE, "--store", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)["stages"]
    quantize = [s for s in stages if s["name"] == "quantize"]
    assert len(quantize) == 1
    exports = [s for s in stages if s["name"].startswith("export:")]
    assert {s["name"] for s in exports} == {f"export:{t}" for t in (
        "compressed-tensors", "trtllm", "trtllm-ckpt", "gptq", "gguf", "ollama", "xinference", "onnx")}
    assert all(s["inputs"]["quantize"] == quantize[0]["key"][:12] for s in exports)


@pytest.mark.slow
def test_build_every_target(tmp_path):
    r = run_cli("build", PROFILE, "--store", str(tmp_path / "s"), "--json", timeout=3600)
    doc = json.loads(r.stdout)
    failed = {t["name"]: t["validation"] for t in doc["targets"] if t["status"] not in ("built", "cached")}
    assert not failed and r.returncode == 0, failed


def test_build_every_target_on_the_first_layers(tmp_path, smol_short_dir):
    """The same profile on SmolLM2's first layers (real weights and tokenizer), scored on 4 windows of 256
    tokens: every exporter built from the one quantize stage, every artifact reloaded by its own loader with the
    weights bit-exact (where the format holds our codes) and its gates passed."""
    profile = write_profile(tmp_path, {"extends": PROFILE, "name": "all-targets-short",
                                       "source": {"path": str(smol_short_dir)},
                                       "validate": {"accuracy": {"dataset": str(WIKITEXT), "seq_len": 256,
                                                                 "max_tokens": 1024}}})
    r = run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--json", timeout=3600)
    assert r.stdout, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == {"compressed-tensors", "trtllm", "trtllm-ckpt", "gptq", "gguf", "ollama", "xinference",
                            "onnx"}, set(targets)
    failed = {n: (t["status"], t.get("validation")) for n, t in targets.items() if t["status"] != "built"}
    assert not failed and r.returncode == 0, failed
    quantize = [s for s in doc["stages"] if s["name"] == "quantize"]
    assert len(quantize) == 1 and quantize[0]["status"] == "built"
