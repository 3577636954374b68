"""The local executor over several plans: each variant in turn through toolchain.run; a stage two variants share
has one key, so the second finds it in the store. A variant whose shared stage fails is reported failed and the
next variant still runs (a single plan raises, as `toolchain build` always did)."""

from __future__ import annotations

from typing import Any

from ..errors import BuildError
from ..run import StageResult
from ..run import execute as run_plan


def execute(plans: list[Any], store: Any, reporter: Any, remote: Any = None, verify: bool = False,
            force: tuple[str, ...] = ()) -> list[list[StageResult]]:
    if len(plans) == 1:
        return [run_plan(plans[0], store, reporter, remote, verify=verify, force=force)]
    out = []
    for plan in plans:
        try:
            out.append(run_plan(plan, store, reporter, remote, verify=verify, force=force))
        except BuildError as e:
            reporter.warn(f"{plan.profile.profile.name}: {e}")
            out.append(_failed(plan, store, str(e)))
    return out


def _failed(plan: Any, store: Any, why: str) -> list[StageResult]:
    """A variant whose shared stage failed: what is stored stays as stored, the failed stage (named by `why`) failed,
    the rest skipped."""
    results = []
    for s in plan.stages:
        if store.has(s.key):
            m = store.manifest(s.key)
            results.append(StageResult(s.name, s.key, "failed" if m.get("status") == "failed" else "cached", 0.0,
                                       m.get("reason", ""), m.get("size", 0), m.get("info", {})))
        elif f"stage {s.name} failed" in why:
            results.append(StageResult(s.name, s.key, "failed", 0.0, why))
        else:
            results.append(StageResult(s.name, s.key, "skipped", 0.0, f"not run: {why}"))
    return results
