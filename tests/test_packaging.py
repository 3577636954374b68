"""The project as a user installs it: the wheel (not the editable checkout) carries the demo profile and the texts it
reads, so `toolchain build` with no profile works from a wheel install; the shipped texts are the ones data/README.md
names (sha256); and every subpackage is listed for the wheel (pyproject lists them by hand, next to the data maps)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, REPO, needs_smollm2


def _readme_hashes() -> dict[str, str]:
    rows = re.findall(r"^\| ([\w./-]+) \|.*\| ([0-9a-f]{64}) \|", (REPO / "data" / "README.md").read_text(), re.M)
    return dict(rows)


def test_shipped_texts_match_their_readme():
    """data/README.md's sha256 for each text, checked on the files the tests and the demo read."""
    hashes = _readme_hashes()
    assert set(hashes) == {"wikitext-2-raw/wiki.test.raw", "tinyshakespeare/input.txt"}
    for rel, sha in hashes.items():
        path = DATA / rel
        assert path.is_file(), f"{path} missing: the repository ships it in data/ (TOOLCHAIN_DATA={DATA})"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"{path} is not the text data/README.md names"
    for notice in ("wikitext-2-raw/NOTICE.txt", "wikitext-2-raw/LICENSE-CC-BY-SA-3.0.txt",
                   "wikitext-2-raw/LICENSE-GFDL-1.3.txt", "tinyshakespeare/NOTICE.txt"):
        assert (REPO / "data" / notice).stat().st_size > 500, notice


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (not editable) into a directory of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("toolchain-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    return tmp / "site"


def _in_wheel_install(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("TOOLCHAIN_DATA", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_wheel_carries_every_subpackage(wheel_install):
    """setup.py finds the packages: a new format or method folder ships without a line in any list."""
    on_disk = {p.parent.relative_to(REPO) for p in (REPO / "toolchain").rglob("__init__.py")}
    missing = sorted(str(p) for p in on_disk if not (wheel_install / p / "__init__.py").is_file())
    assert len(on_disk) > 10 and not missing, missing


def test_wheel_carries_the_demo_profile_and_its_text(wheel_install, tmp_path):
    """From the wheel, outside any checkout: the default profile is the packaged one, and its `../data` lands on
    the packaged WikiText-2, byte for byte the repository's."""
    code = ("import json, toolchain; from toolchain.profile import default_profile_path, load; "
            "p = default_profile_path(); lp = load(p); "
            "print(json.dumps([toolchain.__file__, str(p), str(lp.resolve(lp.profile.validate_.accuracy.dataset))]))")
    r = _in_wheel_install(wheel_install, "-c", code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    module, profile, dataset = map(Path, json.loads(r.stdout))
    for path in (module, profile, dataset):
        assert path.is_relative_to(wheel_install), f"{path} is not from the wheel install {wheel_install}"
    assert dataset.read_bytes() == (REPO / "data" / "wikitext-2-raw" / "wiki.test.raw").read_bytes()


@needs_smollm2
def test_plan_with_no_profile_from_the_wheel_is_the_checkouts(wheel_install, tmp_path):
    """`toolchain plan` with no profile, run from the wheel, plans the same stages under the same keys (the keys
    hash the model, the recipe and the evaluation text's content) as the checkout's demo profile."""
    store = tmp_path / "store"
    r = _in_wheel_install(wheel_install, "-m", "toolchain", "plan", "--json", "--store", str(store), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from_wheel = {s["name"]: s["key"] for s in json.loads(r.stdout)["stages"]}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TOOLCHAIN_DATA", None)
    r = subprocess.run([sys.executable, "-m", "toolchain", "plan", str(REPO / "profiles" / "smollm2-int4.yaml"),
                        "--json", "--store", str(store)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert from_wheel == {s["name"]: s["key"] for s in json.loads(r.stdout)["stages"]}
    assert "validate:compressed-tensors" in from_wheel
