"""Scheme presets (`quantize: {preset: W4A16}`) expand to the explicit recipe, with the same stage keys; a preset
and a disagreeing explicit field exit 2. And `extends:`: each file's paths resolve against that file."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_profile, write_profile

from toolchain import profile as prof
from toolchain.errors import InputError
from toolchain.presets import PRESETS, expand

EXPLICIT = {
    "W4A16": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
    "W8A16": {"method": "rtn", "bits": 8, "strategy": "channel"},
    "FP8_DYNAMIC": {"method": "fp8", "strategy": "channel"},
    "NF4": {"method": "nf4"},
}


def _keys(tmp_path, quantize: dict, name: str) -> dict[str, str]:
    from toolchain.plan import build_plan
    from toolchain.progress import Reporter
    from toolchain.store import Store

    targets = ["bnb"] if "NF4" in (quantize.get("preset"), quantize.get("method", "").upper()) else \
        ["compressed-tensors"]
    loaded = prof.load(write_profile(tmp_path, tiny_profile(quantize=quantize, targets=targets), name))
    return {s.name: s.key for s in build_plan(loaded, Store(tmp_path / "st"), Reporter(quiet=True)).stages}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_has_the_keys_of_its_explicit_recipe(tmp_path, preset):
    assert set(EXPLICIT) == set(PRESETS)
    assert _keys(tmp_path, {"preset": preset}, "p.yaml") == _keys(tmp_path, EXPLICIT[preset], "e.yaml")


def test_plan_shows_the_expanded_recipe(tmp_path):
    p = write_profile(tmp_path, tiny_profile(quantize={"preset": "W4A16_ASYM"}))
    r = run_cli("plan", str(p), "--store", str(tmp_path / "st"))
    assert r.returncode == 0, r.stderr
    assert "quantize: method rtn, bits 4, strategy group, group_size 128, symmetric false (preset W4A16_ASYM)" \
        in r.stdout
    doc = json.loads(run_cli("plan", str(p), "--store", str(tmp_path / "st"), "--json").stdout)
    assert doc["quantize"]["preset"] == "W4A16_ASYM" and doc["quantize"]["recipe"]["symmetric"] is False


def test_preset_keeps_the_algorithm_and_agreeing_fields():
    q, name = expand({"preset": "w4a16", "method": "gptq", "group_size": 128, "damp": 0.05})
    assert name == "W4A16" and q == {"bits": 4, "strategy": "group", "group_size": 128, "symmetric": True,
                                     "method": "gptq", "damp": 0.05}
    assert expand({"method": "rtn", "bits": 4}) == ({"method": "rtn", "bits": 4}, None)


@pytest.mark.parametrize("quantize, message", [
    ({"preset": "W4A16", "bits": 8}, "quantize.bits: 8 conflicts with preset W4A16 (bits: 4)"),
    ({"preset": "W4A16", "symmetric": 1}, "quantize.symmetric: 1 conflicts with preset W4A16"),
    ({"preset": "FP8_DYNAMIC", "method": "rtn"}, "quantize.method: 'rtn' conflicts with preset FP8_DYNAMIC"),
    ({"preset": "W4A16", "method": "nf4"}, "quantize.method: nf4 does not take preset W4A16"),
])
def test_preset_conflicts_are_refused(quantize, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(quantize)


def test_extends_paths_resolve_against_the_file_that_wrote_them(tmp_path):
    base_dir, child_dir = tmp_path / "shared", tmp_path / "elsewhere" / "team"
    base_dir.mkdir()
    child_dir.mkdir(parents=True)
    (base_dir / "eval.txt").write_text("text")
    (child_dir / "calib.txt").write_text("text")
    write_profile(base_dir, {**tiny_profile(name="base"),
                             "validate": {"accuracy": {"dataset": "eval.txt", "gates": "none"}}}, "base.yaml")
    child = write_profile(child_dir, {"extends": "../../shared/base.yaml", "name": "child",
                                      "quantize": {"method": "gptq", "calibration": {"dataset": "calib.txt"}}})
    loaded = prof.load(child)
    assert loaded.resolve(loaded.profile.validate_.accuracy.dataset) == base_dir / "eval.txt"
    assert loaded.resolve(loaded.profile.quantize.calibration.dataset) == child_dir / "calib.txt"
    # the extending file's own value for the same field wins, and resolves against it
    (child_dir / "eval.txt").write_text("text")
    child.write_text(child.read_text() + "validate: {accuracy: {dataset: eval.txt, gates: none}}\n")
    loaded = prof.load(child)
    assert loaded.resolve(loaded.profile.validate_.accuracy.dataset) == child_dir / "eval.txt"
