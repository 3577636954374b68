"""Xinference custom model: model.json (v2) beside a gguf or compressed-tensors payload, checked by Xinference's own
pydantic model where it is installed (it pins its own torch: a venv named by TOOLCHAIN_XINFERENCE_PYTHON)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import needs_smollm2, tiny_profile, write_profile

import toolchain.formats.xinference.check as XV
import toolchain.formats.xinference.export as XE
import toolchain.formats.xinference.spec as X
from toolchain.oracles import venv_python

needs_xinference = pytest.mark.skipif(
    X.xinference_python() is None,
    reason=f"xinference not importable here nor in {venv_python('xinference')}: run scripts/setup (or set "
           "TOOLCHAIN_XINFERENCE_PYTHON to a python where `import xinference` works)")

TARGETS = [{"format": "xinference"}, {"format": "xinference", "name": "x-ct", "of": "compressed-tensors"},
           {"format": "xinference", "name": "x-q8", "payload": {"type": "Q8_0"}, "model_name": "tiny-q8"}]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    from conftest import build_json

    d = tmp_path_factory.mktemp("xinf")
    data = tiny_profile(targets=TARGETS, quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True})
    return build_json(str(write_profile(d, data)), "--store", str(d / "store"))


def _manifest(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def test_tiny_payloads_and_model_json(tiny_build):
    doc = tiny_build
    assert [t["status"] for t in doc["targets"]] == ["built"] * 3, doc["stages"]
    gg, ct, q8 = (json.loads((Path(t["path"]) / "model.json").read_text()) for t in doc["targets"])
    for t, mj in zip(doc["targets"], (gg, ct, q8), strict=True):
        assert mj["version"] == 2 and mj["model_specs"][0]["model_uri"] == f"file://{t['path']}"
        assert t["conformance"]["max_abs_err"] == 0  # the payload's own validator ran
    assert gg["model_specs"][0] | {"model_uri": None} == {
        "model_format": "ggufv2", "model_size_in_billions": "0_001", "quantization": "Q4_0", "model_uri": None,
        "model_file_name_template": "model.gguf"}
    assert (Path(doc["targets"][0]["path"]) / "model.gguf").is_file()
    assert ct["model_specs"][0]["model_format"] == "pytorch" and ct["model_specs"][0]["quantization"] == "none"
    assert (Path(doc["targets"][1]["path"]) / "config.json").is_file()
    assert q8["model_name"] == "tiny-q8" and q8["model_specs"][0]["quantization"] == "Q8_0"
    assert gg["model_ability"] == ["generate"] and gg["chat_template"] is None  # llama-tiny has no tokenizer
    objects = Path(doc["store"]) / "objects"
    checked_by = [_manifest(str(objects / s["key"][:2] / s["key"]))["info"]["model_json"]["checked_by"]
                  for s in doc["stages"] if s["name"].startswith("validate:")]
    assert len(checked_by) == 3
    if X.xinference_python():
        assert all("CustomLLMFamilyV2" in c for c in checked_by)


def _copy(tiny_build, tmp_path, i: int) -> tuple[Path, Path, dict]:
    """A copy of one built artifact whose model.json points at the copy, and the IR dir."""
    t = tiny_build["targets"][i]
    out = tmp_path / "copy"
    shutil.copytree(t["path"], out)
    doc = json.loads((out / "model.json").read_text())
    doc["model_specs"][0]["model_uri"] = f"file://{out}"
    (out / "model.json").write_text(json.dumps(doc))
    manifest = _manifest(t["path"])
    ir_dir = Path(tiny_build["store"]) / "objects" / manifest["inputs"]["quantize"][:2] / manifest["inputs"]["quantize"]
    return out, ir_dir, manifest["info"]


@pytest.mark.parametrize("corrupt,expect", [
    (lambda d, out: d["model_specs"][0].update(model_uri="file:///tmp"), "is not this artifact"),
    (lambda d, out: d["model_specs"][0].update(quantization="Q4_1"), "do not describe the payload"),
    (lambda d, out: d["model_specs"][0].update(model_file_name_template="other.gguf"), "is not a file"),
    (lambda d, out: d.update(chat_template="{{ messages }}"), "chat_template differs"),
    (lambda d, out: d.update(version=1), "version"),
])
def test_corrupted_model_json_caught(tiny_build, tmp_path, monkeypatch, corrupt, expect):
    monkeypatch.setattr(X, "xinference_python", lambda: None)  # the documented fields: fast; Xinference's own below
    out, ir_dir, info = _copy(tiny_build, tmp_path, 0)
    assert XV.model_json_check(out, ir_dir, info)["problems"] == []
    doc = json.loads((out / "model.json").read_text())
    corrupt(doc, out)
    (out / "model.json").write_text(json.dumps(doc))
    problems = XV.model_json_check(out, ir_dir, info)["problems"]
    assert any(expect in p for p in problems), problems


@needs_xinference
def test_xinference_own_model_rejects_what_it_cannot_register():
    ok = {"version": 2, "model_name": "m", "model_lang": ["en"], "model_ability": ["generate"],
          "model_family": "m", "context_length": 2048, "model_specs": [
              {"model_format": "ggufv2", "model_size_in_billions": "0_1", "quantization": "Q4_0",
               "model_uri": "file:///tmp", "model_file_name_template": "model.gguf"}]}
    assert XV.schema_check(ok)["problems"] == []
    bad_format = json.loads(json.dumps(ok))
    bad_format["model_specs"][0]["model_format"] = "compressed-tensors"
    assert XV.schema_check(bad_format)["problems"]
    no_family = {k: v for k, v in ok.items() if k != "model_family"}
    assert "model_family" in XV.schema_check(no_family)["problems"][0]


def test_plan_checks_the_wrapped_format(cli, tmp_path):
    data = tiny_profile(targets=[{"format": "xinference", "of": "onnx-nope"}])
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.exit_code == 2 and "of:" in r.output
    data = tiny_profile(targets=[{"format": "xinference", "of": "gptq"}], quantize={"method": "fp8"})
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.exit_code == 2 and "cannot hold" in r.output
    data = tiny_profile(targets=[{"format": "xinference", "payload": {"type": "Q4_0", "exact": True}}],
                        quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.exit_code == 2 and "exactly" in r.output
    data = tiny_profile(targets=[{"format": "xinference", "payload": {"type": "Q9"}}])
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"))
    assert r.exit_code == 2 and "type" in r.output


@needs_smollm2
def test_smollm2_chat_template_and_stops(tmp_path_factory):
    from test_format_gguf import smol_tokenizer_files

    tok_dir, _ = smol_tokenizer_files(tmp_path_factory.getbasetemp())
    stop, ids, template = XE.stops(tok_dir)
    assert stop == ["<|im_end|>", "<|im_start|>"] and ids == [2, 1]  # eos (config id 2), then ChatML's markers
    assert template.startswith("{% for message in messages %}")


def test_size_in_billions_is_measured():
    from toolchain.arch import ARCHS

    assert XE.size_in_billions(ARCHS["smollm2-135m"]) == "0_135"
    assert XE.size_in_billions(ARCHS["llama-2-7b"]) == "6_7"
    assert XE.size_in_billions(ARCHS["llama-2-13b"]) == 13


def test_missing_xinference_oracle_is_refused_unless_the_profile_allows_the_field_check(cli, tmp_path, monkeypatch):
    """Issue 9 item 4: the checker that will run is in the validate key; without Xinference the plan stops (exit 2)
    unless the target says fallback_check: true, and then the key differs from the real check's."""
    def plan(target: dict) -> tuple[int, str]:
        data = tiny_profile(targets=[target], quantize={"method": "rtn", "bits": 4, "group_size": 32})
        r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"), "--json")
        return r.exit_code, r.output

    real = None
    if X.xinference_python():
        code, out = plan({"format": "xinference"})
        assert code == 0, out
        real = next(s["key"] for s in json.loads(out)["stages"] if s["name"] == "validate:xinference")
    monkeypatch.setattr(X, "xinference_python", lambda: None)
    code, out = plan({"format": "xinference"})
    assert code == 2 and "fallback_check: true" in out and "scripts/setup" in out, out
    code, out = plan({"format": "xinference", "fallback_check": True})
    assert code == 0, out
    fallback = next(s["key"] for s in json.loads(out)["stages"] if s["name"] == "validate:xinference")
    assert fallback != real
    checked = XV.schema_check({"version": 2}, X.FIELD_CHECK)
    assert checked["checked_by"] == X.FIELD_CHECK and checked["problems"]
    gone = XV.schema_check({"version": 2}, "xinference 4.1 CustomLLMFamilyV2")
    assert gone["checked_by"] is None and "no longer importable" in gone["problems"][0]
