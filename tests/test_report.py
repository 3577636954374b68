"""`toolchain report`: the HTML (opened in headless Chromium: charts render with the right number of bars, no
console errors, nothing fetched) and the Markdown. The store here is written by the test: two profiles' refs and
manifests in the shape the stages write (accuracy, gates, a speed stage, per-layer errors), so every section
renders without a GPU or a model; the figures in it are test inputs, not measurements."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from toolchain.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _key(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def _commit(store: Store, key: str, manifest: dict, payload: bytes = b"x" * 2048) -> None:
    with store.lock(key):
        tmp = store.new_tmp(key)
        (tmp / "model.safetensors").write_bytes(payload)
        store.commit(tmp, key, {"created_unix": 1_800_000_000, "tool_versions": {"toolchain": "0.1.0",
                                                                                "torch": "2.13.0"}, **manifest})


def _validation(ppl: float, kl: float, top1: float) -> dict:
    return {"dataset": "/data/wikitext-2-raw/wiki.test.raw", "seq_len": 2048, "stride": 2048, "tokens": 8188,
            "tokenizer": "SmolLM2", "protocol": "ppl-windows-v1/kl-top1024+tail", "reference_ppl": 20.0, "ppl": ppl,
            "ppl_increase_pct": 100 * (ppl / 20.0 - 1), "kl_mean": kl, "top1_agreement": top1, "runtime": "hf"}


GATES = {"max_ppl_increase_pct": 60, "max_kl": 0.5, "min_top1_agreement": 0.6}
RUNTIMES = [{"runtime": "vllm", "version": "main", "loads": True, "rules": []},
            {"runtime": "sglang", "version": "main", "loads": False,
             "rules": [{"effect": "refuses", "says": "requires symmetric weights", "fix": "set symmetric: true",
                        "id": "r1", "source": "s"}]}]
SPEED = {"runtime": "builtin", "runtime_version": "v5", "copy_bandwidth_gbs": 3000.0,
         "card": {"name": "NVIDIA H100", "driver": "570", "kind": "cuda"},
         "per_batch": [{"batch_size": 1, "ttft_ms": 5.0, "prefill_tok_s": 25600.0, "decode_tok_s": 900.0,
                        "itl_ms_p50": 1.1, "itl_ms_p99": 1.3, "itl_ms_mean": 1.11, "step_bytes": 1.0e8,
                        "effective_bandwidth_gbs": 90.0, "bandwidth_ratio": 0.03},
                       {"batch_size": 16, "ttft_ms": 30.0, "prefill_tok_s": 68000.0, "decode_tok_s": 9000.0,
                        "itl_ms_p50": 1.7, "itl_ms_p99": 2.2, "itl_ms_mean": 1.78, "step_bytes": 1.2e8,
                        "effective_bandwidth_gbs": 67.0, "bandwidth_ratio": 0.02}]}


def write_store(root: Path) -> Store:
    """int4 (two targets, one failing its KL gate, 25 layers of weight error) and fp8 (one target, timed)."""
    store = Store(root)
    builds = {"int4": [("compressed-tensors", (23.1, 0.21, 0.81)), ("gguf", (24.0, 0.62, 0.74))],
              "fp8": [("compressed-tensors", (20.4, 0.02, 0.95))]}
    for name, targets in builds.items():
        src, ref, q = _key(name, "source"), _key(name, "reference"), _key(name, "quantize")
        stages = [{"name": "source", "key": src, "material": {}}, {"name": "quantize", "key": q, "material": {}},
                  {"name": "reference", "key": ref, "material": {}}]
        _commit(store, src, {"stage": "source", "status": "ok", "reason": "", "inputs": {}, "config": {}})
        layers = [{"layer": f"model.layers.{i}.mlp.down_proj", "rel_err": 0.01 * (i + 1)} for i in range(25)]
        _commit(store, q, {"stage": "quantize", "status": "ok", "reason": "", "inputs": {"source": src},
                           "config": {"method": name == "fp8" and "fp8" or "rtn", "bits": 8 if name == "fp8" else 4},
                           "info": {"layer_errors": layers} if name == "int4" else {}})
        _commit(store, ref, {"stage": "reference", "status": "ok", "reason": "", "inputs": {"source": src},
                             "config": {}, "info": {"ppl": 20.0, "tokens": 8188}})
        for label, (ppl, kl, top1) in targets:
            e, v = _key(name, label, "export"), _key(name, label, "validate")
            passed = kl <= GATES["max_kl"]
            _commit(store, e, {"stage": f"export:{label}", "status": "ok", "reason": "", "inputs": {"quantize": q},
                               "config": {"format": label}, "runtimes": RUNTIMES})
            _commit(store, v, {"stage": f"validate:{label}", "status": "ok" if passed else "failed",
                               "reason": "all gates passed" if passed else f"gate failed: KL {kl} > max 0.5",
                               "inputs": {"export": e}, "config": {"gates": GATES},
                               "info": {"validation": _validation(ppl, kl, top1), "passed": passed}})
            stages += [{"name": f"export:{label}", "key": e, "material": {"config": {"format": label}}},
                       {"name": f"validate:{label}", "key": v, "material": {}}]
            if name == "fp8":
                s = _key(name, label, "speed")
                _commit(store, s, {"stage": f"speed:{label}", "status": "ok", "reason": "all speed gates passed",
                                   "inputs": {"export": e}, "config": {"gates": {"min_decode_tok_s": 100}},
                                   "info": {"speed": SPEED}})
                stages.append({"name": f"speed:{label}", "key": s, "material": {}})
        store.write_ref(name, {"profile": name, "source": "SmolLM2-135M", "stages": stages})
    return store


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    write_store(d / "store")
    r = run_cli("report", "int4", "fp8", "--store", str(d / "store"), "-o", str(d / "report.html"),
                "--markdown", str(d / "report.md"))
    assert r.returncode == 0, r.stderr
    assert f"wrote {d / 'report.html'}" in r.stdout
    return d


def test_markdown_has_gates_accuracy_speed_runtimes_and_provenance(report_files):
    md = (report_files / "report.md").read_text()
    assert "| int4 | gguf | gguf | failed | gate failed: KL 0.62 > max 0.5 |" in md
    assert "| max_kl | kl_mean | 0.62 | <= | 0.5 | **fail** |" in md
    assert "| min_top1_agreement | top1_agreement | 0.95 | >= | 0.6 | pass |" in md
    assert "| min_decode_tok_s (batch 16) | decode_tok_s | 9000 | >= | 100 | pass |" in md
    assert "| 16 | 9000.0 | 68000 | 30.0 | 1.70 | 2.20 | 67 | 400000 |" in md  # roofline 16*3000e9/1.2e8
    assert "| sglang | main | **no** | requires symmetric weights (fix: set symmetric: true) |" in md
    assert "| reference | 20.000 |" in md and "model.layers.24.mlp.down_proj" in md
    assert "model.layers.4.mlp.down_proj" not in md  # only the largest 20 of 25 layers
    assert "Dataset protocol: dataset /data/wikitext-2-raw/wiki.test.raw, tokens 8188" in md
    assert md.index("## int4") < md.index("## fp8")  # in the order asked


def test_report_to_stdout_json_and_unknown_profile(report_files):
    st = str(report_files / "store")
    md = run_cli("report", "fp8", "--store", st, "--markdown", "-")
    assert md.returncode == 0 and md.stdout.startswith("# toolchain report: fp8") and "int4" not in md.stdout
    doc = json.loads(run_cli("report", "--store", st, "--json").stdout)
    assert [b["profile"] for b in doc["builds"]] == ["fp8", "int4"]
    bad = run_cli("report", "nope", "--store", st)
    assert bad.returncode == 2 and "nope: no build of this profile" in bad.stderr


def test_html_is_self_contained(report_files):
    html = (report_files / "report.html").read_text()
    assert "<script" not in html and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert html.count('class="chart"') == 5  # ppl, KL, top-1, int4's layers, fp8's speed


PROBE = """
import json, sys
from playwright.sync_api import sync_playwright
html, png = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path=sys.argv[3], args=["--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = b.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: r.url.startswith("file:") or requests.append(r.url))
    page.goto("file://" + html)
    charts = page.evaluate('''() => [...document.querySelectorAll("svg.chart")].map(s => {
        const box = s.getBoundingClientRect();
        const bars = [...s.querySelectorAll("rect.bar")].map(r => r.getBBox().width);
        return {id: s.id, width: box.width, height: box.height, bars: bars.length,
                drawn: bars.filter(w => w > 0).length};
    })''')
    page.screenshot(path=png, full_page=True)
    b.close()
print(json.dumps({"charts": charts, "errors": errors, "requests": requests}))
"""


def browser_skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no Chromium: apt-get install -y chromium (scripts/setup test installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "no playwright: pip install playwright (scripts/setup test installs it)"
    return None


def open_in_chromium(html: Path, png: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(html), str(png), CHROMIUM], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason()))
def test_report_renders_in_headless_chromium(report_files):
    seen = open_in_chromium(report_files / "report.html", report_files / "report.png")
    assert seen["errors"] == [] and seen["requests"] == []
    charts = {c["id"]: c for c in seen["charts"]}
    expected = {"chart-ppl": 3, "chart-kl": 3, "chart-top1": 3, "chart-layers-int4": 20,
                "chart-speed-fp8-compressed-tensors": 2}
    assert {k: charts[k]["bars"] for k in expected} == expected
    for c in charts.values():
        assert c["width"] > 100 and c["height"] > 50 and c["drawn"] == c["bars"], c
    assert (report_files / "report.png").stat().st_size > 10_000


def test_ci_example_runs_the_report(tmp_path):
    """examples/ci's workflow writes the HTML report and the job summary with `toolchain report`."""
    import yaml

    workflow = yaml.safe_load((REPO / "examples" / "ci" / "build-and-publish.yml").read_text())
    step = next(s for s in workflow["jobs"]["build"]["steps"] if s.get("name") == "HTML and Markdown report")
    cmd = next(line for line in step["run"].splitlines() if line.strip().startswith("toolchain report"))
    write_store(tmp_path / "store")
    env = {"PROFILE": "int4", "TOOLCHAIN_STORE": str(tmp_path / "store")}
    r = subprocess.run(["bash", "-c", cmd.replace("toolchain ", f"{sys.executable} -m toolchain ", 1)],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report.html").stat().st_size > 0 and "## int4" in (tmp_path / "report-full.md").read_text()


def test_quantize_records_per_layer_error_checked_in_float64(tmp_path):
    """The per-layer error the report charts: the quantize stage's figure for each layer against numpy float64
    arithmetic on the IR's codes and scales and the source's weights (asymmetric INT4 groups of 32)."""
    import numpy as np
    from conftest import tiny_profile, write_profile

    from toolchain.ir import IRReader, TensorReader

    profile = write_profile(tmp_path, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 32,
                                                             "symmetric": False}))
    doc = json.loads(run_cli("build", str(profile), "--store", str(tmp_path / "st"), "--json", "-q").stdout)
    store = Store(tmp_path / "st")
    src, q = (next(s["key"] for s in doc["stages"] if s["name"] == n) for n in ("source", "quantize"))
    errors = {e["layer"]: e["rel_err"] for e in store.manifest(q)["info"]["layer_errors"]}
    ir, weights = IRReader(store.object_dir(q)), TensorReader(store.object_dir(src))
    assert set(errors) == set(ir.layers) and len(errors) == 14
    for name in ir.layers:
        t = ir.tensors
        codes = t.get(f"{name}.codes").double().numpy()
        scale, zero = t.get(f"{name}.scale").double().numpy(), t.get(f"{name}.zero").double().numpy()
        g = np.arange(codes.shape[1]) // 32
        w_hat = (codes - zero[:, g]) * scale[:, g]
        w = weights.get(f"{name}.weight").double().numpy()
        want = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
        assert errors[name] == pytest.approx(want, rel=1e-5), name
        assert 0.01 < want < 0.5  # INT4 on random weights: a real, non-zero error
    md = run_cli("report", "--store", str(tmp_path / "st"), "--markdown", "-").stdout
    worst = max(errors, key=errors.get)
    assert "largest per-layer relative weight error" in md and f"| {worst} | {errors[worst]:.3g} |" in md
