"""The Ray executor: the stage graph of every variant becomes Ray tasks on an existing cluster.

The client (this process) plans every variant, merges their stages by key (a stage two variants share runs once),
and submits a stage when the stages it depends on (its inputs and its `after` stages) are done; it never submits
a stage whose upstream failed, and one variant's failure leaves the others running. Each task asks for its
stage's resources: a CPU, memory scaled by the model, a GPU where the stage computes on CUDA, and for card-bound
stages (engine, speed) of a variant with a `card` axis the custom resource `accelerator_type:<card>`.

Artifacts never travel through Ray's object store: a task returns a small record (status, reason, seconds, node).
With `--cache oci://...` the workers keep a scratch store of their own (TOOLCHAIN_RAY_SCRATCH, default
<tmp>/toolchain-ray-store), pull their inputs from the registry, build under the usual lock into a temp dir,
commit atomically and push; the client then pulls each finished artifact into its own store, so it ends up with
what a local build would hold. Without --cache, the store itself must be a filesystem every node mounts at the same
path, and the workers build straight into it. A task whose worker dies, or that raises, is retried (`max_retries`);
Ctrl-C cancels every task in flight. Nothing half-written is ever an artifact: stores commit by rename, and the
registry tag of a stage is written after all its blobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, MissingToolError, ToolchainError
from ..plan import Plan, ref_name, ref_record
from ..progress import Reporter
from ..run import StageResult, _run_stage, _stored_result
from ..stage import Stage
from ..store import Store

INSTALL = "pip install 'toolchain[ray]'"
MiB = 2**20


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingToolError(f"--executor ray needs Ray, which is not installed here: {INSTALL} "
                               "(or pip install 'ray[default]'), then start or join a cluster (`ray start --head`)"
                               ) from None
    return ray


@dataclass
class Node:
    """One stage of the matrix: its key is shared by every variant listed."""

    stage: Stage
    plan: Plan  # the first variant's plan that holds it (model config, profile name)
    deps: set[str]
    variants: list[str] = field(default_factory=list)


def graph(plans: list[Plan]) -> dict[str, Node]:
    """Stages by key, in an order where each comes after what it depends on (each plan is in that order)."""
    nodes: dict[str, Node] = {}
    for plan in plans:
        by_name = {s.name: s.key for s in plan.stages}
        for s in plan.stages:
            deps = set(s.inputs.values()) | {by_name[a] for a in s.after if a in by_name}
            node = nodes.setdefault(s.key, Node(s, plan, set()))
            node.deps |= deps
            node.variants.append(plan.profile.profile.name)
    for node in nodes.values():
        node.deps &= nodes.keys()  # an input no variant plans (none today) is simply read from the store
    return nodes


def _needs_gpu(stage: Stage) -> bool:
    c = stage.config
    if stage.kind == "engine":
        return True
    if stage.kind == "quantize":
        return c.get("device") == "cuda"
    if stage.kind == "reference":
        return c.get("device") == "cuda"
    if stage.kind == "validate":
        return (c.get("scoring") or {}).get("device") == "cuda"
    if stage.kind == "speed":
        return (c.get("card") or {}).get("kind") == "cuda"
    return False


def resources(stage: Stage, model_config: dict[str, Any]) -> dict[str, Any]:
    """The Ray options of a stage's task: what it holds while it runs."""
    from .. import arch

    try:
        weights = arch.dense_params(model_config) * 4  # float32: what the loaders hold at most, whole
    except (KeyError, ValueError, TypeError):
        weights = 0
    memory = 256 * MiB if stage.kind == "publish" else max(512 * MiB, 2 * weights)
    opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if _needs_gpu(stage) else 0, "memory": int(memory)}
    card = stage.config.get("card_type")
    if card:
        opts["resources"] = {f"accelerator_type:{card}": 0.001}  # Ray's own convention for accelerator_type
    return opts


def pull(key: str, store: Store, remote: Any) -> bool:
    """The artifact of `key` into `store` from the registry cache (verified; atomic); False when it is not there."""
    if store.has(key):
        return True
    with store.lock(key):
        if store.has(key):
            return True
        tmp = store.new_tmp(key)
        if remote.fetch(key, store, tmp):
            return True
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def scratch_store() -> Store:
    return Store(os.environ.get("TOOLCHAIN_RAY_SCRATCH") or os.path.join(tempfile.gettempdir(), "toolchain-ray-store"))


def run_remote(stage: Stage, plan: Plan, cache: str | None, insecure: bool, shared: str | None) -> dict[str, Any]:
    """One stage on a worker (the body of a Ray task). Returns a small record, never the artifact."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    own = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == node_id), {})
    cards = sorted(k.split(":", 1)[1] for k in own if k.startswith("accelerator_type:"))
    node = f"{socket.gethostname()}/{node_id[:12]}" + (f" [{', '.join(cards)}]" if cards else "")
    where = {"node": node}
    store = Store(shared) if shared else scratch_store()
    remote = None
    if cache:
        from ..registry.cache import RemoteCache

        remote = RemoteCache(cache, insecure=insecure)
    try:
        if remote is not None:
            for role, k in stage.inputs.items():
                if not pull(k, store, remote):
                    raise RuntimeError(f"input {role} ({k[:12]}) is not in the cache {cache}")
        try:
            with store.building():
                r = _run_stage(stage, plan, store, Reporter(quiet=True), None, remote)
        except ToolchainError as e:  # the stage itself refused (bad recipe, missing tool): no retry helps
            return {**where, "status": "failed", "reason": str(e), "seconds": 0.0, "size": 0, "info": {}}
        if remote is not None and store.has(stage.key):
            errors = len(remote.errors)
            remote.push(stage.key, store)
            if len(remote.errors) > errors:  # the client could not get it: a failure, retried
                raise RuntimeError(remote.errors[-1])
    finally:
        if remote is not None:
            remote.close()
    return {**where, "status": r.status, "reason": r.reason, "seconds": r.seconds, "size": r.size, "info": r.info}


def _why(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # a RayTaskError wraps the task's own exception
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]


def execute(plans: list[Plan], store: Store, reporter: Reporter, cache: str | None = None, insecure: bool = False,
            address: str = "auto", max_retries: int = 2, remote: Any = None) -> list[list[StageResult]]:
    """Run every plan's stages on the Ray cluster at `address`; per plan, its results in plan order."""
    ray = ray_module()
    nodes = graph(plans)

    def waiting() -> None:
        reporter.info("  `toolchain gc` is running on this store; waiting for it")

    with store.building(on_wait=waiting):
        for plan in plans:  # the roots first, as a local build writes them
            store.write_ref(ref_name(plan.profile.profile.name, plan.source), ref_record(plan))
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"--address {address}: no Ray cluster to join ({e}); start one with `ray start --head` "
                             "or give its address, e.g. --address ray://HOST:10001") from None
        try:
            # Ray's driver prints retry notices ("(raylet) Task ... failed") from a thread on sys.stdout: stdout is
            # --json's, so they go to stderr with the progress.
            with contextlib.redirect_stdout(sys.stderr):
                done = _schedule(ray, nodes, store, reporter, cache, insecure, max_retries, remote)
        finally:
            ray.shutdown()
    return [[done[s.key] for s in plan.stages] for plan in plans]


def _schedule(ray: Any, nodes: dict[str, Node], store: Store, reporter: Reporter, cache: str | None,
              insecure: bool, max_retries: int, remote: Any) -> dict[str, StageResult]:
    task = ray.remote(run_remote)
    shared = None if cache else str(store.root)
    done: dict[str, StageResult] = {}
    blocked: dict[str, str] = {}  # key -> why what depends on it does not run
    flight: dict[Any, str] = {}  # ObjectRef -> key
    todo = list(nodes)

    def show(key: str, state: str) -> None:
        for v in nodes[key].variants:
            reporter.info(f"  {v} {nodes[key].stage.name}: {state}")

    def finish(key: str, r: StageResult) -> None:
        done[key] = r
        if r.status == "failed":
            blocked[key] = f"{r.name} failed"
        where = f" on {r.node}" if r.node else ""
        show(key, f"{r.status}{where}" + (f" ({r.reason})" if r.status in ("failed", "skipped") else ""))

    try:
        while todo or flight:
            for key in [k for k in todo if nodes[k].deps <= done.keys()]:
                todo.remove(key)
                node = nodes[key]
                s = node.stage
                why = next((blocked[d] for d in node.deps if d in blocked), None)
                if why is not None:
                    blocked[key] = why
                    finish(key, StageResult(s.name, key, "skipped", 0.0, why))
                elif s.skip_reason:
                    finish(key, StageResult(s.name, key, "skipped", 0.0, s.skip_reason))
                elif store.has(key):
                    finish(key, _stored_result(s, store, time.perf_counter(), "cached"))
                else:
                    opts = resources(s, node.plan.model_config)
                    ref = task.options(**opts, max_retries=max_retries, retry_exceptions=True,
                                       name=s.name).remote(s, node.plan, cache, insecure, shared)
                    flight[ref] = key
                    show(key, "queued" + (f" (needs {', '.join(opts.get('resources', {}))})"
                                          if opts.get("resources") else ""))
            if not flight:
                if todo:  # cannot happen with a graph built from plans; said rather than looping forever
                    raise RuntimeError(f"stages wait on each other: {', '.join(nodes[k].stage.name for k in todo)}")
                break
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=1.0)
            for ref in ready:
                key = flight.pop(ref)
                s = nodes[key].stage
                try:
                    out = ray.get(ref)
                except Exception as e:  # retries spent: the worker died each time, or the stage raised
                    finish(key, StageResult(s.name, key, "failed", 0.0, f"after {max_retries} retries: {_why(e)}"))
                    continue
                if out["status"] != "failed" or out.get("size"):  # an artifact exists (a failed gate is one too)
                    if remote is not None and not pull(key, store, remote):
                        out = {**out, "status": "failed", "reason": f"built on {out['node']} but not in the cache"}
                status = out["status"] if out["status"] in ("built", "cached", "failed") else "built"
                finish(key, StageResult(s.name, key, status, out["seconds"], out["reason"], out.get("size", 0),
                                        out.get("info", {}), out["node"]))
    except KeyboardInterrupt:
        for ref in flight:  # kill the workers: their temp dirs are never artifacts, their tags never written
            ray.cancel(ref, force=True)
        raise
    return done
