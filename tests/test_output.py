"""Output for people and CI logs (issue 27): results on stdout, progress on stderr, plain lines outside a terminal.
Every check goes through real pipes and redirections in a shell, as a user or a CI job runs the CLI."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import tiny_profile, write_profile

TC = f"{shlex.quote(sys.executable)} -m toolchain"


def sh(cmd: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny profile built once, its whole output (stdout and stderr) redirected into one file."""
    d = tmp_path_factory.mktemp("out")
    write_profile(d, tiny_profile())
    r = sh(f"{TC} build profile.yaml --store store > build.log 2>&1", d)
    assert r.returncode == 0, (d / "build.log").read_text()
    return d


def test_build_log_has_stage_lines_and_no_control_characters(built):
    log = (built / "build.log").read_text()
    for stage in ("source", "quantize", "export:compressed-tensors", "validate:compressed-tensors"):
        assert f"{stage}: start (never built)" in log, log
        assert f"{stage}: built in " in log, log
    assert "\x1b" not in log and "\r" not in log
    # a path is one line however long: not wrapped at 80 columns outside a terminal
    path = next(line for line in log.splitlines() if line.startswith("compressed-tensors: built -> "))
    assert path.split(" -> ", 1)[1].endswith(tuple("0123456789abcdef")) and len(path) > 80


def test_quiet_prints_nothing_on_success_and_the_error_on_bad_input(built):
    r = sh(f"{TC} build profile.yaml --store store -q > quiet.log 2>&1", built)
    assert r.returncode == 0 and (built / "quiet.log").read_text() == ""
    r = sh(f"{TC} build missing.yaml --store store -q > quiet.log 2>&1", built)
    log = (built / "quiet.log").read_text()
    assert r.returncode == 2 and log.startswith("error: profile") and len(log.splitlines()) == 1, log


def test_results_go_to_stdout_through_pipes(built):
    r = sh(f"{TC} plan profile.yaml --store store > plan.txt", built)
    assert r.returncode == 0, r.stderr
    plan = (built / "plan.txt").read_text()
    assert "plan for tiny" in plan and "cached" in plan and "\x1b" not in plan
    r = sh(f"{TC} build profile.yaml --store store --json | jq -e .ok", built)
    assert r.returncode == 0 and r.stdout.strip() == "true", r.stderr
    r = sh(f"{TC} build missing.yaml --store store --json 2>/dev/null | jq -e .ok", built)
    assert r.returncode != 0 and r.stdout.strip() == "false"  # an error document says ok: false too
    r = sh(f"{TC} build profile.yaml --store store --json 2>/dev/null | jq -r '.targets[0].verdict'", built)
    assert r.stdout.strip() == "pass", r.stderr
    r = sh(f"{TC} ls --store store | grep tiny", built)
    assert r.returncode == 0 and "compressed-tensors" in r.stdout, r.stderr
    r = sh(f"{TC} build profile.yaml --store store | grep 'validate:compressed-tensors'", built)
    assert r.returncode == 0 and "cached" in r.stdout and "pass:" in r.stdout, r.stderr + r.stdout
    assert "validate:compressed-tensors: cached" in r.stderr  # the progress line stayed on stderr


def test_summary_says_built_cached_and_verdict_not_the_rebuild_reason(built):
    doc = json.loads(sh(f"{TC} build profile.yaml --store store --json -q", built).stdout)
    assert doc["ok"] is True and doc["exit_code"] == 0
    assert {s["status"] for s in doc["stages"]} == {"cached"}
    assert doc["targets"][0]["verdict"] == "pass" and doc["targets"][0]["verdict_reason"] != "cached"
    text = sh(f"{TC} build profile.yaml --store store", built).stdout
    assert "never built" not in text and "config" not in text


PROBE = """
import sys, time
from tqdm import tqdm
from toolchain.progress import Reporter
r = Reporter(quiet=sys.argv[1] == "q")
with r.running("reference", "never built"):
    with r.task("scoring windows", total=4) as t:
        for _ in range(4):
            t.advance(); time.sleep(0.3)
    for _ in tqdm(range(3), desc="Applying quantization config", disable=False):
        time.sleep(0.4)
r.finished("reference", "built", 2.4)
"""


def test_heartbeat_lines_and_third_party_bars_become_our_lines(tmp_path):
    env = {"TOOLCHAIN_PROGRESS_INTERVAL": "0.2"}
    r = sh(f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)} v > probe.log 2>&1", tmp_path, env)
    log = (tmp_path / "probe.log").read_text()
    assert r.returncode == 0, log
    assert "\r" not in log and "\x1b" not in log
    assert log.splitlines()[0] == "reference: start (never built)"
    assert any(line.startswith("  reference: scoring windows ") and "/4 (" in line for line in log.splitlines())
    assert any("Applying quantization config " in line and "/3 (" in line for line in log.splitlines()), log
    assert log.splitlines()[-1] == "reference: built in 2.4 s"
    r = sh(f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)} q > probe.log 2>&1", tmp_path, env)
    assert r.returncode == 0 and (tmp_path / "probe.log").read_text() == ""


def test_help_shows_every_new_command_and_option(cli):
    top = cli("--help").output
    for command in ("rm", "export", "report", "ls", "inspect"):
        assert f"  {command} " in top, top
    expected = {"build": ["--force [STAGE]", "--json", "-q, --quiet"],
                "ls": ["--all", "--profile", "--format", "--failed", "--json"],
                "rm": ["KEY|PROFILE", "--force", "--dry-run", "--json"],
                "export": ["KEY|PROFILE DIRECTORY", "--copy", "--json"],
                "report": ["[PROFILE]...", "-o, --output FILE.html", "--markdown FILE.md", "--json"],
                "plan": ["--json"]}
    for command, options in expected.items():
        r = cli(command, "--help")
        assert r.exit_code == 0
        for option in options:
            assert option in r.output, (command, option, r.output)
