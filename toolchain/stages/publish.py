"""publish:<target>: push a target's artifact to the profile's `publish:` destinations once its gates passed.

The stage's inputs are every stage of its target (export, validate, engine, speed), so its key changes with
the artifact and with the destinations, and a cached publish is a no-op. The executor skips it when a stage
of its target failed; the runner checks again, so a failed artifact is never pushed.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BuildError
from ..stage import Stage, StageCode, StageContext

CODE = StageCode("1", (), "toolchain.stages.publish:run")


def publish_stages(plan: Any) -> list[Stage]:
    """One publish stage per target when the profile has `publish:` entries (plan time; no network)."""
    profile = plan.profile.profile
    if not profile.publish:
        return []
    out = []
    for target in profile.targets:
        label = target.label
        inputs = {s.kind: s.key for s in plan.stages if s.target == label}
        config = {"to": [{"to": p.to, "insecure": p.insecure} for p in profile.publish],
                  "targets": len(profile.targets)}
        # What packaging the target reads: the plan's stages (their keys), the target's format, the profile's name.
        data = {"stages": list(plan.stages), "format": target.format, "profile_ref": plan.profile_ref}
        out.append(Stage("publish", config, inputs, CODE, label, data=data))
    return out


def run(ctx: StageContext) -> dict[str, Any]:
    from ..registry.package import destination, push_files, target_package

    label = ctx.stage.target
    failed = [role for role, m in ctx.input_manifests.items() if m.get("status") == "failed"]
    if failed:
        raise BuildError(f"publish:{label}: {', '.join(failed)} failed; a failed artifact is never published")
    store = ctx.store
    key, files, descriptor, config, annotations = target_package(
        store, ctx.data["stages"], label, ctx.data["format"], ctx.profile_name, ctx.data["profile_ref"],
        ctx.model_config)
    published = []
    for dest in ctx.config["to"]:
        ref = destination(dest["to"], label, ctx.config["targets"])
        ctx.reporter.info(f"  pushing {label} to {ref}")
        pushed = push_files(ref, store.object_dir(key), files, descriptor, config, annotations, dest["insecure"],
                            ctx.reporter)
        ctx.reporter.info(f"  {ref} -> {pushed.digest}")
        published.append({"reference": str(ref), "digest": pushed.digest, "pinned": pushed.reference})
    (ctx.out / "published.json").write_text(json.dumps(published, indent=2, sort_keys=True))
    return {"published": published, "reason": f"pushed to {len(published)} destination(s)"}
