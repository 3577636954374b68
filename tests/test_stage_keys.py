"""Stage keys pinned: a refactor of how stages are declared, planned or registered must leave every key as it was
(a changed key rebuilds every user's cache). The figures were computed from main at bb33e10, before issue 13's
refactor, and are hard-coded on purpose. A deliberate change of a stage's bytes bumps its version and updates
the pin here, saying why in the commit.

The versions of the libraries that shape the bytes are part of each key; they are fixed to stand-ins here so the
pin tests our code, not this machine's installed wheels. The GGUF and WikiText-2 texts are hashed as they ship.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHAKESPEARE, WIKITEXT, needs_smollm2, needs_wikitext, tiny_profile

# Distributions whose versions enter keys (stage libs, quantized_with, calibrated_with).
PINNED_DISTS = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "compressed-tensors", "bitsandbytes",
                "onnx", "onnxscript", "onnxruntime")


@pytest.fixture
def pinned_libs(monkeypatch):
    real = importlib.metadata.version

    def version(dist: str) -> str:
        return f"pinned-{dist}" if dist in PINNED_DISTS else real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setenv("TOOLCHAIN_NO_GPU", "1")
    monkeypatch.setenv("TOOLCHAIN_DATA", str(REPO / "data"))
    # The oracles are looked for at plan time; their presence is not what this pins. An interpreter that has no
    # xinference gives the checker "xinference unknown version" whatever is installed.
    monkeypatch.setenv("TOOLCHAIN_GPTQMODEL_PYTHON", sys.executable)
    monkeypatch.setenv("TOOLCHAIN_XINFERENCE_PYTHON", "/bin/false")


def plan_keys(data: dict, base_dir: Path, store_dir: Path) -> dict[str, str]:
    from toolchain.plan import build_plan
    from toolchain.profile import from_dict
    from toolchain.store import Store

    plan = build_plan(from_dict(data, base_dir / "profile.yaml", base_dir), Store(store_dir))
    return {s.name: s.key for s in plan.stages}


def demo_yaml(name: str) -> dict:
    """A shipped profile, merged with its base; scored on the CPU whatever this machine has (`auto` resolves to
    the CPU without a GPU, so the key is the one a CPU machine computes from the YAML as shipped)."""
    from toolchain.profile import _read_yaml

    data = _read_yaml((REPO / "profiles" / name).resolve())
    data["validate"]["accuracy"]["device"] = "cpu"
    return data


DEMO = {
    "source": "c2294c8a28563900cc47fbefebf8152558b22ed4d68c5754d754290a30341baa",
    "quantize": "07c0978778855612285270b2ec2ce3a1e9c065ce7460ac156768687ce41aaebe",
    "reference": "ae2153c6e603e6841dcd6beb6f07a5e1735b4531e6d5bc48e737c26005643e4b",
    "export:compressed-tensors": "3cec121dc7025698a20000bfa90232b61ad726e37c6220f017e8984f9fd93dfc",
    "validate:compressed-tensors": "64edd94bc87dab343d4549a5327b29d4f8e5b4189ba1341d872b167e39c53ea0",
}
SHIPPED = {
    "smollm2-all-targets.yaml": {
        "source": "c2294c8a28563900cc47fbefebf8152558b22ed4d68c5754d754290a30341baa",
        "quantize": "ebfc9e88bc69687a13f7b49df1f253a7f67664f99cb64864c9a593312dce69c3",
        "reference": "90941cd4d8998a02b15586dfc803800d95ff98e462756f63eef781367a423429",
        "export:compressed-tensors": "12f4b2ea5bb7960939afd99116781c25d07650f232c8b6ce644c3cbd83a82bed",
        "validate:compressed-tensors": "39a007ce2148b467d5f1a1f17996842e7a9f7de3fcbec31889a419d243c36eb2",
        "export:trtllm": "fdd6f4e364bf66aefaf02ad26cdb4b73a82f22d7805513456f2947071e99bc91",
        "validate:trtllm": "1b52c6207873174b7bcd56dca0d7ef59ad367b39537b5084ef7e793e10caec82",
        "export:trtllm-ckpt": "90189658defa570a6320ca32dafd2e936dc6a5f483172a17ff38d7ed652894c6",
        "validate:trtllm-ckpt": "0e690452543c87a3fbcaa24f633baf0a2cedce23d3a01b0966b2bcf56fd37300",
        "export:gptq": "4b8a3f5ec00808297fde8285c605ad80920b61036985304819fceeab3fec17a7",
        "validate:gptq": "aa9706fc6eb75e9dc9baac8aa9ea16e51508b7998150690a7ac170c154192925",
        "export:gguf": "487d4fe6992a03941b137f73cc1a69c7dcd12419c4c22d88b765645d366b8a68",
        "validate:gguf": "3c7130ea6e35132ff41f52de3fcd0fa7a58abb94766ab56b5caaba23993af6d2",
        "export:ollama": "55ec839a1604a7ec87b15b713acc7630e3958daacf425de8411b46b2ebb38110",
        "validate:ollama": "f642a8c894f41c2050188c4529554cab08f77a05720ae09840134f38654882c4",
        "export:xinference": "18e1210b08068973f628177ea4b9448bc10849cc158694a87c512e2aa076322e",
        "validate:xinference": "9b87152a80b5f6c2082c674ee8534cd3bc04d7fa9eaf94baa75bc28b27078824",
        "export:onnx": "8edb5fc97a227df535605e270dd0537a1fd3ca00a00418993e87e0d0fa1536cc",
        "validate:onnx": "473b384b3a132106bcb15fcf3f6725e662ce19f919953f3d6b716519a9f96a94",
    },
    "smollm2-nf4.yaml": {
        "source": "c2294c8a28563900cc47fbefebf8152558b22ed4d68c5754d754290a30341baa",
        "quantize": "3f3755550d45bab1e42610ca0a91a6c6281e27501dbba681f15bcb11ca912895",
        "reference": "ae2153c6e603e6841dcd6beb6f07a5e1735b4531e6d5bc48e737c26005643e4b",
        "export:bnb": "e15d3ae53487454b13fb10a18f0ef425c9709c5c3c8f333112ba34a275a68227",
        "validate:bnb": "7568e9e12d5966ea1b46a2f508fd72cd4ccae48587fed94b7d4ce2ff35eff933",
    },
    "smollm2-fp8.yaml": {
        "source": "c2294c8a28563900cc47fbefebf8152558b22ed4d68c5754d754290a30341baa",
        "quantize": "857c89109abead4fa7a723d126b6276bb3d5c63dfff50696127429372d544adf",
        "reference": "ae2153c6e603e6841dcd6beb6f07a5e1735b4531e6d5bc48e737c26005643e4b",
        "export:compressed-tensors": "d52394a9d6cffa3137ffcc6b79e49fa7556c6ad75bae4dbeb78bbf3347a875a8",
        "validate:compressed-tensors": "13e1c63d2c560931930e2720aeb36285386f7bf8200264d322738af254d59d4e",
    },
    "smollm2-fp8-trtllm.yaml": {
        "source": "c2294c8a28563900cc47fbefebf8152558b22ed4d68c5754d754290a30341baa",
        "quantize": "0e7409cb9527da1c42c9b611c355772ba2d2b777630aab6264980b00e7b4b028",
        "reference": "ae2153c6e603e6841dcd6beb6f07a5e1735b4531e6d5bc48e737c26005643e4b",
        "export:trtllm": "866abc304f0bd92992865ac27c72cc49ae479c9030532470a49bd19f6b8ec653",
        "validate:trtllm": "4f06ffbb903f579d5c939ad9a19c7a62b65d6a95daf42400372f727c984b4327",
        "export:trtllm-ckpt": "b5fed318ecf442e62b93377e620fe408870aeaee97ec2b9ed7452a661dac4fe0",
        "validate:trtllm-ckpt": "88f133e9f085b26866ab385f3d70687ccde56b85dd8a001b3e2bc348680b37f5",
    },
}
TINY = {
    "gptq": {
        "source": "3373489717f68de9232209b3ba9ca18ceab1147b652183df0f733f65de2c9d2e",
        "quantize": "8a35cc4be4a50ffdef83d8301162fd3e29a0d1589a0cb61b2659f9fd56334513",
        "export:gptq": "1ec119736cd8d86f518db6db9dbd120544081387f5086a385fb7b00fc54c1557",
        "validate:gptq": "4b6fd4146635252fe6667cb572f41d115eaa76485687928408ce4e09200e4ce8",
        "export:xinference": "fbdf7024f6476ab92fc5c7952a39d6699e14cb730ec6fe4abfb91a8b6b9363c4",
        "validate:xinference": "e23bfa46ff228f16c919e263dbb78440bc08ed40e0b316fb45ed5663f6ac9845",
    },
    "awq": {
        "source": "3373489717f68de9232209b3ba9ca18ceab1147b652183df0f733f65de2c9d2e",
        "quantize": "39545cb2e28545e46a567dccd87604ff5d7b15119b3b211eeb6cc63a56a83412",
        "export:compressed-tensors": "8f82ea554931711325b2fd2f0dc95ca6a6ee1572efedc171acfc8f5dfe1b84a7",
        "validate:compressed-tensors": "27a41c77e8fbe33a0778bbf13d72ddaf62ff35304817715474f2249a503f2043",
        "export:trtllm": "eec10db68762da0850a9fab623ee837630b76a6019bad694b251c96cdb298db9",
        "validate:trtllm": "20cb3c3ddfa91e0b74dc45c23f83cc0a24c9553b5c26e93d2b9f994a786c1a8c",
        "export:onnx": "3c31ad04438ef40e0b3be7d6916e56d579f18d702e678553d34679db55394a4f",
        "validate:onnx": "712c2cd6ed569c9ffa0555f49152d1f60ff0b690da74e0d147fa6cceaaeb6d6e",
        "export:gguf": "16512850182c4d9c124765a5ad929ad23a9d1a8973cfa65fa90856300d6791ad",
        "validate:gguf": "44ce0ed9a5e3e4f2ebc34bbfe39d76b22bcd00e5c426c939ae461eeb6aa45c4d",
    },
    "nf4": {
        "source": "3373489717f68de9232209b3ba9ca18ceab1147b652183df0f733f65de2c9d2e",
        "quantize": "015d690014e6a3fd358b327731b76b636f3ba31e3b9d88509f6b2121e8089de6",
        "export:bnb": "202a146c1f3c4ae69cf92a41d50dec31a5ad30e016acbc5aa50f84fe15252655",
        "validate:bnb": "11c04cbbc1a7eeb6992fcf7a45cdd59189dbf02a0b146c8db889fa3757d53dda",
        "export:ollama": "e27dc08e35e7238f99b198e00c4377dbf7a0d972524bc16fabacd712e0fc9c8b",
        "validate:ollama": "b0ddbd4951cdb464fc80cb222f50585eab5d4e7ecdfbf917512e0289de8e4a3a",
    },
    "fp8-engine": {
        "source": "3373489717f68de9232209b3ba9ca18ceab1147b652183df0f733f65de2c9d2e",
        "quantize": "37a4c9faec489ae595bffcda55a6fd5b6065ebd7f4c76c48dfc45f2580bc9b4d",
        "export:trtllm-ckpt": "8978c9b4f19023cee89f9fb50154f7353183fd27362c56f8fc7bedb1fd23eb47",
        "validate:trtllm-ckpt": "d6578d275a47b7cb982e90d0b36c19bd3c72d05afe8d1b14c5a6015b5c08e976",
        "engine:trtllm-ckpt": "555d178adec65db2a48cd491f5afe14d18f500fd0ad60cf7e3d64d9323a74a66",
        "export:xinference": "42d00add476898f4d67a0d44d4a07c8358efeebf7cd3f1d502a45802a170daab",
        "validate:xinference": "38dad4a100d915fa5fa4e1f0202ba466560fbe4b63ef981af3151c026a4f1e57",
    },
    "publish": {
        "source": "3373489717f68de9232209b3ba9ca18ceab1147b652183df0f733f65de2c9d2e",
        "quantize": "02c4a617c06d3826cd45adda758f79c82fafce0ca035a970bb7b5539f112821c",
        "reference": "cf588a9351cc05b8b775d14b477b9d088000a358fb0c1a405f141aa88eb9406f",
        "export:compressed-tensors": "ddb5b65796320b005314af07b2dd2e7c3b46386572b766ef95dcc3ce48f1b0b7",
        "validate:compressed-tensors": "04dbc1a237cf0ae777425acd54c7c081b64b6343650bd0f6947af15fe24c8ed9",
        "publish:compressed-tensors": "107c3c8713ff30131356bc64124caec42556106e12d51a3ec3997e5761731a74",
    },
}


@needs_smollm2
@needs_wikitext
@pytest.mark.parametrize("name", ["smollm2-int4.yaml", *sorted(SHIPPED)])
def test_shipped_profiles_keys_unchanged(name, pinned_libs, tmp_path):
    expected = DEMO if name == "smollm2-int4.yaml" else SHIPPED[name]
    assert plan_keys(demo_yaml(name), REPO / "profiles", tmp_path / "store") == expected


def tiny_cases() -> dict[str, dict]:
    cal = {"dataset": str(SHAKESPEARE), "samples": 4, "seq_len": 32}
    return {
        "gptq": tiny_profile(quantize={"method": "gptq", "bits": 4, "group_size": 32, "calibration": cal,
                                       "device": "cpu", "act_order": True, "static_groups": False},
                             targets=["gptq", {"format": "xinference", "of": "gptq"}]),
        "awq": tiny_profile(quantize={"method": "awq", "bits": 4, "group_size": 64, "symmetric": True,
                                      "calibration": cal, "device": "cpu", "awq_grid": 5},
                            targets=["compressed-tensors", "trtllm", "onnx", "gguf"]),
        "nf4": tiny_profile(quantize={"method": "nf4", "blocksize": 64}, targets=["bnb", "ollama"]),
        "fp8-engine": tiny_profile(quantize={"method": "fp8", "kv_cache": "fp8"},
                                   targets=[{"format": "trtllm-ckpt", "engine": {"max_batch_size": 4}},
                                            {"format": "xinference", "of": "compressed-tensors"}]),
        "publish": tiny_profile(publish=[{"to": "oci://localhost:5000/tiny:v1", "insecure": True}],
                                validate={"accuracy": {"dataset": str(WIKITEXT), "seq_len": 64, "max_tokens": 128,
                                                       "gates": "none", "device": "cpu"}}),
    }


@pytest.mark.parametrize("case", sorted(tiny_cases()))
def test_every_stage_kind_keys_unchanged(case, pinned_libs, tmp_path):
    if case == "fp8-engine" and shutil.which("nvidia-smi"):
        pytest.skip("the engine stage's key holds the GPU's compute capability: pinned on a machine without one")
    assert plan_keys(tiny_cases()[case], tmp_path, tmp_path / "store") == TINY[case]
