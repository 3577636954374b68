"""profiles/smollm2-all-targets.yaml: one quantize stage feeds every exporter that can run here."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, needs_smollm2, needs_wikitext, run_cli

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
