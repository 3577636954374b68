#!/usr/bin/env python3
"""How long a models x recipes x cards matrix takes on N GPU nodes per card type, from measured per-stage times.

The stage graph is the one `toolchain build --executor ray` runs (toolchain/executors/ray.py): per model one
source and one reference; per model x recipe one quantize, and per target one export and one validate; per
model x recipe x card one engine (TensorRT-LLM targets) and one speed stage, which only a node of that card runs.
Stages shared by variants run once. Every stage takes one GPU of a node (the heavy ones use it; the others are
counted as holding it, a pessimistic bound), and moves its inputs from and its output to the registry cache at the
measured push/pull rates. Scheduling: longest remaining path first (what a FIFO scheduler on a graph this
shallow comes close to). Prints, for 1..max nodes per card, the matrix's wall time, and the fewest nodes that
finish within the deadline.

    python scripts/simulate_matrix.py                       # 4 models x 3 recipes x 2 cards, 1 h
    python scripts/simulate_matrix.py --models 8 --recipes 4 --cards 3 --deadline-min 60 --json

Every figure comes from BENCHMARKS.md (named below) or is marked ASSUMED with its reasoning; --times FILE (JSON of
the same keys) replaces them with your cluster's own (from `toolchain build --json`: stages[].seconds).
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import dataclass, field

# Seconds per stage for a 7B Llama (synthetic Llama-2-7B shape, bf16) and bytes each writes.
TIMES = {
    # BENCHMARKS.md, "Half-precision sources and validation on the GPU": one H200, 32 layers, from the manifests.
    "source": 50.1,
    "quantize:rtn": 9.4,
    "export": 33.1,
    "validate": 27.6,
    # ASSUMED: GPTQ/AWQ on a 7B were not measured on a GPU here. On SmolLM2-135M on the CPU they took 271 s and
    # 352 s (BENCHMARKS.md, "Quantizers on SmolLM2-135M"); layer-by-layer calibration on one GPU of a 7B is taken
    # as 15 and 20 minutes (the order peers report), to be replaced by a measurement.
    "quantize:gptq": 900.0,
    "quantize:awq": 1200.0,
    # ASSUMED: the reference on a real 7B checkpoint streams the model block by block as validate does: taken as
    # validate's 27.6 s (BENCHMARKS.md does not time a 7B reference: the synthetic source skips it).
    "reference": 27.6,
    # ASSUMED from BENCHMARKS.md, "Speed on the target GPU": one timed generation per batch size takes well under a
    # second at 186-3000 tok/s; the stage's time is dominated by loading and compiling, taken as 120 s.
    "speed": 120.0,
    # ASSUMED: a TensorRT-LLM engine build of a 7B INT4 checkpoint, 10 minutes (never run here: no trtllm-build).
    "engine": 600.0,
}
SIZES = {  # bytes written by each stage for a 7B (BENCHMARKS.md: the bf16 source 13.5 GB; INT4 g128 ~3.9 GB)
    "source": 13.5e9, "quantize": 3.9e9, "export": 3.9e9, "validate": 1e6, "reference": 50e6, "speed": 1e5,
    "engine": 4.0e9,
}
# BENCHMARKS.md, "OCI push and pull of a 2 GiB artifact": 132 MiB/s push, 91 MiB/s pull (loopback registry, one
# disk). A cluster's registry on a 25 Gb/s network with object storage behind it is usually faster; these bound it.
PUSH_BPS, PULL_BPS = 132 * 2**20, 91 * 2**20
RECIPES = ["rtn", "gptq", "awq", "rtn-fp8", "gptq-g64", "awq-g64"]  # a recipe is named by its quantize kind first


@dataclass(order=True)
class Task:
    priority: float
    name: str = field(compare=False)
    seconds: float = field(compare=False)
    card: str | None = field(compare=False)  # None: any node
    deps: list[str] = field(compare=False, default_factory=list)


def stage_graph(models: int, recipes: int, cards: int, targets: int, engine: bool) -> dict[str, Task]:
    def io(kind: str, inputs: list[str]) -> float:
        pulled = sum(SIZES[i.split(":")[0].split("/")[-1]] for i in inputs)
        return pulled / PULL_BPS + SIZES[kind] / PUSH_BPS

    g: dict[str, Task] = {}

    def add(name: str, kind: str, seconds: float, deps: list[str], card: str | None = None) -> None:
        g[name] = Task(0.0, name, seconds + io(kind, [d.rsplit("/", 1)[-1] for d in deps]), card, deps)

    for m in range(models):
        add(f"m{m}/source", "source", TIMES["source"], [])
        add(f"m{m}/reference", "reference", TIMES["reference"], [f"m{m}/source"])
        for r in range(recipes):
            method = RECIPES[r % len(RECIPES)].split("-")[0]
            q = f"m{m}/r{r}/quantize"
            add(q, "quantize", TIMES[f"quantize:{method}"], [f"m{m}/source"])
            for t in range(targets):
                e = f"m{m}/r{r}/t{t}/export"
                add(e, "export", TIMES["export"], [q])
                add(f"m{m}/r{r}/t{t}/validate", "validate", TIMES["validate"], [e, q, f"m{m}/reference"])
            for c in range(cards):
                after = [f"m{m}/r{r}/t0/validate"]
                if engine:
                    add(f"m{m}/r{r}/c{c}/engine", "engine", TIMES["engine"], [f"m{m}/r{r}/t0/export"], f"card{c}")
                    after.append(f"m{m}/r{r}/c{c}/engine")
                add(f"m{m}/r{r}/c{c}/speed", "speed", TIMES["speed"], [f"m{m}/r{r}/t0/export", *after], f"card{c}")
    # priority: the longest path from a task to the end (critical path first)
    children: dict[str, list[str]] = {n: [] for n in g}
    for t in g.values():
        for d in t.deps:
            children[d].append(t.name)
    memo: dict[str, float] = {}

    def tail(n: str) -> float:
        if n not in memo:
            memo[n] = g[n].seconds + max((tail(c) for c in children[n]), default=0.0)
        return memo[n]

    for t in g.values():
        t.priority = -tail(t.name)
    return g


def simulate(g: dict[str, Task], cards: int, nodes_per_card: int) -> float:
    """Makespan with `nodes_per_card` one-GPU nodes of each card type (a card-free stage takes any node)."""
    free = {f"card{c}": nodes_per_card for c in range(cards)}
    done_at: dict[str, float] = {}
    waiting = dict(g)
    running: list[tuple[float, str, str]] = []  # (finish, task, card of the node it holds)
    now = 0.0
    while waiting or running:
        ready = sorted(t for t in waiting.values() if all(d in done_at for d in t.deps))
        for t in ready:
            options = [t.card] if t.card else sorted(free, key=lambda c: -free[c])
            card = next((c for c in options if free[c] > 0), None)
            if card is None:
                continue
            free[card] -= 1
            del waiting[t.name]
            heapq.heappush(running, (now + t.seconds, t.name, card))
        if not running:
            raise RuntimeError("no node can run the waiting stages")
        now, name, card = heapq.heappop(running)
        done_at[name] = now
        free[card] += 1
    return now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--recipes", type=int, default=3)
    ap.add_argument("--cards", type=int, default=2)
    ap.add_argument("--targets", type=int, default=1, help="export targets per recipe (the first is timed)")
    ap.add_argument("--engine", action="store_true", help="a TensorRT-LLM engine per recipe x card")
    ap.add_argument("--deadline-min", type=float, default=60)
    ap.add_argument("--max-nodes", type=int, default=16, help="nodes per card type to try")
    ap.add_argument("--times", help="JSON file replacing per-stage seconds (same keys as TIMES)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.times:
        TIMES.update(json.load(open(a.times)))
    g = stage_graph(a.models, a.recipes, a.cards, a.targets, a.engine)
    rows = [{"nodes_per_card": n, "gpus": n * a.cards, "wall_min": round(simulate(g, a.cards, n) / 60, 1)}
            for n in range(1, a.max_nodes + 1)]
    fit = next((r for r in rows if r["wall_min"] <= a.deadline_min), None)
    serial = sum(t.seconds for t in g.values()) / 60
    doc = {"matrix": f"{a.models} models x {a.recipes} recipes x {a.cards} cards", "stages": len(g),
           "serial_min": round(serial, 1), "critical_path_min": round(-min(t.priority for t in g.values()) / 60, 1),
           "rows": rows, "fewest_nodes_per_card_within_deadline": fit and fit["nodes_per_card"]}
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{doc['matrix']}: {len(g)} stages, {doc['serial_min']} min of stage time in all, critical path "
          f"{doc['critical_path_min']} min")
    for r in rows:
        mark = " <= deadline" if r["wall_min"] <= a.deadline_min else ""
        print(f"  {r['nodes_per_card']:>3} node(s) per card ({r['gpus']:>3} GPUs): {r['wall_min']:>7.1f} min{mark}")
    print(f"fewest nodes per card within {a.deadline_min:g} min: {doc['fewest_nodes_per_card_within_deadline']}")


if __name__ == "__main__":
    main()
