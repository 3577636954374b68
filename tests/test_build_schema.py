"""schemas/build.schema.json describes what `build --json` prints: checked on real output of a build, a
published build with a remote cache, and an error; and shown to reject a malformed document."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from conftest import REPO, run_cli, tiny_profile, write_profile

SCHEMA = json.loads((REPO / "schemas" / "build.schema.json").read_text())


def validate(doc: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


def test_schema_accepts_real_build_and_error_output(tmp_path):
    profile = write_profile(tmp_path, tiny_profile())
    r = run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    validate(doc)
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["targets"][0]["verdict"] == "pass"
    cached = json.loads(run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json", "-q").stdout)
    validate(cached)
    assert cached["targets"][0]["verdict"] == "pass"  # never "cached": the verdict is the gates'
    bad = write_profile(tmp_path, {"name": "x", "source": {"path": str(tmp_path / "missing.gguf")}}, "bad.yaml")
    err = run_cli("build", str(bad), "--store", str(tmp_path / "store"), "--json", "-q")
    assert err.returncode == 2
    validate(json.loads(err.stdout))

    for field, value in (("verdict", "cached"), ("verdict", "built by a concurrent build")):
        wrong = copy.deepcopy(doc)
        wrong["targets"][0][field] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(wrong)
    wrong = copy.deepcopy(doc)
    del wrong["ok"]
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong)
    broken = copy.deepcopy(doc)
    broken["stages"][0]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    del broken["stages"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_schema_accepts_published_build_with_remote_cache(tmp_path):
    from oci_registry import start_registry

    reg = start_registry(tmp_path / "reg")
    try:
        profile = write_profile(tmp_path, tiny_profile(publish=[{"to": reg.url("x/m", "v1"), "insecure": True}]))
        r = run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--cache", reg.url("x/cache"),
                    "--insecure", "--json", "-q")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["targets"][0]["published"] and doc["cache"]["pushed"] > 0
        validate(doc)
        report = ci_report(doc, tmp_path)
        assert "| export:compressed-tensors | built |" in report and "remote cache: 0 hits" in report
    finally:
        reg.stop()


def ci_report(doc: dict, tmp_path: Path) -> str:
    """Run the report step of examples/ci/build-and-publish.yml on a build document, as the workflow does."""
    import subprocess
    import sys

    import yaml

    workflow = yaml.safe_load((REPO / "examples" / "ci" / "build-and-publish.yml").read_text())
    step = next(s for s in workflow["jobs"]["build"]["steps"] if s.get("name") == "Report")
    code = step["run"].split("<<'PY' > report.md\n", 1)[1].split("\nPY\n", 1)[0]
    (tmp_path / "build.json").write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_schema_file_is_where_the_readme_says():
    assert "schemas/build.schema.json" in (REPO / "README.md").read_text()
    assert Path(REPO / "schemas" / "build.schema.json").is_file()


def test_stage_and_target_names_follow_the_profiles_name_grammar():
    """Issue 22 item 2: the names a profile accepts for targets are exactly what the schema's stage-name and
    target-name patterns accept (a `../` target name used to pass the profile and break the schema)."""
    import re

    from toolchain import profile as prof
    from toolchain.checks import NAME_BODY, NAME_PATTERN
    from toolchain.errors import InputError

    stage = SCHEMA["$defs"]["stage"]["properties"]["name"]["pattern"]
    target = SCHEMA["$defs"]["target"]["properties"]["name"]["pattern"]
    assert stage == rf"^[a-z]+(:{NAME_BODY})?$" and target == NAME_PATTERN
    for name in ["int4", "a.b_c-d", "9", "x" * 128, "../../other/repo/manifests/latest", "a/b", ".hidden", "-x",
                 "x" * 129, "a b", "tag:latest", "é"]:
        data = tiny_profile(targets=[{"format": "compressed-tensors", "name": name}])
        try:
            prof.from_dict(data)
            accepted = True
        except InputError:
            accepted = False
        assert accepted == bool(re.match(target, name)) == bool(re.match(stage, f"export:{name}")), name
