"""The package's import graph (read with ast, tests/importgraph.py): no circles, and no format module reaching up
into the planner, the executor, the profile or the CLI (a format depends on the stage contract and the IR, never on
who drives it)."""

from __future__ import annotations

from conftest import REPO
from importgraph import cycles, edges

# What drives the stages; format packages sit below it.
CORE = ("toolchain.plan", "toolchain.run", "toolchain.profile", "toolchain.cli")


def _report(components: list[list[str]], es) -> str:
    lines = []
    for comp in components:
        members = set(comp)
        lines.append("circle: " + ", ".join(comp))
        lines += [f"    {e}" for e in es if e.src in members and e.dst in members]
    return "\n".join(lines)


def test_no_circle_among_module_level_imports():
    es = [e for e in edges(REPO) if e.kind == "module"]
    found = cycles(es)
    assert not found, "\n" + _report(found, es)


def test_no_circle_counting_function_local_imports():
    """A circle held apart only by imports inside functions is still a circle: each side needs the other."""
    es = [e for e in edges(REPO) if e.kind in ("module", "local")]
    found = cycles(es)
    assert not found, "\n" + _report(found, es)


def test_no_circle_counting_type_only_imports():
    """A TYPE_CHECKING import never runs, but it is still a dependency of the code's meaning: a module typed with a
    class from above it is tied to that layer. Counted too."""
    found = cycles(edges(REPO))
    assert not found, "\n" + _report(found, edges(REPO))


def test_named_up_arrows_are_cut():
    """The arrows issue 23 cut, each pointing from a lower layer to a higher one."""
    up = {("toolchain.sources", "toolchain.profile"), ("toolchain.profile", "toolchain.runtimes.rules"),
          ("toolchain.validate.accuracy", "toolchain.stages.source"),
          ("toolchain.quant.layerwise", "toolchain.methods"),
          ("toolchain.formats.xinference.check", "toolchain.runtimes.rules")}
    found = [str(e) for e in edges(REPO) if (e.src, e.dst) in up]
    assert not found, "\n".join(found)


def test_format_modules_do_not_import_the_core():
    up = [e for e in edges(REPO) if e.src.startswith("toolchain.formats.") and e.dst in CORE]
    assert not up, "format modules import the core:\n" + "\n".join(f"    {e}" for e in up)


def test_the_graph_sees_imports():
    """The walker itself: it finds a module-level, a function-local and a TYPE_CHECKING edge of known modules."""
    es = edges(REPO)
    kinds = {e.kind for e in es}
    assert kinds == {"module", "local", "typing"}, kinds
    assert any(e.src == "toolchain.plan" and e.dst == "toolchain.store" and e.kind == "module" for e in es)


def test_the_format_registry_imports_only_specs():
    """Planning reads the registry: it imports each format's torch-free spec, never its exporter or checker."""
    es = [e for e in edges(REPO) if e.src == "toolchain.formats" and e.kind == "module"
          and e.dst.startswith("toolchain.formats.")]
    assert es, "the registry imports no spec module"
    bad = [e for e in es if not (e.dst.endswith(".spec") or e.dst == "toolchain.formats.base"
                                 or e.dst.count(".") == 2)]  # a format's package itself (its empty __init__)
    assert not bad, "\n".join(map(str, bad))


def test_spec_modules_import_no_exporter_or_checker():
    es = [e for e in edges(REPO) if e.src.endswith(".spec") and e.src.startswith("toolchain.formats.")
          and e.kind == "module"]
    bad = [e for e in es if e.dst.rsplit(".", 1)[-1] in ("export", "check", "engine", "worker")]
    assert not bad, "\n".join(map(str, bad))
