"""The cached-build path never imports torch or transformers: planning, and a build whose every stage is in the
store, are seconds only while they stay out (importing torch alone takes seconds). Each check runs in a fresh
interpreter, so what other tests imported does not count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, needs_smollm2, needs_wikitext, tiny_profile, write_profile

HEAVY = ("torch", "transformers")

# Runs `toolchain <args>` in this interpreter, then prints which heavy modules it imported, as JSON, last.
PROBE = """
import json, sys
from toolchain.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def heavy_imports(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                       timeout=900, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_smollm2
@needs_wikitext
def test_planning_the_demo_imports_no_torch(tmp_path):
    assert heavy_imports("plan", str(REPO / "profiles" / "smollm2-int4.yaml"), "--store", str(tmp_path)) == []


def test_a_fully_cached_build_imports_no_torch(tmp_path):
    profile = write_profile(tmp_path, tiny_profile(targets=["compressed-tensors", "gguf"]))
    store = str(tmp_path / "store")
    built = subprocess.run([sys.executable, "-m", "toolchain", "build", str(profile), "--store", store, "-q"],
                           capture_output=True, text=True, timeout=900, cwd=REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    assert heavy_imports("build", str(profile), "--store", store, "-q") == []


@pytest.mark.slow
@needs_smollm2
@needs_wikitext
def test_a_fully_cached_build_of_the_demo_imports_no_torch(tmp_path):
    demo = str(REPO / "profiles" / "smollm2-int4.yaml")
    built = subprocess.run([sys.executable, "-m", "toolchain", "build", demo, "--store", str(tmp_path), "-q"],
                           capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    assert heavy_imports("build", demo, "--store", str(tmp_path), "-q") == []
