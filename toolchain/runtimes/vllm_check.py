"""The real vLLM on our artifacts: does `LLM(model=dir)` load it, which quantization method did it pick, what
does it generate greedily, and what perplexity does it give on the windows our validation scored.

Two halves. The pure half (no torch, no vLLM; tested on the CPU) reads vLLM's outputs into numbers and compares
them with what we expect: `prompt_scores` turns `RequestOutput.prompt_logprobs` into NLL and top-1 tokens,
`verdict` compares one artifact's vLLM result with our validation's. The device half (`check_artifact`, run by
`python -m toolchain.runtimes.vllm_check` in a fresh process per artifact) drives vLLM.

An expectation (one JSON per artifact, written by scripts/gpu_vllm.py from the build's manifests):
  name, model (a directory, or a .gguf file), tokenizer (a directory or null), format, rules_load (what
  toolchain.runtimes.rules says vLLM does: true / false), validation {ppl, top1_agreement, tokens}, windows (the
  token ids of each window, exactly as our validation cut them), first_scored (per window, the first position our
  validation scored in it), ref_top1 (the fp32 reference's argmax at
  each scored position), prompt (token ids) and greedy (our model's greedy continuation, with how it was made).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PPL_TOLERANCE = 0.005  # relative: vLLM's perplexity within 0.5% of our validation's (issue 30)
GREEDY_TOKENS = 32


# -- the pure half ----------------------------------------------------------------------------------------------

def _logprob(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry["logprob"])


def _rank(entry: Any) -> int | None:
    r = entry.rank if hasattr(entry, "rank") else entry.get("rank")
    return None if r is None else int(r)


def prompt_scores(window: Sequence[int], prompt_logprobs: Sequence[Mapping[int, Any] | None]
                  ) -> tuple[list[float], list[int]]:
    """(NLL of each token from position 1 on, the top-1 token predicted there) from one window's
    `prompt_logprobs` (vLLM: None for position 0, then {token id: Logprob(logprob, rank, ...)} holding the prompt
    token and the top-k; with prompt_logprobs=1 that is the prompt token and the rank-1 token)."""
    if len(prompt_logprobs) != len(window):
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for a {len(window)}-token window")
    nll, top1 = [], []
    for pos in range(1, len(window)):
        entries = prompt_logprobs[pos]
        if not entries or window[pos] not in entries:
            raise ValueError(f"position {pos}: no log-probability for the prompt token {window[pos]}")
        lp = _logprob(entries[window[pos]])
        if not math.isfinite(lp):
            raise ValueError(f"position {pos}: non-finite log-probability {lp}")
        nll.append(-lp)
        best = [t for t, e in entries.items() if _rank(e) == 1]
        top1.append(int(best[0]) if best else max(entries, key=lambda t: _logprob(entries[t])))
    return nll, top1


def perplexity(nll: Sequence[float]) -> float:
    mean = sum(nll) / len(nll)
    return math.inf if mean > 709 else math.exp(mean)


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def verdict(result: dict[str, Any], expect: dict[str, Any], tolerance: float = PPL_TOLERANCE) -> dict[str, Any]:
    """One artifact: vLLM's load, perplexity and greedy tokens against our rules and validation."""
    out: dict[str, Any] = {"name": expect["name"], "loaded": result.get("loaded", False),
                           "rules_load": expect.get("rules_load")}
    out["rules_agree"] = out["rules_load"] is None or out["loaded"] == out["rules_load"]
    if not out["loaded"]:
        out["error"] = result.get("error")
        out["ok"] = out["rules_agree"] and out["rules_load"] is False
        return out
    ours = expect["validation"]["ppl"]
    rel = result["ppl"] / ours - 1
    want = expect.get("greedy", {}).get("tokens") or []
    prefix = matching_prefix(result.get("greedy", []), want)
    out |= {"quantization": result.get("quantization"), "dtype": result.get("dtype"),
            "ppl_vllm": result["ppl"], "ppl_ours": ours, "ppl_rel_diff": rel, "ppl_tolerance": tolerance,
            "ppl_ok": abs(rel) <= tolerance, "tokens_scored": result["tokens"],
            "tokens_ours": expect["validation"].get("tokens"),
            "top1_vs_reference_vllm": result.get("top1_vs_reference"),
            "top1_vs_reference_ours": expect["validation"].get("top1_agreement"),
            "greedy_matching_prefix": prefix, "greedy_compared": min(len(want), GREEDY_TOKENS)}
    out["tokens_match"] = out["tokens_scored"] == out["tokens_ours"]
    out["ok"] = out["rules_agree"] and out["ppl_ok"] and out["tokens_match"]
    return out


# -- the device half ----------------------------------------------------------------------------------------------

def engine_facts(llm: Any) -> dict[str, Any]:
    """The quantization method and dtype vLLM settled on (read from its model config)."""
    engine = llm.llm_engine
    mc = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    return {"quantization": mc.quantization, "dtype": str(mc.dtype).removeprefix("torch.")}


def check_artifact(expect: dict[str, Any], base: Path, eager: bool = True, dtype: str = "auto") -> dict[str, Any]:
    """Load one artifact in vLLM, generate greedily from the prompt, score the windows. Exceptions at load are the
    refusal (recorded, not raised)."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = str(base / expect["model"])
    kw: dict[str, Any] = {"max_model_len": max(len(w) for w in expect["windows"]) + 8, "enforce_eager": eager,
                          "gpu_memory_utilization": 0.5, "seed": 0, "skip_tokenizer_init": True, "dtype": dtype}
    if expect.get("tokenizer"):
        kw["tokenizer"] = str(base / expect["tokenizer"])
    res: dict[str, Any] = {"name": expect["name"], "vllm": vllm.__version__, "model": expect["model"]}
    t0 = time.perf_counter()
    try:
        llm = LLM(model=model, **kw)
    except Exception as e:  # noqa: BLE001  (the refusal is the finding)
        import traceback

        res |= {"loaded": False, "error": f"{type(e).__name__}: {e}"[-2000:],
                "traceback": traceback.format_exc()[-4000:]}
        return res
    res |= {"loaded": True, "load_s": time.perf_counter() - t0, **engine_facts(llm)}
    greedy = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, min_tokens=GREEDY_TOKENS, ignore_eos=True,
                            detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=expect["prompt"])], greedy, use_tqdm=False)
    res["greedy"] = list(out[0].outputs[0].token_ids)
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in expect["windows"]], scoring, use_tqdm=False)
    nll, top1 = [], []
    firsts = expect.get("first_scored") or [1] * len(expect["windows"])
    for w, first, o in zip(expect["windows"], firsts, outs, strict=True):
        n, t = prompt_scores(w, o.prompt_logprobs)
        nll += n[first - 1:]  # entry i predicts position i + 1; our validation scored positions first.. only
        top1 += t[first - 1:]
    ref = expect.get("ref_top1")
    res |= {"ppl": perplexity(nll), "tokens": len(nll),
            "top1_vs_reference": (sum(a == b for a, b in zip(top1, ref, strict=True)) / len(ref)) if ref else None}
    return res


def main(argv: list[str] | None = None) -> int:
    """python -m toolchain.runtimes.vllm_check EXPECT.json BASE OUT.json [DTYPE]: one artifact, one process (vLLM
    holds the GPU until its process ends). DTYPE is vLLM's dtype argument (default auto)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (3, 4):
        print("usage: python -m toolchain.runtimes.vllm_check EXPECT.json BASE_DIR OUT.json [DTYPE]", file=sys.stderr)
        return 2
    expect = json.loads(Path(args[0]).read_text())
    res = check_artifact(expect, Path(args[1]), dtype=args[3] if len(args) == 4 else "auto")
    res["verdict"] = verdict(res, expect)
    Path(args[2]).write_text(json.dumps(res, indent=1))
    v = res["verdict"]
    print(json.dumps({k: v.get(k) for k in ("name", "loaded", "quantization", "ppl_vllm", "ppl_ours", "ppl_rel_diff",
                                            "greedy_matching_prefix", "ok")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
