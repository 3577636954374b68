"""The executor skips by the graph: a stage whose input (or `after` stage) failed or was skipped for that reason
does not run, and says why; a failure on one target leaves the other targets running; a stage skipped by the plan
(nothing here can run it) does not block what follows. Runners here are this module's functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from toolchain.errors import BuildError
from toolchain.progress import Reporter
from toolchain.run import execute
from toolchain.stage import Stage, StageCode, StageContext
from toolchain.store import Store

RAN: list[str] = []


def ok(ctx: StageContext) -> dict:
    RAN.append(ctx.stage.name)
    (ctx.out / "out.txt").write_text(ctx.stage.name)
    return {}


def gate_fails(ctx: StageContext) -> dict:
    RAN.append(ctx.stage.name)
    return {"status": "failed", "reason": "gate"}


def raises(ctx: StageContext) -> dict:
    RAN.append(ctx.stage.name)
    raise BuildError("broken exporter")


def code(fn: str) -> StageCode:
    return StageCode("1", (), f"test_stage_graph:{fn}")


def plan_of(stages: list[Stage]):
    return SimpleNamespace(profile=SimpleNamespace(profile=SimpleNamespace(name="graph"), path=None),
                           source=SimpleNamespace(kind="hf", label="x", synthetic=None), model_config={},
                           stages=stages)


def target(label: str, quant: Stage, export_fn: str = "ok", validate_fn: str = "ok",
           speed_skip: str | None = None) -> list[Stage]:
    export = Stage("export", {"t": label}, {"quantize": quant.key}, code(export_fn), label)
    validate = Stage("validate", {"t": label}, {"export": export.key, "quantize": quant.key}, code(validate_fn), label)
    speed = Stage("speed", {"t": label}, {"export": export.key}, code("ok"), label, skip_reason=speed_skip,
                  after=(validate.name,))
    publish = Stage("publish", {"t": label}, {s.kind: s.key for s in (export, validate, speed)}, code("ok"), label)
    return [export, validate, speed, publish]


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def _run(stages: list[Stage], tmp_path) -> dict[str, tuple[str, str]]:
    results = execute(plan_of(stages), Store(tmp_path / "store"), Reporter(quiet=True))
    return {r.name: (r.status, r.reason) for r in results}


def test_a_failed_export_skips_what_needs_it_and_only_on_its_target(tmp_path):
    quant = Stage("quantize", {"q": 1}, {}, code("ok"))
    got = _run([quant, *target("a", quant, export_fn="raises"), *target("b", quant)], tmp_path)
    assert got["export:a"][0] == "failed" and "broken exporter" in got["export:a"][1]
    assert got["validate:a"] == ("skipped", "export:a failed")
    assert got["speed:a"] == ("skipped", "export:a failed")
    assert got["publish:a"][0] == "skipped"
    assert [n for n in RAN if n.endswith(":b")] == ["export:b", "validate:b", "speed:b", "publish:b"]
    assert "validate:a" not in RAN and "publish:a" not in RAN


def test_a_failed_gate_skips_the_stages_after_it(tmp_path):
    quant = Stage("quantize", {"q": 2}, {}, code("ok"))
    got = _run([quant, *target("a", quant, validate_fn="gate_fails")], tmp_path)
    assert got["validate:a"] == ("failed", "gate")
    assert got["speed:a"] == ("skipped", "validate:a failed")  # not its input: ordered after it
    assert got["publish:a"] == ("skipped", "validate:a failed")
    assert RAN == ["quantize", "export:a", "validate:a"]


def test_a_stage_the_plan_skips_does_not_block_the_ones_after_it(tmp_path):
    quant = Stage("quantize", {"q": 3}, {}, code("ok"))
    got = _run([quant, *target("a", quant, speed_skip="no GPU here")], tmp_path)
    assert got["speed:a"] == ("skipped", "no GPU here")
    assert got["publish:a"][0] == "built"


def test_a_failed_shared_stage_stops_the_build(tmp_path):
    quant = Stage("quantize", {"q": 4}, {}, code("raises"))
    with pytest.raises(BuildError, match="broken exporter"):
        _run([quant, *target("a", quant)], tmp_path)
    assert RAN == ["quantize"]
