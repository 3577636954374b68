"""GGUF and ollama for Qwen2, Qwen3 and Mistral: tiny random checkpoints of transformers' own classes through the
gguf and ollama targets. The validator's reload (transformers' GGUF loader, gguf-py's dequantizer) must equal the
IR bit for bit in that loader's arithmetic, the tokenizer must encode like the source's, and the file's logits must
match transformers' forward of our dequantized weights. llama.cpp's names per family: arch `qwen2` with
attn_q/k/v.bias, `qwen3` with attn_q_norm/attn_k_norm, neither q/k-permuted; Mistral as `llama`, permuted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import WIKITEXT, shipped, tiny_profile, write_profile
from familylib import FAMILIES, fidelity, hf_forward_of, random_ids, tiny_family_dir

import toolchain.formats.gguf.export as G
from toolchain.formats.ollama.export import parse_modelfile
from toolchain.ir import IRReader
from toolchain.store import Store

QUANT = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_family_dir(f, root / f) for f in FAMILIES}


def build(cli, tmp_path: Path, src: Path, targets: list) -> tuple[dict, Store]:
    profile = write_profile(tmp_path, tiny_profile(source={"path": str(src)}, quantize=QUANT, targets=targets))
    store = tmp_path / "store"
    doc = json.loads(cli("build", str(profile), "--store", str(store), "--json").stdout)
    return doc, Store(store)


EXPECT = {  # family -> (general.architecture, tokenizer.ggml.model, tensors that must be in the file)
    "qwen2": ("qwen2", "gpt2", {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"}),
    "qwen3": ("qwen3", "gpt2", {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"}),
    "mistral": ("llama", "llama", {"blk.0.attn_q.weight", "output.weight"}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_and_ollama_per_family(cli, tmp_path, family_dirs, family):
    import gguf

    from toolchain.formats.gguf.check import load_gguf_model

    doc, store = build(cli, tmp_path, family_dirs[family], [{"format": "gguf"}, {"format": "ollama", "type": "Q8_0"}])
    assert [t["status"] for t in doc["targets"]] == ["built", "built"], doc["stages"]
    ir = IRReader(store.object_dir(doc["stages"][1]["key"]))
    assert {n for n in ir.plain_names() if n.endswith(".bias")} == (
        {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qkv"} if family == "qwen2" else set())
    for t in doc["targets"]:
        conf = t["conformance"]  # every tensor, biases and q/k norms included, equal in the loader's arithmetic
        assert conf["max_abs_err"] == 0 and conf["layers_checked"] == len(ir.layers) + len(ir.plain_names())
        assert conf["tokenizer"]["first_mismatch"] is None and conf["tokenizer"]["tokens_compared"] > 20
        assert conf["tokenizer"]["chat_template_equal"]
        assert t["export_fidelity"]["passed"] and t["export_fidelity"]["kl_mean"] <= 1e-4
    path = Path(doc["targets"][0]["path"]) / G.FILE_NAME
    fields = gguf.GGUFReader(str(path)).fields
    arch, tok_model, tensors = EXPECT[family]
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == tok_model
    assert tensors <= {t.name for t in gguf.GGUFReader(str(path)).tensors}
    if tok_model == "gpt2":
        assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
        assert len(fields["tokenizer.ggml.merges"].contents()) > 500
        assert fields["tokenizer.ggml.eos_token_id"].contents() == json.loads(
            (family_dirs[family] / "config.json").read_text())["eos_token_id"]
    if tok_model == "gpt2":  # transformers rebuilds Qwen's tokenizer from the file alone (its GGUFQwen2Converter)
        from transformers import AutoTokenizer

        text = shipped(WIKITEXT).read_text()[:5000] + " <|im_start|>user\n12345<|im_end|>"
        ours, theirs = AutoTokenizer.from_pretrained(family_dirs[family]), AutoTokenizer.from_pretrained(
            path.parent, gguf_file=G.FILE_NAME)
        assert ours(text).input_ids == theirs(text).input_ids
    if family == "qwen3":  # head_dim 128 != hidden / heads: written as llama.cpp's converter does
        assert fields["qwen3.attention.key_length"].contents() == 128

    # the file's logits against transformers' own model class holding our dequantized weights
    ir_dir = store.object_dir(doc["stages"][1]["key"])
    ids = random_ids(1024)
    for t in doc["targets"]:
        kl, top1 = fidelity(hf_forward_of(ir_dir, ids), load_gguf_model(Path(t["path"]))(ids[None]).logits[0])
        assert kl <= 1e-4 and top1 >= 0.99, (t["name"], kl, top1)

    modelfile = dict(parse_modelfile((Path(doc["targets"][1]["path"]) / "Modelfile").read_text()))
    if family == "mistral":  # no [INST] conversion: left to ollama's own detection, and said so
        assert "TEMPLATE" not in modelfile
    else:
        assert "<|im_start|>" in modelfile["TEMPLATE"] and modelfile["PARAMETER stop"]
        assert (modelfile.get("SYSTEM") is not None) is (family == "qwen2")  # Qwen2.5's default system prompt


def test_qwen_rows_must_not_be_permuted(cli, tmp_path, family_dirs, monkeypatch):
    """llama.cpp's qwen2 rotates halves (NEOX RoPE): a Llama-style q/k permutation is a wrong file, and the
    validator (transformers' loader, which undoes no permutation for qwen2) says so."""
    real = G._qk_heads
    monkeypatch.setattr(G, "_qk_heads", lambda name, cfg: real(name, {**cfg, "model_type": "llama"}))
    # F16 casts (the exporter's read-back only reports a distance there): the independent validator must catch it
    doc, _ = build(cli, tmp_path, family_dirs["qwen2"], [{"format": "gguf", "type": "F16"}])
    t = doc["targets"][0]
    reason = t["validation"]["reason"]
    assert t["status"] == "failed" and "reloaded weights differ" in reason and "self_attn." in reason
