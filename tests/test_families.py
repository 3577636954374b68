"""The family descriptions (toolchain.families) against transformers' own classes: every named shape's block
tensors (names, shapes, order-independent) equal those of the decoder layer transformers builds from the same
config, and the refusals say what is supported."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain import families
from toolchain.families import UnsupportedModel, family_of


def _hf_block_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    import importlib

    import torch
    from transformers import AutoConfig

    d = dict(cfg)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    mod = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    layer_cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("DecoderLayer") and n[0] != "_"
                     and len(n) == min(len(m) for m in dir(mod) if m.endswith("DecoderLayer") and m[0] != "_"))
    with torch.device("meta"):
        layer = layer_cls(hf, 0)
    return {k: tuple(p.shape) for k, p in layer.named_parameters()}


@pytest.mark.parametrize("name", sorted(families.named_shapes()))
def test_block_tensors_match_transformers(name):
    cfg = families.named_shapes()[name]
    fam = families.check(cfg)
    ours = dict(fam.block_tensors(cfg))
    assert ours == _hf_block_params(cfg)


@pytest.mark.parametrize(("name", "biased", "qk_norm", "gguf"), [
    ("qwen2.5-7b", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False, "qwen2"),
    ("qwen3-8b", (), True, "qwen3"),
    ("mistral-7b", (), False, "llama"),
    ("llama-2-7b", (), False, "llama"),
])
def test_family_facts(name, biased, qk_norm, gguf):
    cfg = families.named_shapes()[name]
    fam = family_of(cfg)
    assert fam.biases(cfg) == biased
    assert fam.qk_norm is qk_norm
    assert fam.gguf_arch == gguf
    assert fam.gguf_permute_qk is (gguf == "llama")
    assert ("self_attn.q_norm" in fam.gguf_names()) is qk_norm


def test_published_shapes():
    """Parameter counts of the named shapes against the models' published sizes (embedding counted once if tied)."""
    def params(name):
        cfg = families.named_shapes()[name]
        fam = family_of(cfg)
        s = fam.dims(cfg)
        block = sum(_numel(shape) for _n, shape in fam.block_tensors(cfg))
        return s.layers * block + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden

    assert params("qwen3-8b") == pytest.approx(8.19e9, rel=0.01)  # "Number of Parameters: 8.2B"
    assert params("qwen3-0.6b") == pytest.approx(0.596e9, rel=0.01)  # 0.6B (0.44B non-embedding)
    assert params("qwen2.5-7b") == pytest.approx(7.61e9, rel=0.01)  # 7.61B
    assert params("mistral-7b") == pytest.approx(7.25e9, rel=0.01)  # 7.25B


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize(("cfg", "words"), [
    ({"model_type": "gpt2"}, ["'gpt2' is not supported", "qwen3 (Qwen3ForCausalLM)", "llama"]),
    ({"model_type": "deepseek_v3"}, ["Mixture-of-Experts", "mistral (MistralForCausalLM)"]),
    ({"model_type": "mixtral"}, ["Mixture-of-Experts", "qwen2"]),
    ({"model_type": "gpt_oss"}, ["not supported"]),
    ({**families.named_shapes()["mistral-7b"], "sliding_window": 4096},
     ["sliding_window 4096 is shorter than the context (32768", "null or >= max_position_embeddings"]),
    ({**families.named_shapes()["qwen2.5-7b"], "use_sliding_window": True}, ["use_sliding_window false"]),
    ({**families.named_shapes()["qwen3-8b"], "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     ["'dynamic'", "supports: default, yarn"]),
    ({**families.named_shapes()["llama-3-8b"], "rope_scaling": {"type": "longrope"}}, ["'longrope'", "llama3"]),
])
def test_refusals_name_what_is_supported(cfg, words):
    with pytest.raises(UnsupportedModel) as e:
        families.check(cfg)
    for w in words:
        assert w in str(e.value)


def test_accepted_features():
    shapes = families.named_shapes()
    families.check({**shapes["mistral-7b"], "sliding_window": 32768})  # Ministral: window = context
    families.check({**shapes["llama-3-8b"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    families.check({**shapes["qwen3-8b"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    families.check(shapes["qwen2.5-7b"])  # sliding_window 131072 with use_sliding_window false


# -- plan time: `toolchain build` refuses before any work (exit 2), naming what is supported --------------------

def _hf_dir(tmp_path, cfg: dict):
    """A model directory with this config.json and a placeholder safetensors: enough for a plan (nothing runs)."""
    import json

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import save_file  # a valid file: the plan checks safetensors headers first

    save_file({"model.norm.weight": np.ones(4, dtype=np.float32)}, str(d / "model.safetensors"))
    return d


def _build_exit2(cli, tmp_path, profile: dict, *words: str) -> None:
    from conftest import write_profile

    store = tmp_path / "store"
    r = cli("build", str(write_profile(tmp_path, profile)), "--store", str(store))
    assert r.exit_code == 2, r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert not (store / "objects").exists() or not any((store / "objects").iterdir())


@pytest.mark.parametrize(("cfg", "words"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768},
     ["model_type 'gpt2' is not supported", "qwen3 (Qwen3ForCausalLM)"]),
    ({"model_type": "deepseek_v3", "hidden_size": 7168}, ["'deepseek_v3'", "Mixture-of-Experts", "qwen2"]),
    ({"model_type": "gpt_oss", "hidden_size": 2880}, ["'gpt_oss'", "mistral (MistralForCausalLM)"]),
    ({"model_type": "mixtral", "hidden_size": 4096}, ["'mixtral'", "Mixture-of-Experts"]),
    ({**families.named_shapes()["mistral-7b"], "sliding_window": 4096}, ["sliding_window 4096", "null or >="]),
    ({**families.named_shapes()["qwen3-8b"], "rope_scaling": {"rope_type": "longrope"}}, ["'longrope'", "yarn"]),
])
def test_plan_refuses_unsupported_config_json(cli, tmp_path, cfg, words):
    from conftest import tiny_profile

    _build_exit2(cli, tmp_path, tiny_profile(source={"path": str(_hf_dir(tmp_path, cfg))}), "source.path:", *words)


@pytest.mark.parametrize("fmt", ["trtllm", "trtllm-ckpt", "xinference"])
@pytest.mark.parametrize("arch", ["qwen2-tiny", "qwen3-tiny"])
def test_formats_not_wired_for_a_family_say_so(cli, tmp_path, fmt, arch):
    from conftest import tiny_profile

    profile = tiny_profile(source={"synthetic": {"arch": arch, "seed": 0, "dtype": "float32"}}, targets=[fmt])
    _build_exit2(cli, tmp_path, profile, f"format {fmt} does not take {arch.removesuffix('-tiny')} models yet",
                 "llama, mistral")


@pytest.mark.parametrize("arch", ["qwen2.5-7b", "qwen3-8b", "qwen3-0.6b", "mistral-7b"])
def test_named_shapes_plan(cli, tmp_path, arch):
    """`--source synthetic:<arch>` plans for every new named shape (compressed-tensors, GPTQ)."""
    from conftest import tiny_profile, write_profile

    profile = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True})
    r = cli("plan", str(write_profile(tmp_path, profile)), "--store", str(tmp_path / "store"),
            "--source", f"synthetic:{arch}", "--json")
    assert r.exit_code == 0, r.output
    assert f"synthetic:{arch}" in r.output
