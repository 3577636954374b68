"""What we promise about runtimes, checked at plan time against toolchain/runtimes/rules.py, and what the
exporters write so that those runtimes accept it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, needs_smollm2, tiny_profile, write_profile

from toolchain import arch
from toolchain.profile import from_dict
from toolchain.runtimes import rules


def _plan_json(cli, tmp_path, data: dict) -> tuple[int, dict | str]:
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"), "--json")
    if r.exit_code:
        return r.exit_code, r.output
    return 0, json.loads(r.output)


def _verdicts(doc: dict, i: int = 0) -> dict[str, dict]:
    return {v["runtime"]: v for v in doc["targets"][i]["runtimes"]}


def _facts(fmt: str, options: dict | None = None, **quantize) -> dict:
    q = from_dict(tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32, **quantize})).profile.quantize
    return rules.recipe_facts(q, fmt, options or {}, arch.synthetic_config("llama-tiny", None, "float32"))


@needs_smollm2
def test_demo_plan_lists_runtimes_and_says_sglang_will_not_load_it(cli, tmp_path):
    r = cli("plan", "--store", str(tmp_path / "store"))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "vllm" in text and "transformers" in text
    assert "sglang main, autumn 2026 (sgl-project/sglang@000659ae): will NOT load it" in text
    assert "requires symmetric weights" in text and "fix: set quantize.symmetric: true" in text
    doc = json.loads(cli("plan", "--store", str(tmp_path / "store"), "--json").output)
    v = _verdicts(doc)
    assert v["vllm"]["loads"] and v["transformers"]["loads"] and not v["sglang"]["loads"]
    assert v["sglang"]["rules"][0]["id"] == "sglang-ct-w4a16-symmetric"


@needs_smollm2
def test_demo_made_symmetric_loads_in_sglang(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCHAIN_DATA", str(REPO / "data"))
    demo = REPO / "profiles" / "smollm2-int4.yaml"
    sym = tmp_path / "sym.yaml"
    sym.write_text(demo.read_text().replace("symmetric: false", "symmetric: true")
                   .replace("extends: smollm2-base.yaml", f"extends: {demo.parent / 'smollm2-base.yaml'}"))
    doc = json.loads(cli("plan", str(sym), "--store", str(tmp_path / "store"), "--json").output)
    assert _verdicts(doc)["sglang"]["loads"]


def test_gptq_asymmetric_for_vllm_exits_2_citing_the_rule(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
                        targets=[{"format": "gptq", "runtimes": ["vllm"]}])
    code, out = _plan_json(cli, tmp_path, data)
    assert code == 2, out
    assert "targets[0] (gptq).runtimes: vllm" in out and "rule vllm-gptq-symmetric" in out
    assert "gptq_marlin.py" in out and "set quantize.symmetric: true" in out
    assert not (tmp_path / "store" / "objects").exists()


def test_gptq_asymmetric_without_named_runtimes_plans_and_says_who_will_not(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
                        targets=["gptq"])
    code, doc = _plan_json(cli, tmp_path, data)
    assert code == 0, doc
    v = _verdicts(doc)
    assert not v["vllm"]["loads"] and not v["sglang"]["loads"] and v["transformers"]["loads"]


def test_named_runtime_the_format_is_not_for_exits_2(cli, tmp_path):
    data = tiny_profile(targets=[{"format": "gguf", "runtimes": ["sglang"]}])
    code, out = _plan_json(cli, tmp_path, data)
    assert code == 2 and "format gguf is not loaded by sglang" in out and "llama.cpp" in out


def test_runtimes_do_not_change_the_export_key(cli, tmp_path):
    plain = _plan_json(cli, tmp_path, tiny_profile(targets=["compressed-tensors"]))[1]
    named = _plan_json(cli, tmp_path, tiny_profile(targets=[{"format": "compressed-tensors",
                                                             "runtimes": ["vllm"]}]))[1]
    assert [s["key"] for s in plain["stages"]] == [s["key"] for s in named["stages"]]
    assert [v["runtime"] for v in named["targets"][0]["runtimes"]] == ["vllm"]


def test_vllm_gptq_group_sizes_and_scale_dtype():
    assert rules.judge("gptq", {**_facts("gptq", symmetric=True), "group_size": 256})[0]["loads"] is False
    ok = rules.judge("gptq", {**_facts("gptq", symmetric=True), "group_size": 128})[0]
    assert ok["loads"] and [r["id"] for r in ok["rules"]] == ["vllm-gptq-scale-dtype"]  # fp32 config: caveat
    fp16 = rules.judge("gptq", {**_facts("gptq", symmetric=True), "model_dtype": "float16"})[0]
    assert fp16["loads"] and fp16["rules"] == []


def test_trtllm_compressed_tensors_reader_rules():
    by = {v["runtime"]: v for v in rules.judge("compressed-tensors", _facts("compressed-tensors", symmetric=True))}
    assert not by["trtllm"]["loads"] and by["trtllm"]["rules"][0]["id"] == "trtllm-ct-weight-only"
    fp8 = {"method": "fp8", "bits": 8, "strategy": "tensor", "group_size": None}
    q = from_dict(tiny_profile(quantize=fp8)).profile.quantize
    cfg = arch.synthetic_config("llama-tiny", None, "float32")
    by = {v["runtime"]: v for v in rules.judge("compressed-tensors",
                                               rules.recipe_facts(q, "compressed-tensors", {}, cfg))}
    assert not by["trtllm"]["loads"] and by["trtllm"]["rules"][0]["id"] == "trtllm-ct-fp8-per-tensor"
    q = from_dict(tiny_profile(quantize={**fp8, "strategy": "channel"})).profile.quantize
    by = {v["runtime"]: v for v in rules.judge("compressed-tensors",
                                               rules.recipe_facts(q, "compressed-tensors", {}, cfg))}
    assert by["trtllm"]["loads"]


def test_trtllm_legacy_pp_with_exclusions_is_refused(cli, tmp_path):
    quantize = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True,
                "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}
    code, out = _plan_json(cli, tmp_path, tiny_profile(quantize=quantize,
                                                       targets=[{"format": "trtllm-ckpt", "pp_size": 2}]))
    assert code == 2 and "rule trtllm-legacy-pp-exclusions" in out and "pp_size: 1" in out
    code, doc = _plan_json(cli, tmp_path, tiny_profile(quantize=quantize,
                                                       targets=[{"format": "trtllm-ckpt", "pp_size": 1}]))
    assert code == 0, doc


def test_bnb_serves_transformers_and_vllm_only_with_a_plugin():
    q = from_dict(tiny_profile(quantize={"method": "nf4"})).profile.quantize
    by = {v["runtime"]: v for v in rules.judge("bnb", rules.recipe_facts(q, "bnb", {}, {}))}
    assert by["transformers"]["loads"] and not by["vllm"]["loads"]
    assert "plugin" in by["vllm"]["rules"][0]["says"]


def test_xinference_spec_over_compressed_tensors_fp8_says_pytorch():
    from toolchain.formats.xinference.spec import format_and_quantization

    assert format_and_quantization("compressed-tensors", {}, {"method": "fp8"}) == ("pytorch", "none")
    q = from_dict(tiny_profile(quantize={"method": "fp8"})).profile.quantize
    facts = rules.recipe_facts(q, "xinference", {"of": "compressed-tensors"}, {})
    assert facts["xinference_model_format"] == "pytorch" and rules.judge("xinference", facts)[0]["loads"]
    assert not rules.judge("xinference", {**facts, "xinference_model_format": "fp8"})[0]["loads"]


def _vllm_matches(name: str, entry: str) -> bool:
    """compressed-tensors / vLLM / TensorRT-LLM ignore semantics: exact name, or re: with re.match."""
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else name == entry


def test_compressed_tensors_ignore_is_written_as_resolved_names(tmp_path):
    from conftest import build_json

    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                  "ignore": ["lm_head", "down_proj", "re:.*layers\\.1\\.self_attn\\.q_proj"]})
    doc = build_json(str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"))
    assert doc["targets"][0]["status"] == "built", doc["stages"]
    written = json.loads((Path(doc["targets"][0]["path"]) / "config.json").read_text())["quantization_config"]["ignore"]
    cfg = arch.synthetic_config("llama-tiny", None, "float32")
    names = [n for n, _o, _i in arch.linear_shapes(cfg)]
    unquantized = {n for n in names if arch.is_ignored(n, data["quantize"]["ignore"])}
    assert "model.layers.0.mlp.down_proj" in unquantized and len(unquantized) == 4  # 2 down_proj, q_proj, lm_head
    assert {n for n in names if any(_vllm_matches(n, e) for e in written)} == unquantized
    manifest = json.loads((Path(doc["targets"][0]["path"]) / "manifest.json").read_text())
    assert {v["runtime"] for v in manifest["runtimes"]} == {"vllm", "sglang", "trtllm", "transformers"}
    assert {v["runtime"] for v in doc["targets"][0]["runtimes"]} == {"vllm", "sglang", "trtllm", "transformers"}


def test_readme_runtimes_table_is_generated_from_the_rules():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- runtimes-table:begin -->\n")[1].split("\n<!-- runtimes-table:end -->")[0]
    assert block == rules.formats_table()
    for fmt in rules.FORMAT_RUNTIMES:
        assert f"| `{fmt}` |" in block


def test_every_rule_cites_a_source_and_names_a_known_runtime_and_format():
    from toolchain.formats import EXPORTERS

    assert set(rules.FORMAT_RUNTIMES) == set(EXPORTERS)
    for r in rules.RULES:
        assert r.runtime in rules.RUNTIMES and set(r.formats) <= set(EXPORTERS), r.id
        assert "/" in r.source and r.fix and r.says, r.id
        assert all(r.runtime in rules.FORMAT_RUNTIMES[f] for f in r.formats), r.id
    assert len({r.id for r in rules.RULES}) == len(rules.RULES)


def test_every_vllm_rule_says_whether_vllm_was_seen_doing_it():
    for r in rules.RULES:
        if r.runtime == "vllm":
            assert r.seen == rules.NOT_SEEN or r.seen.startswith("confirmed on GPU (vLLM "), r.id


@pytest.mark.parametrize("runtimes", [["nope"], "vllm", [1]])
def test_bad_runtimes_value_exits_2(cli, tmp_path, runtimes):
    code, out = _plan_json(cli, tmp_path, tiny_profile(targets=[{"format": "compressed-tensors",
                                                                 "runtimes": runtimes}]))
    assert code == 2 and "runtimes" in out, out


def test_verbatim_bare_ignore_names_would_be_refused_and_resolved_ones_are_not():
    facts = _facts("compressed-tensors", symmetric=True, ignore=["lm_head", "down_proj"])
    assert facts["ignore_not_exact"] == []  # what the exporter writes: resolved names
    by = {v["runtime"]: v for v in rules.judge("compressed-tensors", {**facts, "ignore_not_exact": ["down_proj"]})}
    assert not by["vllm"]["loads"] and by["vllm"]["rules"][0]["id"] == "ct-ignore-exact-names"
