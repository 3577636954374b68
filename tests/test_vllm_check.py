"""The real-vLLM check (toolchain.runtimes.vllm_check, scripts/gpu_vllm.py): reading vLLM's prompt log-probabilities
into perplexity and top-1 tokens against an independent computation, the verdict's comparisons, the side-by-side
speed rows, and the deduplicated artifact transfer round trip. The check itself needs vLLM and a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from toolchain.runtimes import vllm_check as vc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_vllm  # noqa: E402

Logprob = namedtuple("Logprob", "logprob rank decoded_token")  # the fields of vllm.logprobs.Logprob we read


def vllm_like(window: list[int], logits: torch.Tensor) -> list[dict | None]:
    """What vLLM returns with prompt_logprobs=1: None, then per position the prompt token and the rank-1 token."""
    lp = torch.log_softmax(logits.double(), -1)
    out: list[dict | None] = [None]
    for pos in range(1, len(window)):
        row = lp[pos - 1]
        order = torch.argsort(row, descending=True)
        rank = {int(t): i + 1 for i, t in enumerate(order)}
        tok, best = window[pos], int(order[0])
        out.append({tok: Logprob(float(row[tok]), rank[tok], None), best: Logprob(float(row[best]), 1, None)})
    return out


def test_prompt_scores_match_an_independent_log_softmax():
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, 50, (40,), generator=g).tolist()
    logits = torch.randn(40, 50, generator=g) * 3
    nll, top1 = vc.prompt_scores(window, vllm_like(window, logits))
    ref = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(window[1:]), reduction="none")
    assert torch.allclose(torch.tensor(nll, dtype=torch.float64), ref, atol=1e-12)
    assert top1 == logits[:-1].argmax(-1).tolist()
    assert vc.perplexity(nll) == pytest.approx(math.exp(float(ref.mean())), rel=1e-12)


def test_prompt_scores_refuse_what_cannot_be_scored():
    window = [1, 2, 3]
    with pytest.raises(ValueError, match="entries for a 3-token window"):
        vc.prompt_scores(window, [None, {2: Logprob(-1.0, 1, None)}])
    with pytest.raises(ValueError, match="no log-probability for the prompt token 3"):
        vc.prompt_scores(window, [None, {2: Logprob(-1.0, 1, None)}, {7: Logprob(-0.1, 1, None)}])
    with pytest.raises(ValueError, match="non-finite"):
        vc.prompt_scores(window, [None, {2: Logprob(-1.0, 1, None)}, {3: Logprob(float("nan"), 1, None)}])


def test_matching_prefix():
    assert vc.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert vc.matching_prefix([1, 2], [1, 2, 3]) == 2
    assert vc.matching_prefix([], [1]) == 0


EXPECT = {"name": "p/compressed-tensors", "rules_load": True,
          "validation": {"ppl": 20.0, "tokens": 100, "top1_agreement": 0.7}, "greedy": {"tokens": [5, 6, 7]}}


def test_verdict_gates_perplexity_at_the_tolerance():
    base = {"loaded": True, "quantization": "compressed-tensors", "dtype": "bfloat16", "tokens": 100,
            "greedy": [5, 6, 8], "top1_vs_reference": 0.69}
    ok = vc.verdict({**base, "ppl": 20.0 * 1.004}, EXPECT)
    assert ok["ok"] and ok["ppl_ok"] and ok["greedy_matching_prefix"] == 2 and ok["greedy_compared"] == 3
    assert ok["ppl_rel_diff"] == pytest.approx(0.004)
    far = vc.verdict({**base, "ppl": 20.0 * 0.994}, EXPECT)
    assert not far["ok"] and not far["ppl_ok"]
    fewer = vc.verdict({**base, "ppl": 20.0, "tokens": 99}, EXPECT)  # other windows than ours: not comparable
    assert not fewer["ok"] and not fewer["tokens_match"]


def test_verdict_on_a_refusal_agrees_or_disagrees_with_the_rules():
    refused = {"loaded": False, "error": "ValueError: no"}
    assert not vc.verdict(refused, EXPECT)["ok"]  # the rules said it loads: a rule to fix
    v = vc.verdict(refused, {**EXPECT, "rules_load": False})
    assert v["ok"] and v["rules_agree"] and v["error"] == "ValueError: no"
    loaded = vc.verdict({"loaded": True, "ppl": 20.0, "tokens": 100}, {**EXPECT, "rules_load": False})
    assert not loaded["rules_agree"] and not loaded["ok"]  # loads what the rules refuse: a rule to fix


def test_speed_rows_pair_vllm_with_the_builtin_runtime():
    doc = {"vllm": {"int4-g128": {"quantization": "compressed-tensors", "per_batch": [
               {"batch_size": 1, "decode_tok_s": 200.0, "ttft_ms": 10.0},
               {"batch_size": 16, "decode_tok_s": 2400.0, "ttft_ms": 30.0}]}},
           "builtin": {"modes": {"int4-g128": {"per_batch": [
               {"batch_size": 1, "decode_tok_s": 300.0, "ttft_ms": 50.0}]}}}}
    rows = gpu_vllm.speed_rows(doc)
    assert [(r["batch"], r["ours_over_vllm"]) for r in rows] == [(1, 1.5), (16, None)]


def test_artifact_pool_round_trip(tmp_path):
    """Two artifacts sharing tensors travel as one pool and come back tensor for tensor (sha256 checked)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(64, 8, generator=g)
    arts = {}
    for i, dtype in enumerate((torch.bfloat16, torch.float8_e4m3fn)):
        art = tmp_path / f"a{i}"
        art.mkdir()
        tensors = {"embed.weight": shared, "q.weight": torch.randn(8, 8, generator=g).to(dtype),
                   "q.packed": torch.randint(-2**31, 2**31 - 1, (8, 1), generator=g, dtype=torch.int32)}
        save_file(tensors, str(art / "model.safetensors"), metadata={"format": "pt"})
        (art / "config.json").write_text(json.dumps({"i": i}))
        (art / "tokenizer.json").write_text("{}")
        if i == 1:  # a GGUF-like file holding the shared tensor's bytes verbatim between headers
            (art / "model.gguf").write_bytes(b"GGUF" + bytes(range(200)) + shared.numpy().tobytes() + b"tail")
        (art / "manifest.json").write_text("{}")
        arts[art.name] = tensors
        gpu_vllm.pool_artifact(art, tmp_path / "prep" / "pool", tmp_path / "prep" / "recipes" / f"{art.name}.json",
                               min_shared=256)
    assert len(list((tmp_path / "prep" / "pool" / "t").iterdir())) == 5  # the shared embedding once
    # tokenizer.json once, no manifest; the GGUF as its head and tail around the pooled embedding
    assert len(list((tmp_path / "prep" / "pool" / "f").iterdir())) == 5
    segments = json.loads((tmp_path / "prep" / "recipes" / "a1.json").read_text())["segmented"]["model.gguf"]
    assert [k for k, _d in segments["segments"]] == ["f", "t", "f"]
    gpu_vllm.rebuild_artifacts(tmp_path / "prep")
    for name, tensors in arts.items():
        back = load_file(str(tmp_path / "prep" / "art" / name / "model.safetensors"))
        assert set(back) == set(tensors)
        for k, t in tensors.items():
            assert back[k].dtype == t.dtype and torch.equal(back[k].view(torch.uint8), t.view(torch.uint8))
        assert json.loads((tmp_path / "prep" / "art" / name / "config.json").read_text()) == {"i": int(name[1])}
    gguf = (tmp_path / "a1" / "model.gguf").read_bytes()
    assert (tmp_path / "prep" / "art" / "a1" / "model.gguf").read_bytes() == gguf
    gpu_vllm.rebuild_artifacts(tmp_path / "prep")  # rebuilt ones are not redone
    # a corrupted pool entry is caught by its sha256
    shutil.rmtree(tmp_path / "prep" / "art")
    victim = next((tmp_path / "prep" / "pool" / "t").iterdir())
    save_file({"t": torch.zeros(1)}, str(victim))
    with pytest.raises(SystemExit, match="sha256"):
        gpu_vllm.rebuild_artifacts(tmp_path / "prep")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the GPU machine gets it "
                    "from scripts/gpu_vllm.py bundle / device-install)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_loads_a_prepared_artifact():
    import os

    prep = os.environ.get("TOOLCHAIN_VLLM_PREP")
    if not prep:
        pytest.skip("set TOOLCHAIN_VLLM_PREP to a folder made by scripts/gpu_vllm.py prepare (and rebuilt)")
    expect = json.loads(next((Path(prep) / "expect").glob("*.json")).read_text())
    res = vc.check_artifact(expect, Path(prep))
    v = vc.verdict(res, expect)
    assert v["rules_agree"], v
    if v["loaded"]:
        assert v["ppl_ok"] and v["tokens_match"], v


class _FakeVLLM:
    """A stand-in for the vllm package (LLM, SamplingParams, inputs.TokensPrompt) over a bigram model: the logits
    after token t are W[t]. It answers generate() as vLLM does (prompt_logprobs with the prompt token and the rank-1
    token; greedy token_ids), so check_artifact's plumbing runs on the CPU."""

    def __init__(self, vocab: int = 30, seed: int = 0):
        import types

        self.W = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        fake = self
        self.kwargs: dict = {}

        class SamplingParams:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class LLM:
            def __init__(self, model, **kw):
                fake.kwargs = kw
                if "refuse" in model:
                    raise ValueError("Unsupported quantization config: bits=4, sym=False")
                cfg = types.SimpleNamespace(quantization="compressed-tensors", dtype=torch.bfloat16)
                self.llm_engine = types.SimpleNamespace(model_config=cfg)

            def generate(self, prompts, sp, use_tqdm=False):
                outs = []
                for p in prompts:
                    ids = p["prompt_token_ids"]
                    lp = vllm_like(ids, fake.W[torch.tensor(ids)]) if getattr(sp, "prompt_logprobs", None) else None
                    gen = list(ids)
                    for _ in range(sp.max_tokens):
                        gen.append(int(fake.W[gen[-1]].argmax()))
                    outs.append(types.SimpleNamespace(prompt_logprobs=lp, outputs=[
                        types.SimpleNamespace(token_ids=gen[len(ids):])]))
                return outs

        self.module = types.ModuleType("vllm")
        self.module.__version__ = "0.0-fake"
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.module.inputs = types.ModuleType("vllm.inputs")
        self.module.inputs.TokensPrompt = dict


def test_check_artifact_plumbing_against_a_stand_in_vllm(monkeypatch, tmp_path):
    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", fake.module.inputs)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 30, (12,), generator=g).tolist() for _ in range(2)]
    firsts = [1, 5]  # the second window scores positions 5.. only, as a strided validation would
    nll = []
    for w, f in zip(windows, firsts, strict=True):
        ce = torch.nn.functional.cross_entropy(fake.W[torch.tensor(w[:-1])].double(), torch.tensor(w[1:]),
                                               reduction="none")
        nll += ce[f - 1:].tolist()
    ppl = math.exp(sum(nll) / len(nll))
    greedy = [3]
    for _ in range(vc.GREEDY_TOKENS):
        greedy.append(int(fake.W[greedy[-1]].argmax()))
    expect = {"name": "x/compressed-tensors", "model": "art/x", "tokenizer": None, "rules_load": True,
              "validation": {"ppl": ppl, "tokens": len(nll), "top1_agreement": 0.5},
              "windows": windows, "first_scored": firsts, "ref_top1": [0] * len(nll),
              "prompt": [3], "greedy": {"tokens": greedy[1:]}}
    res = vc.check_artifact(expect, tmp_path)
    assert fake.kwargs["skip_tokenizer_init"] and fake.kwargs["max_model_len"] >= 12
    assert res["loaded"] and res["tokens"] == len(nll) and res["ppl"] == pytest.approx(ppl, rel=1e-9)
    assert res["quantization"] == "compressed-tensors" and res["dtype"] == "bfloat16"
    v = vc.verdict(res, expect)
    assert v["ok"] and v["greedy_matching_prefix"] == vc.GREEDY_TOKENS
    refused = vc.check_artifact({**expect, "model": "art/refuse"}, tmp_path)
    assert not refused["loaded"] and "sym=False" in refused["error"]
    assert vc.verdict(refused, {**expect, "rules_load": False})["ok"]
