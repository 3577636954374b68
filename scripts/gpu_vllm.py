#!/usr/bin/env python
"""The real vLLM on the GPU machine (issue 30): build a slim vLLM bundle here, prepare our artifacts and what we
expect of them, cut both into chunks a device call can carry, and on the device install vLLM, check every
artifact (toolchain.runtimes.vllm_check) and time vLLM beside our built-in runtime on a synthetic Llama-2-7B.

Here (CPU, network):
  python scripts/gpu_vllm.py bundle --version 0.23.0 --out W/bundle       # scripts/vllm-bundle/make-bundle.sh
  python scripts/gpu_vllm.py prepare --store S --out W/prep REF...        # REF: profile[:target], from S's refs
  python scripts/gpu_vllm.py pack W/bundle W/prep --out W/calls           # W/calls/cNN/, each <= --chunk MiB
On the device (one call per W/calls/cNN, carried as .gpu/vllm/cNN while the machine stays warm):
  python3 scripts/gpu_vllm.py device-receive .gpu/vllm/cNN               # moves the pieces to /tmp/vllm-recv
  python3 scripts/gpu_vllm.py device-install                             # joins, unpacks, pip --target
  python3 scripts/gpu_vllm.py device-check --out $OUT                     # every prepared artifact, one process each
  python3 scripts/gpu_vllm.py device-speed --out $OUT                     # vLLM vs built-in, synthetic 7B
The next vLLM version is `bundle --version X` (with scripts/vllm-bundle/requirements-vllm-X.txt).

Artifacts travel deduplicated: every tensor of every safetensors file goes into one pool keyed by the sha256 of
its bytes (the embedding and norms, the same in every artifact of one source, travel once), the other files by
their sha256 too; on the device each artifact is rebuilt tensor for tensor and each tensor's sha256 checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECV = Path("/tmp/vllm-recv")  # device: pieces received so far (outlive the repo copy while the machine is warm)
WORK = Path("/tmp/vllm-work")  # device: the unpacked bundle and artifacts
SITE = Path("/tmp/vsite")  # device: vLLM and the wheels, layered on the image's torch by PYTHONPATH
RESULTS = Path("/tmp/vllm-results")  # device: per-artifact and per-engine documents (combined into $OUT)
PROMPT = "The capital of France is Paris. The capital of Germany is"


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- here: the bundle -------------------------------------------------------------------------------------------

def cmd_bundle(a: argparse.Namespace) -> int:
    script = REPO / "scripts" / "vllm-bundle" / "make-bundle.sh"
    return subprocess.call(["bash", str(script), a.out, a.version])


# -- here: artifacts and expectations ---------------------------------------------------------------------------

def stage_keys(store: Any, profile: str) -> dict[str, str]:
    ref = store.read_ref(profile)
    if ref is None:
        raise SystemExit(f"no build of {profile} in {store.root}: run `toolchain build` first")
    return {s["name"]: s["key"] for s in ref["stages"]}


def scored_windows(src_dir: Path, protocol: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """Our validation's windows (token ids) and, per window, its first scored position within the window."""
    from toolchain.validate.accuracy import tokenize, windows

    ids, _ = tokenize(src_dir, Path(protocol["dataset"]), protocol["tokens_cut"])
    spans = list(windows(len(ids), protocol["seq_len"], protocol["stride"]))
    return [ids[b:e].tolist() for b, e, _f in spans], [f - b for b, _e, f in spans]


def greedy_ours(ir_dir: Path, prompt: list[int], n: int) -> list[int]:
    """Our dequantized model (the IR through the block-streamed runner, float32 on the CPU), greedy."""
    import functools

    import torch

    from toolchain.validate.fidelity import ir_weights
    from toolchain.validate.streamed import StreamedModel

    cfg = json.loads((ir_dir / "config.json").read_text())
    weights = functools.lru_cache(maxsize=None)(ir_weights(ir_dir))
    ids = list(prompt)
    for _ in range(n):
        model = StreamedModel(cfg, weights, "cpu", "float32", torch.float32)
        model.run([torch.tensor(ids)])
        ids.append(int(model.window_logits(0)[-1].argmax()))
    return ids[len(prompt):]


def cmd_prepare(a: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from toolchain.runtimes.rules import judge, recipe_facts
    from toolchain.store import Store
    store = Store(a.store)
    out = Path(a.out)
    (out / "expect").mkdir(parents=True, exist_ok=True)
    greedy_cache: dict[str, list[int]] = {}
    for spec in a.refs:
        profile, _, only = spec.partition(":")
        keys = stage_keys(store, profile)
        src = store.object_dir(keys["source"])
        prompt = tokenize_prompt(src)
        for name, key in keys.items():
            if not name.startswith("export:") or (only and name != f"export:{only}"):
                continue
            fmt = name.split(":", 1)[1]
            if not store.has(key) or not store.has(keys[f"validate:{fmt}"]):
                log(f"{profile}/{fmt}: not built and validated in {store.root}; skipped")
                continue
            vman = store.manifest(keys[f"validate:{fmt}"])
            val = vman["info"]["validation"]
            qcfg = next(s["material"]["config"] for s in store.read_ref(profile)["stages"] if s["name"] == "quantize")
            art = store.object_dir(key)
            ref = load_file(str(store.object_dir(keys["reference"]) / "reference.safetensors"))
            wins, firsts = windows_for(src, val, len(ref["targets"]))
            targets = [t for w, f in zip(wins, firsts, strict=True) for t in w[f:]]
            if targets != ref["targets"].tolist():
                raise SystemExit(f"{profile} {fmt}: the windows cut here do not give the reference's targets")
            ir = store.object_dir(keys["quantize"])
            if ir.name not in greedy_cache:
                log(f"{profile}: our greedy continuation ({a.greedy} tokens, IR {ir.name[:12]})")
                greedy_cache[ir.name] = greedy_ours(ir, prompt, a.greedy)
            model_file = next(iter(art.glob("*.gguf")), None)
            label = f"{profile}/{fmt}"
            rules_load = vllm_rules_verdict(qcfg, fmt, json.loads((src / "config.json").read_text()),
                                            judge, recipe_facts)
            expect = {
                "name": label, "format": fmt, "store_key": key, "profile": profile,
                "model": f"art/{key[:16]}" + (f"/{model_file.name}" if model_file else ""),
                "tokenizer": f"art/{key[:16]}" if model_file else None,
                "quantize": qcfg, "rules_load": rules_load,
                "validation": {k: val[k] for k in ("ppl", "top1_agreement", "tokens", "reference_ppl", "runtime")},
                "windows": wins, "first_scored": firsts, "ref_top1": ref["top_idx"][:, 0].tolist(),
                "prompt_text": PROMPT, "prompt": prompt,
                "greedy": {"tokens": greedy_cache[ir.name],
                           "how": "our IR dequantized, toolchain block-streamed runner, float32, CPU, greedy"},
            }
            (out / "expect" / f"{key[:16]}.json").write_text(json.dumps(expect))
            pool_artifact(art, out / "pool", out / "recipes" / f"{key[:16]}.json")
            log(f"{label}: {key[:16]} (rules say vLLM loads it: {rules_load}), validation ppl {val['ppl']:.4f} "
                f"over {val['tokens']} tokens")
    return 0


def tokenize_prompt(src: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)(PROMPT, add_special_tokens=False).input_ids


def windows_for(src: Path, val: dict[str, Any], n_targets: int) -> tuple[list[list[int]], list[int]]:
    """The smallest cut of the text whose windows score as many tokens as the reference holds (validation cut the
    text at max_tokens; the manifests record the tokens scored, not the cut)."""
    from toolchain.validate.accuracy import windows

    protocol = {"dataset": val["dataset"], "seq_len": val["seq_len"], "stride": val["stride"]}
    for extra in range(0, val["seq_len"] + 1):
        cut = n_targets + extra
        if sum(e - f for _b, e, f in windows(cut, val["seq_len"], val["stride"])) == n_targets:
            return scored_windows(src, {**protocol, "tokens_cut": cut})
    raise SystemExit("no text cut gives the reference's number of scored tokens")


def vllm_rules_verdict(qcfg: dict[str, Any], fmt: str, cfg: dict[str, Any], judge: Any, recipe_facts: Any
                       ) -> bool | None:
    """What toolchain.runtimes.rules says of vLLM for this artifact; None where the format is not for vLLM."""
    from types import SimpleNamespace

    q = SimpleNamespace(**{"symmetric": True, "strategy": "group", "group_size": None, "bits": None,
                           "ignore": [], **qcfg})
    for v in judge(fmt, recipe_facts(q, fmt, {}, cfg)):
        if v["runtime"] == "vllm":
            return bool(v["loads"])
    return None


def tensor_bytes(t: Any) -> bytes:
    import torch

    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def pool_artifact(art: Path, pool: Path, recipe_path: Path, min_shared: int = 1 << 20) -> None:
    """Every tensor of the artifact's safetensors files into pool/t/<sha256>, every other file into pool/f/; a
    large other file (a GGUF) as segments, where a pooled tensor's bytes appear in it verbatim (the float32
    embedding of a GGUF is the safetensors one) it refers to that tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (pool / "t").mkdir(parents=True, exist_ok=True)
    (pool / "f").mkdir(parents=True, exist_ok=True)
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe: dict[str, Any] = {"files": {}, "safetensors": {}, "segmented": {}}
    for p in sorted(art.iterdir()):
        if p.name == "manifest.json":
            continue
        if p.suffix == ".safetensors":
            tensors = {}
            with safe_open(str(p), "pt") as f:
                meta = f.metadata()
                for name in f.keys():
                    t = f.get_tensor(name)
                    digest = sha256(tensor_bytes(t))
                    if not (pool / "t" / digest).exists():
                        save_file({"t": t.contiguous()}, str(pool / "t" / digest))
                    tensors[name] = digest
            recipe["safetensors"][p.name] = {"metadata": meta, "tensors": tensors}
        elif p.stat().st_size > 8 * min_shared:
            recipe["segmented"][p.name] = segment_file(p.read_bytes(), pool, min_shared)
        else:
            digest = sha256(p.read_bytes())
            if not (pool / "f" / digest).exists():
                shutil.copyfile(p, pool / "f" / digest)
            recipe["files"][p.name] = digest
    recipe_path.write_text(json.dumps(recipe, indent=1))


def segment_file(data: bytes, pool: Path, min_shared: int) -> dict[str, Any]:
    """A file as [["t", digest] | ["f", digest], ...]: the pooled tensors found in it verbatim, raw bytes between."""
    from safetensors import safe_open

    hits = []
    for tp in (pool / "t").iterdir():
        if tp.stat().st_size < min_shared:
            continue
        with safe_open(str(tp), "pt") as f:
            b = tensor_bytes(f.get_tensor("t"))
        i = data.find(b[:4096])
        if i >= 0 and data[i:i + len(b)] == b:
            hits.append((i, len(b), tp.name))
    segments, pos = [], 0
    for i, n, digest in sorted(hits):
        if i < pos:
            continue
        if i > pos:
            segments.append(["f", put_raw(data[pos:i], pool)])
        segments.append(["t", digest])
        pos = i + n
    if pos < len(data):
        segments.append(["f", put_raw(data[pos:], pool)])
    return {"sha256": sha256(data), "segments": segments}


def put_raw(b: bytes, pool: Path) -> str:
    digest = sha256(b)
    if not (pool / "f" / digest).exists():
        (pool / "f" / digest).write_bytes(b)
    return digest


# -- here: chunks -----------------------------------------------------------------------------------------------

def prepared_groups(prep: Path, first: list[str] | None) -> list[list[str]]:
    """The prepared folder's files (relative to its parent) in two groups: the artifacts whose names hold one of
    `first` (their expectations, recipes and pool entries), then the rest; one group when `first` is empty."""
    def files_of(stem: str) -> list[str]:
        recipe = json.loads((prep / "recipes" / f"{stem}.json").read_text())
        pool = [f"pool/f/{d}" for d in recipe["files"].values()] + \
               [f"pool/t/{d}" for spec in recipe["safetensors"].values() for d in spec["tensors"].values()] + \
               [f"pool/{kind}/{d}" for spec in recipe.get("segmented", {}).values() for kind, d in spec["segments"]]
        return [f"expect/{stem}.json", f"recipes/{stem}.json", *pool]

    everything = sorted(str(p.relative_to(prep)) for p in prep.rglob("*") if p.is_file())
    if not first:
        return [[f"{prep.name}/{f}" for f in everything]]
    core: list[str] = []
    for e in sorted((prep / "expect").glob("*.json")):
        if any(s in json.loads(e.read_text())["name"] for s in first):
            core += [f for f in files_of(e.stem) if f not in core]
    rest = [f for f in everything if f not in set(core)]
    return [[f"{prep.name}/{f}" for f in g] for g in (core, rest) if g]


def cmd_pack(a: argparse.Namespace) -> int:
    """The bundle's parts, then tars of the prepared folder (the --first artifacts before the rest), cut into
    pieces that fill chunk folders of at most --chunk MiB; c00/index-NAME.json lists each stream's pieces in order
    (the device reads every index-*.json it received: a later pack with another --name adds artifacts)."""
    prep = Path(a.prepared or ".").resolve()
    calls = Path(a.out)
    shutil.rmtree(calls, ignore_errors=True)
    calls.mkdir(parents=True)
    bundle = sorted(Path(a.bundle).glob("vllm-*.tar.part*")) if a.bundle != "-" else []
    streams: dict[str, list[Path]] = {}
    for p in bundle:
        streams.setdefault(p.name.rsplit(".part", 1)[0], []).append(p)
    groups = prepared_groups(prep, a.first) if a.prepared else []
    if a.sent:  # files an earlier pack already carried (the same relative path holds the same bytes: sha256 names)
        groups = [[f for f in g if not (Path(a.sent) / Path(f).relative_to(prep.name)).exists()] for g in groups]
    for i, group in enumerate(g for g in groups if g):
        data = calls.parent / f"{a.name}-{i}.tar"  # not compressed: packed INT4 codes and floats gain little
        listing = calls.parent / f"{a.name}-{i}.list"
        listing.write_text("\n".join(group) + "\n")
        subprocess.check_call(["tar", "cf", str(data), "-C", str(prep.parent), "--transform", f"s,^{prep.name}/,prep/,",
                               "-T", str(listing)])  # unpacked as prep/ on the device, whatever its name here
        streams[data.name] = [data]
    limit = int(a.chunk * 2**20)
    chunk, room, index = 0, limit, {}
    for stream, parts in streams.items():
        piece = 0
        for p in parts:
            size, off = p.stat().st_size, 0
            while off < size:
                if room == 0:
                    chunk, room = chunk + 1, limit
                n = min(room, size - off)
                d = calls / f"c{chunk:02d}"
                d.mkdir(exist_ok=True)
                with open(p, "rb") as src, open(d / f"{stream}.{piece:03d}", "wb") as dst:
                    src.seek(off)
                    dst.write(src.read(n))
                index.setdefault(stream, []).append(f"{stream}.{piece:03d}")
                piece, off, room = piece + 1, off + n, room - n
    (calls / "c00" / f"index-{a.name}.json").write_text(json.dumps(index))
    for d in sorted(calls.iterdir()):
        log(f"{d.name}: {sum(f.stat().st_size for f in d.iterdir()) / 2**20:.1f} MiB "
            f"({', '.join(sorted(f.name for f in d.iterdir()))})")
    return 0


# -- device: receive, install ------------------------------------------------------------------------------------

def cmd_device_receive(a: argparse.Namespace) -> int:
    RECV.mkdir(parents=True, exist_ok=True)
    for p in Path(a.dir).iterdir():
        shutil.move(str(p), RECV / p.name)
    have = sorted(p.name for p in RECV.iterdir())
    log(f"received {len(have)} pieces, {sum((RECV / n).stat().st_size for n in have) / 2**20:.0f} MiB so far")
    return 0


def cmd_device_install(a: argparse.Namespace) -> int:
    """Unpack every stream whose pieces have all arrived (once each), install the wheels, rebuild the artifacts
    whose pool entries are there. Safe to run again as more pieces arrive."""
    index = {k: v for p in sorted(RECV.glob("index-*.json")) for k, v in json.loads(p.read_text()).items()}
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for stream, names in index.items():
        done = WORK / f".{stream}.done"
        if done.exists():
            continue
        missing = [n for n in names if not (RECV / n).exists()]
        if missing:
            log(f"{stream}: waiting for {len(missing)} of {len(names)} pieces")
            continue
        subprocess.check_call(f"cat {' '.join(str(RECV / n) for n in names)} | tar xf - -C {WORK}", shell=True)
        for n in names:
            (RECV / n).unlink()
        done.touch()
        log(f"{stream}: unpacked")
    wheels = sorted(str(p) for p in (WORK / "whl").glob("*.whl"))
    if wheels and not (SITE / "vllm").exists():
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--target", str(SITE), *wheels])
        log(f"installed {len(wheels)} wheels (vLLM among them) into {SITE} in {time.perf_counter() - t0:.1f} s")
    if (WORK / "prep").is_dir():
        rebuild_artifacts(WORK / "prep")
    return 0


def rebuild_artifacts(prep: Path) -> None:
    """Each artifact from the pool, each tensor's sha256 checked against the recipe."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for recipe_path in sorted((prep / "recipes").glob("*.json")):
        recipe = json.loads(recipe_path.read_text())
        out = prep / "art" / recipe_path.stem
        if (out / ".rebuilt").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        for name, digest in recipe["files"].items():
            shutil.copyfile(prep / "pool" / "f" / digest, out / name)
        for name, spec in recipe["safetensors"].items():
            tensors = {}
            for tname, digest in spec["tensors"].items():
                with safe_open(str(prep / "pool" / "t" / digest), "pt") as f:
                    t = f.get_tensor("t")
                got = sha256(tensor_bytes(t))
                if got != digest:
                    raise SystemExit(f"{recipe_path.stem}/{name}:{tname}: sha256 {got} != {digest}")
                tensors[tname] = t
            save_file(tensors, str(out / name), metadata=spec["metadata"])
        for name, spec in recipe.get("segmented", {}).items():
            with open(out / name, "wb") as f:
                for kind, digest in spec["segments"]:
                    if kind == "f":
                        f.write((prep / "pool" / "f" / digest).read_bytes())
                    else:
                        with safe_open(str(prep / "pool" / "t" / digest), "pt") as t:
                            f.write(tensor_bytes(t.get_tensor("t")))
            got = sha256((out / name).read_bytes())
            if got != spec["sha256"]:
                raise SystemExit(f"{recipe_path.stem}/{name}: sha256 {got} != {spec['sha256']}")
        (out / ".rebuilt").touch()
        log(f"rebuilt {out.name}: {len(recipe['files'])} files, "
            f"{sum(len(s['tensors']) for s in recipe['safetensors'].values())} tensors, every sha256 checked")


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO)])
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- device: checks ----------------------------------------------------------------------------------------------

def cmd_device_check(a: argparse.Namespace) -> int:
    prep = WORK / "prep"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in sorted((prep / "expect").glob("*.json")):
        if a.only and not any(s in json.loads(e.read_text())["name"] for s in a.only):
            continue
        res = RESULTS / f"check-{e.stem}-{a.dtype}.json"  # $OUT brings back 8 files at most: they are combined
        log(f"== {e.stem}")
        t0 = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-m", "toolchain.runtimes.vllm_check", str(e), str(prep), str(res),
                            a.dtype], env=vllm_env(), timeout=a.timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"   timed out after {a.timeout} s")
        if res.exists():
            rows.append(json.loads(res.read_text()))
        log(f"   {time.perf_counter() - t0:.0f} s")
    (out / f"vllm_checks-{a.dtype}.json").write_text(json.dumps(rows, indent=1))
    print_checks(rows)
    return 0


def print_checks(rows: list[dict[str, Any]]) -> None:
    log("| artifact | rules: vLLM loads | vLLM loaded | quantization | dtype | ppl vLLM | ppl ours | diff | "
        "greedy prefix | ok |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["verdict"]
        if not v["loaded"]:
            log(f"| {v['name']} | {v['rules_load']} | no: {str(v.get('error'))[:120]} | | | | | | | {v['ok']} |")
            continue
        log(f"| {v['name']} | {v['rules_load']} | yes | {v['quantization']} | {v['dtype']} | {v['ppl_vllm']:.4f} | "
            f"{v['ppl_ours']:.4f} | {100 * v['ppl_rel_diff']:+.3f}% | {v['greedy_matching_prefix']}/"
            f"{v['greedy_compared']} | {v['ok']} |")


# -- device: speed -----------------------------------------------------------------------------------------------

def write_synthetic(mode: str, arch_name: str, dest: Path) -> None:
    """The synthetic Llama-2-7B of scripts/bench_gpu.py (same seed, same packing) written as a checkpoint."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu

    from toolchain import arch

    cfg = arch.synthetic_config(arch_name, None, "bfloat16")
    tensors = bench_gpu.packed_checkpoint(bench_gpu.synthetic_state(cfg), cfg, mode)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    qc = bench_gpu.quantization_config(mode)
    if qc:
        qc = {**qc, "ignore": ["lm_head"]}
    conf = {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            **({"quantization_config": qc} if qc else {})}
    (dest / "config.json").write_text(json.dumps(conf, indent=1))
    del tensors
    torch.cuda.empty_cache()


def vllm_speed(model: str, batches: list[int], input_len: int, output_len: int, iterations: int) -> dict[str, Any]:
    """vLLM's offline engine as its users run it (torch.compile + CUDA graphs, defaults), timed as the speed
    stage's adapter times `vllm bench latency`: whole generations of 1 and of output_len tokens, a decode step
    being (whole - first) / (output_len - 1) (toolchain.runtimes.external.vllm_figures)."""
    import random
    import statistics

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from toolchain.runtimes.external import vllm_figures
    from toolchain.runtimes.vllm_check import engine_facts

    t0 = time.perf_counter()
    llm = LLM(model=model, skip_tokenizer_init=True, max_model_len=input_len + output_len + 16,
              gpu_memory_utilization=0.85, enable_prefix_caching=False, seed=0, max_num_seqs=max(batches))
    doc: dict[str, Any] = {"vllm": vllm.__version__, "startup_s": time.perf_counter() - t0, **engine_facts(llm),
                           "per_batch": []}
    rng = random.Random(0)
    for b in batches:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 32000) for _ in range(input_len)])
                   for _ in range(b)]
        runs: dict[int, list[float]] = {}
        for n in (1, output_len):
            sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
            llm.generate(prompts, sp, use_tqdm=False)  # warm-up
            times = []
            for _ in range(iterations):
                t = time.perf_counter()
                llm.generate(prompts, sp, use_tqdm=False)
                times.append(time.perf_counter() - t)
            runs[n] = times
        ttft, steps = vllm_figures(runs[1], runs[output_len], output_len)
        step = statistics.median(steps)
        doc["per_batch"].append({"batch_size": b, "ttft_ms": ttft, "itl_ms": step, "decode_tok_s": b / (step / 1e3),
                                 "whole_s": runs[output_len], "first_s": runs[1]})
        log(f"  vLLM batch {b}: decode {b / (step / 1e3):.1f} tok/s (step {step:.3f} ms), TTFT {ttft:.1f} ms")
    return doc


def cmd_device_speed(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    doc: dict[str, Any] = {"settings": {"arch": a.arch, "batch_sizes": batches, "input_len": a.input_len,
                                        "output_len": a.output_len, "iterations": a.iterations}, "vllm": {}}
    for mode in a.modes.split(","):
        ckpt = Path(f"/tmp/synthetic-{mode}")
        if not (ckpt / "config.json").exists():
            t0 = time.perf_counter()
            subprocess.check_call([sys.executable, __file__, "device-write", mode, a.arch, str(ckpt)], env=vllm_env())
            log(f"{mode}: synthetic checkpoint written in {time.perf_counter() - t0:.0f} s")
        res = RESULTS / f"vllm-speed-{mode}.json"
        try:
            r = subprocess.run([sys.executable, __file__, "device-vllm-speed", str(ckpt), str(res), a.batch_sizes,
                                str(a.input_len), str(a.output_len), str(a.iterations)], env=vllm_env(),
                               timeout=a.timeout)
            why = f"exit {r.returncode}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {a.timeout} s"
        doc["vllm"][mode] = json.loads(res.read_text()) if res.exists() else {"error": why}
        (out / "speed.json").write_text(json.dumps(doc, indent=1))
    if not a.skip_builtin:  # the built-in runtime, timed as scripts/bench_gpu.py times it, in the same call
        try:
            subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--skip-kernels", "--modes",
                            a.modes, "--batch-sizes", a.batch_sizes, "--input-len", str(a.input_len), "--output-len",
                            str(a.output_len), "--iterations", str(a.iterations), "--eager-tokens", "0",
                            "--out", str(RESULTS / "builtin.json")], env=vllm_env(), timeout=2 * a.timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"built-in runtime: timed out after {2 * a.timeout} s (what it wrote is kept)")
        if (RESULTS / "builtin.json").exists():
            doc["builtin"] = json.loads((RESULTS / "builtin.json").read_text())
    (out / "speed.json").write_text(json.dumps(doc, indent=1))
    print_speed(doc)
    return 0


def speed_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (mode, batch): vLLM's and our decode tok/s and their ratio, from device-speed's document."""
    rows = []
    ours = {m: {r["batch_size"]: r for r in d.get("per_batch", [])}
            for m, d in doc.get("builtin", {}).get("modes", {}).items()}
    for mode, v in doc["vllm"].items():
        for r in v.get("per_batch", []):
            b = r["batch_size"]
            o = ours.get(mode, {}).get(b)
            rows.append({"mode": mode, "batch": b, "vllm_tok_s": r["decode_tok_s"], "vllm_ttft_ms": r["ttft_ms"],
                         "quantization": v.get("quantization"),
                         "ours_tok_s": o["decode_tok_s"] if o else None, "ours_ttft_ms": o["ttft_ms"] if o else None,
                         "ours_over_vllm": o["decode_tok_s"] / r["decode_tok_s"] if o else None})
    return rows


def print_speed(doc: dict[str, Any]) -> None:
    log("| mode | batch | vLLM quantization | vLLM decode tok/s | ours decode tok/s | ours / vLLM | vLLM TTFT ms | "
        "ours TTFT ms |")
    log("|---|---|---|---|---|---|---|---|")
    for r in speed_rows(doc):
        fmt = (lambda x, f: "-" if x is None else format(x, f))  # noqa: E731
        log(f"| {r['mode']} | {r['batch']} | {r['quantization']} | {r['vllm_tok_s']:.1f} | "
            f"{fmt(r['ours_tok_s'], '.1f')} | {fmt(r['ours_over_vllm'], '.2f')} | {r['vllm_ttft_ms']:.1f} | "
            f"{fmt(r['ours_ttft_ms'], '.1f')} |")


def cmd_report(a: argparse.Namespace) -> int:
    """The tables of BENCHMARKS.md from the JSON documents a device call brought back."""
    for path in a.docs:
        doc = json.loads(Path(path).read_text())
        log(f"\n{path}:")
        if isinstance(doc, list):
            print_checks(doc)
        else:
            print_speed(doc)
    return 0


# -- main ----------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bundle")
    p.add_argument("--version", default="0.23.0")
    p.add_argument("--out", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--greedy", type=int, default=32)
    p.add_argument("refs", nargs="+")
    p = sub.add_parser("pack")
    p.add_argument("bundle", help="the bundle folder, or - for none (a later pack)")
    p.add_argument("prepared", nargs="?", help="a folder made by prepare (none: the bundle alone)")
    p.add_argument("--out", required=True)
    p.add_argument("--chunk", type=float, default=58.0, help="MiB per call (64 with the ~3.6 MiB tree and code)")
    p.add_argument("--first", nargs="*", help="artifact names (substrings) to send before the others")
    p.add_argument("--name", default="prepared", help="stream and index name (a later pack of more artifacts)")
    p.add_argument("--sent", help="a prepared folder an earlier pack carried: its files are not packed again")
    p = sub.add_parser("device-receive")
    p.add_argument("dir")
    sub.add_parser("device-install")
    p = sub.add_parser("device-check")
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--dtype", default="auto", help="vLLM's dtype (auto: bfloat16 for our float32 checkpoints)")
    p = sub.add_parser("device-speed")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="llama-2-7b")
    p.add_argument("--modes", default="int4-g128,fp8")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--timeout", type=int, default=200, help="seconds per vLLM engine (the built-in: twice)")
    p.add_argument("--skip-builtin", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("docs", nargs="+", help="vllm_checks-*.json / speed.json from device calls")
    p = sub.add_parser("device-write")  # internal: one synthetic checkpoint, in its own process
    p.add_argument("mode")
    p.add_argument("arch")
    p.add_argument("dest")
    p = sub.add_parser("device-vllm-speed")  # internal: one vLLM engine, in its own process
    for name in ("model", "out", "batch_sizes", "input_len", "output_len", "iterations"):
        p.add_argument(name)
    a = ap.parse_args()
    if a.cmd == "device-write":
        write_synthetic(a.mode, a.arch, Path(a.dest))
        return 0
    if a.cmd == "device-vllm-speed":
        doc = vllm_speed(a.model, [int(b) for b in a.batch_sizes.split(",")], int(a.input_len), int(a.output_len),
                         int(a.iterations))
        Path(a.out).write_text(json.dumps(doc, indent=1))
        return 0
    return {"bundle": cmd_bundle, "prepare": cmd_prepare, "report": cmd_report, "pack": cmd_pack,
            "device-receive": cmd_device_receive,
            "device-install": cmd_device_install, "device-check": cmd_device_check,
            "device-speed": cmd_device_speed}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
