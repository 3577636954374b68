"""Execute a plan locally: each stage runs under its key's lock, into a temp dir, and is committed atomically.

A stage runner is `run(ctx) -> dict` (toolchain.stage: imported lazily, so a fully cached build never imports
torch). What it returns lands in the manifest; `{"status": "failed", ...}` marks a finished artifact that failed its
gate. A stage whose input or `after` stage failed or was skipped is skipped, with the reason: the graph decides.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import BuildError, ToolchainError
from .plan import Plan, explain, ref_name, ref_record
from .progress import Reporter
from .stage import Stage, StageContext, lib_versions, load_entry
from .store import Store


@dataclass
class StageResult:
    name: str
    key: str
    status: str  # built | cached | failed | skipped
    seconds: float
    reason: str
    size: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    node: str | None = None  # where it ran, under an executor that spreads stages (toolchain.executors.ray)


class PeakRSS:
    """Samples this process's RSS in a thread: the peak while one stage runs (ru_maxrss is process-lifetime)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _tool_versions() -> dict[str, Any]:
    import platform

    from . import __version__

    return {"toolchain": __version__, "python": platform.python_version(),
            **lib_versions(("torch", "transformers", "compressed-tensors", "safetensors", "gguf"))}


def _stored_result(stage: Stage, store: Store, t0: float, reason: str) -> StageResult:
    """A finished artifact as this build's result: a failed gate stays a failure, whoever built it."""
    m = store.manifest(stage.key)
    failed = m.get("status") == "failed"
    return StageResult(stage.name, stage.key, "failed" if failed else "cached", time.perf_counter() - t0,
                       m.get("reason", "") if failed else reason, m.get("size", 0), m.get("info", {}))


def _run_stage(stage: Stage, plan: Plan, store: Store, reporter: Reporter, previous: dict | None,
               remote: Any = None, verify: bool = False, forced: bool = False) -> StageResult:
    t0 = time.perf_counter()
    if stage.skip_reason:
        return StageResult(stage.name, stage.key, "skipped", 0.0, stage.skip_reason)
    if store.has(stage.key):
        from .verify import intact

        # --verify: a hit is used only when every file re-hashes to its manifest; a corrupt one is discarded
        # (atomically, under its lock) and the stage builds again below.
        if not verify or intact(store, stage.key, reporter.warn):
            return _stored_result(stage, store, t0, "cached, verified" if verify else "cached")
    reason = "forced (--force)" if forced else explain(stage, previous, store)

    def waiting() -> None:
        reporter.info(f"  {stage.name}: another build holds {stage.key[:12]}; waiting for it")

    with store.lock(stage.key, on_wait=waiting):
        if store.has(stage.key):  # the other builder finished it while we waited: its verdict is ours
            return _stored_result(stage, store, t0, "built by a concurrent build")
        tmp = store.new_tmp(stage.key)
        if remote is not None and remote.fetch(stage.key, store, tmp):  # registry/cache.py: verified, committed
            return _stored_result(stage, store, t0, f"from remote cache {remote.ref}")
        ctx = StageContext(
            stage=stage, out=tmp, final=store.object_dir(stage.key),
            inputs={r: store.object_dir(k) for r, k in stage.inputs.items()},
            input_manifests={r: store.manifest(k) for r, k in stage.inputs.items() if store.has(k)},
            reporter=reporter, model_config=plan.model_config, profile_name=plan.profile.profile.name, store=store,
        )
        try:
            with reporter.running(stage.name, reason), PeakRSS() as rss:
                info = load_entry(stage.code.runner)(ctx) or {}
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        status = info.pop("status", "ok")
        manifest = {
            "stage": stage.name, "status": status, "reason": info.pop("reason", reason),
            "inputs": stage.inputs, "config": stage.config, "material": stage.material,
            "profile": plan.profile.profile.name, "seconds": round(seconds, 3), "peak_rss_bytes": rss.peak,
            "tool_versions": _tool_versions(), "created_unix": int(time.time()), "info": info,
        }
        if stage.runtimes is not None:
            manifest["runtimes"] = stage.runtimes
        manifest = store.commit(tmp, stage.key, manifest)
    return StageResult(stage.name, stage.key, "failed" if status == "failed" else "built", seconds,
                       manifest["reason"], manifest["size"], info)


def _announced(stages: list[Stage], results: list[StageResult], reporter: Reporter) -> Any:
    """Yields each stage; once the loop body has run for it (whatever path it took), prints its end line."""
    for stage in stages:
        before = len(results)
        yield stage
        for r in results[before:]:
            reporter.finished(r.name, r.status, r.seconds, r.reason if r.status in ("failed", "skipped") else "")


def forced(stages: list[Stage], force: tuple[str, ...]) -> set[str]:
    """`build --force [STAGE]`: "*" is every stage; `export` is every export:*; else the stage's own name."""
    return {s.name for s in stages if "*" in force or s.name in force or s.name.split(":")[0] in force}


def _evict(store: Store, key: str) -> None:
    """Take a finished artifact out of the store (under its lock) so that the stage runs again."""
    import shutil

    with store.lock(key):
        if store.has(key):
            doomed = store.object_dir(key).with_name(f".gc-{key}-{time.time_ns()}")
            os.rename(store.object_dir(key), doomed)
            shutil.rmtree(doomed)


def execute(plan: Plan, store: Store, reporter: Reporter, remote: Any = None,
            verify: bool = False, force: tuple[str, ...] = ()) -> list[StageResult]:
    """Run every stage in order. A failing shared stage (source, quantize, reference) stops the build; a
    failing target stage fails that target only (the stages that take it as input or run after it are skipped)
    and the others go on."""
    def waiting() -> None:
        reporter.info("  `toolchain gc` is running on this store; waiting for it")

    with store.building(on_wait=waiting):
        rebuild = forced(plan.stages, force)
        for stage in plan.stages:
            if stage.name in rebuild and not stage.skip_reason:
                _evict(store, stage.key)
        return _execute(plan, store, reporter, remote, verify, rebuild)


def _execute(plan: Plan, store: Store, reporter: Reporter, remote: Any, verify: bool = False,
             rebuild: set[str] = frozenset()) -> list[StageResult]:
    ref = ref_name(plan.profile.profile.name, plan.source)
    previous = {s["name"]: s for s in (store.read_ref(ref) or {}).get("stages", [])}
    # The roots first: what this build commits is reachable from its first stage on, even if it is killed; the
    # last good build's roots stay until this one succeeds (a failed build must not let gc delete them).
    record = ref_record(plan)
    pending = store.begin_ref(ref, record)
    results: list[StageResult] = []
    names = {s.key: s.name for s in plan.stages}
    blocked: dict[str, str] = {}  # stage name -> why the stages after it do not run (it failed or was skipped)
    for stage in _announced(plan.stages, results, reporter):
        upstream = [names[k] for k in stage.inputs.values() if k in names] + list(stage.after)
        why = next((blocked[n] for n in upstream if n in blocked), None)
        if why is not None:
            results.append(StageResult(stage.name, stage.key, "skipped", 0.0, why))
            blocked[stage.name] = why
            continue
        target = stage.target
        try:
            results.append(_run_stage(stage, plan, store, reporter, previous.get(stage.name),
                                      None if stage.name in rebuild else remote,  # --force: not from the cache
                                      verify, stage.name in rebuild))
            if remote is not None and store.has(stage.key):  # built now, or before the cache was configured:
                remote.push(stage.key, store)  # shared unless the registry has it (one HEAD)
            if target is not None and results[-1].status == "failed":  # a failed gate stops what follows it
                blocked[stage.name] = f"{stage.name} failed"
        except Exception as e:
            if os.environ.get("TOOLCHAIN_DEBUG"):
                raise
            message = str(e) if isinstance(e, ToolchainError) else f"{type(e).__name__}: {e}"
            if target is None:
                if isinstance(e, ToolchainError):
                    raise
                raise BuildError(f"stage {stage.name} failed: {message}") from e
            reporter.warn(f"{stage.name} failed: {message}")
            results.append(StageResult(stage.name, stage.key, "failed", 0.0, message))
            blocked[stage.name] = f"{stage.name} failed"
    if pending and not any(r.status == "failed" for r in results):
        store.finish_ref(ref, record)
    return results
