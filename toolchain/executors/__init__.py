"""Executors: what runs the stages of one or more plans (a matrix's variants). `local` runs them here, one after
another (toolchain.run); `ray` spreads them over a Ray cluster (toolchain.executors.ray). Both return, per plan,
its stages' results in plan order, and both leave the local store holding the same artifacts."""

from __future__ import annotations

from typing import Any

EXECUTORS = ("local", "ray")


def execute_all(plans: list[Any], store: Any, reporter: Any, executor: str = "local", **options: Any) -> list[Any]:
    if executor == "ray":
        from .ray import execute

        # --verify and --force are the local executor's (the CLI refuses them with ray): not options of a cluster run
        rest = {k: v for k, v in options.items() if k not in ("verify", "force")}
        return execute(plans, store, reporter, **rest)
    from .local import execute

    return execute(plans, store, reporter, remote=options.get("remote"), verify=options.get("verify", False),
                   force=options.get("force", ()))
