"""Profile matrices (toolchain/matrix.py): variants, their names and keys, a local matrix build, and the Ray
executor's refusal when Ray is absent. The Ray cluster itself: tests/test_executor_ray.py."""

from __future__ import annotations

import json

from conftest import run_cli, tiny_profile, write_profile

SPEED = {"speed": {"runtime": "onnxruntime", "batch_sizes": [1], "input_len": 8, "output_len": 4, "iterations": 1}}


def plan_json(*args: str) -> dict:
    r = run_cli("plan", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def keys(doc: dict) -> dict[str, str]:
    return {s["name"]: s["key"] for s in doc["stages"]}


def test_variants_are_named_and_share_what_they_share(tmp_path):
    matrix = {"group_size": [32, 64], "quantize.symmetric": [True, False]}
    profile = write_profile(tmp_path, tiny_profile(matrix=matrix))
    doc = plan_json(str(profile), "--store", str(tmp_path / "s"))
    names = [v["profile"] for v in doc["variants"]]
    assert names == ["tiny@group_size=32,symmetric=True", "tiny@group_size=32,symmetric=False",
                     "tiny@group_size=64,symmetric=True", "tiny@group_size=64,symmetric=False"]
    assert doc["variants"][0]["matrix"] == {"group_size": 32, "symmetric": True}
    by = {v["profile"]: keys(v) for v in doc["variants"]}
    assert len({k["source"] for k in by.values()}) == 1  # one source for all: the executor builds it once
    assert len({k["quantize"] for k in by.values()}) == 4
    # A variant is the profile with its axes set: the same keys as the plain profile written out.
    plain = write_profile(tmp_path, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 64,
                                                           "symmetric": False}), "plain.yaml")
    assert keys(plan_json(str(plain), "--store", str(tmp_path / "s"))) == by["tiny@group_size=64,symmetric=False"]


def test_card_axis_keys_only_the_card_bound_stages(tmp_path):
    base = tiny_profile(targets=["onnx"], validate=SPEED)
    plain = keys(plan_json(str(write_profile(tmp_path, base, "plain.yaml")), "--store", str(tmp_path / "s")))
    doc = plan_json(str(write_profile(tmp_path, {**base, "matrix": {"card": ["H100", "H200"]}})),
                    "--store", str(tmp_path / "s"))
    h100, h200 = (keys(v) for v in doc["variants"])
    assert [v["profile"] for v in doc["variants"]] == ["tiny@card=H100", "tiny@card=H200"]
    for name in ("source", "quantize", "export:onnx", "validate:onnx"):
        assert h100[name] == h200[name] == plain[name], name
    assert len({h100["speed:onnx"], h200["speed:onnx"], plain["speed:onnx"]}) == 3


def test_local_matrix_build_builds_shared_stages_once(tmp_path):
    profile = write_profile(tmp_path, tiny_profile(matrix={"group_size": [32, 64], "card": ["H100", "H200"]}))
    r = run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["variants"]) == 4 and doc["failures"] == []
    from test_build_schema import validate  # the matrix document is the schema's `matrix`

    validate(doc)
    source = [next(s for s in v["stages"] if s["name"] == "source") for v in doc["variants"]]
    assert [s["status"] for s in source] == ["built", "cached", "cached", "cached"]
    quant = [next(s for s in v["stages"] if s["name"] == "quantize")["status"] for v in doc["variants"]]
    assert quant == ["built", "cached", "built", "cached"]  # the card axis does not touch quantize
    again = json.loads(run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--json").stdout)
    assert {s["status"] for v in again["variants"] for s in v["stages"]} == {"cached"}
    refs = sorted(p.name for p in (tmp_path / "s" / "refs").iterdir())
    assert "tiny@group_size=64,card=H200@synthetic-llama-tiny.json" in refs and len(refs) == 4


def test_executor_ray_without_ray_exits_2_saying_how_to_install(tmp_path):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray (hidden by the test)')\n")
    import os

    profile = write_profile(tmp_path, tiny_profile())
    r = run_cli("build", str(profile), "--store", str(tmp_path / "s"), "--executor", "ray",
                env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 2, r.stderr
    assert "pip install 'toolchain[ray]'" in r.stderr
    assert not (tmp_path / "s" / "objects").exists()
