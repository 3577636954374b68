"""The `toolchain` command. Parsing and presentation only: the work lives in plan, run and the stage modules.

Exit codes: 0 ok; 1 a build or a gate failed; 2 bad input (profile, paths, recipe, missing tool).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import InputError, ToolchainError
from .progress import Reporter, console, out

STORE_HELP = "Artifact store directory [env TOOLCHAIN_STORE; default ./artifacts]."


def _store(path: str | None):
    from .checks import check_store_path
    from .store import Store

    store = Store(path or os.environ.get("TOOLCHAIN_STORE") or "artifacts")
    check_store_path(store.root, "--store" if path else "TOOLCHAIN_STORE" if os.environ.get("TOOLCHAIN_STORE")
                     else "--store (default ./artifacts)")
    return store


def _load_profile(profile: str | None, source: str | None, loaded=None):
    from . import profile as prof

    loaded = loaded or prof.load(profile or prof.default_profile_path())
    if source is None:
        return loaded
    data = loaded.profile.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if source == "synthetic" or source.startswith("synthetic:"):
        arch = source.partition(":")[2] or loaded.profile.source.arch
        if not arch:
            raise InputError("--source synthetic needs a shape: add `arch: llama-2-7b` under source in the "
                             "profile, or pass --source synthetic:llama-2-7b")
        data["source"] = {"synthetic": {"arch": arch}}
    else:
        data["source"] = {"path": str(Path(source).resolve())}
    return prof.from_dict(data, loaded.path, loaded.base_dir, loaded.origins)


def _load_variants(profiles: tuple[str, ...], source: str | None) -> list:
    """Every variant of every PROFILE (toolchain.matrix: a profile with `matrix:` expands to several)."""
    from . import matrix
    from . import profile as prof

    out = []
    for path in profiles or (str(prof.default_profile_path()),):
        for v in matrix.expand(path):
            if source is not None:
                named = v.loaded.profile.model_copy(update={"name": v.loaded.profile.name.partition("@")[0]})
                loaded = _load_profile(None, source, v.loaded.model_copy(update={"profile": named}))
                v.loaded = loaded.model_copy(update={"profile": loaded.profile.model_copy(update={"name": v.name})})
            out.append(v)
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"profile {dup[0]} is given twice (two PROFILEs of one name); give each a distinct `name:`")
    return out


def _plan_variant(v, store, reporter):
    from .matrix import place_card
    from .plan import build_plan

    try:
        plan = build_plan(v.loaded, store, reporter)
    except InputError as e:
        if not v.axes:
            raise
        raise InputError(f"matrix variant {v.name}: {e}") from None
    place_card(plan, v.card)
    return plan


def _fail(e: ToolchainError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": str(e), "exit_code": e.exit_code}))
    # Plain text, not rich: an error must not be re-wrapped, so it can be searched and copied whole.
    click.echo(f"error: {e}", err=True)
    sys.exit(e.exit_code)


def _finite(obj: Any) -> Any:
    """--json must parse anywhere (jq, JSON.parse): a NaN or inf metric is written as the string "nan"/"inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _quiet_libraries() -> None:
    """Our own progress bars say what runs; the libraries' tqdm bars and advisory warnings would drown them."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds as Ctrl-C does: a stage's temp directory is removed."""


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise Terminated()


class _Guarded(click.Group):
    """Every command ends with one message, never a traceback. Ours (ToolchainError): its exit code. Anything
    else: a bug, exit 1, one line naming a log file with the traceback (printed under --debug). Ctrl-C exits
    130, SIGTERM 143, both after the stage in flight has removed its temp directory. With --json the error is
    also the JSON document."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        import signal
        import threading

        argv = getattr(self, "_argv", [])
        as_json = "--json" in argv
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ToolchainError as e:
            _fail(e, as_json)
        except KeyboardInterrupt as e:
            code, what = (143, "terminated (SIGTERM)") if isinstance(e, Terminated) else (130, "interrupted")
            if as_json:
                click.echo(json.dumps({"error": what, "exit_code": code}))
            click.echo(f"error: {what}; the stage in flight was abandoned and its temporary files removed", err=True)
            sys.exit(code)
        except Exception as e:  # not ours: a bug
            _internal_error(e, as_json, bool(ctx.params.get("debug") or os.environ.get("TOOLCHAIN_DEBUG")))
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


# A full disk or a permission found mid-way: the machine's state, said as such.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _internal_error(e: Exception, as_json: bool, debug: bool) -> None:
    import tempfile
    import traceback

    trace = traceback.format_exc()
    first = (str(e).strip().splitlines() or [""])[0]
    log = None
    if not debug:
        try:
            fd, log = tempfile.mkstemp(prefix="toolchain-error-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(trace)
        except OSError:
            debug = True  # nowhere to write it: print it
    where = "traceback above" if debug else f"traceback in {log}; `toolchain --debug ...` prints it"
    message = f"internal error: {type(e).__name__}: {first} ({where}; please report it)"
    if isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS:  # the machine, not a bug: no report asked for
        message = f"{e.strerror}: {e.filename} (free space or fix the permissions, then rerun; {where})"
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": 1, **({"log": log} if log else {})}))
    if debug:
        click.echo(trace, err=True, nl=False)
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(cls=_Guarded, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="toolchain")
@click.option("--debug", is_flag=True, help="On an internal error, print the traceback (else it goes to a log file).")
def main(debug: bool) -> None:
    """Build quantized, validated LLM checkpoints from a declarative profile, cached by content hash.

    \b
    A profile (YAML) names a source model, a quantization recipe, target formats and accuracy gates:
      toolchain plan profiles/smollm2-int4.yaml     what would run, what is cached, and why
      toolchain build profiles/smollm2-int4.yaml    run it (a second run is a no-op)
      toolchain ls / inspect KEY / gc --dry-run     look after the artifact store
      toolchain rm KEY|PROFILE / export KEY|PROFILE DIR   remove a build, copy one out (verified)
      toolchain report PROFILE... -o report.html    gates, accuracy, speed, runtimes: HTML and Markdown
      toolchain doctor                              which backends are installed
    """
    _quiet_libraries()


@main.command()
@click.argument("profiles", nargs=-1)
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--source",
              help="Override the source: a path, `synthetic` (the profile's source.arch) or synthetic:ARCH.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document on stdout (progress stays on stderr).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--cache", "cache", metavar="oci://HOST/REPO",
              help="Remote cache: look each stage up in this registry repository before building it, pull hits "
                   "(verified), push what was built. [env TOOLCHAIN_CACHE]")
@click.option("--insecure", is_flag=True, help="Reach the --cache registry over plain HTTP (localhost registries).")
@click.option("--verify", is_flag=True,
              help="Re-hash every cached artifact against its manifest before using it; a corrupt one is discarded "
                   "and its stage rebuilt.")
@click.option("--force", "force", is_flag=False, flag_value="*", default=None, metavar="[STAGE]",
              help="Rebuild despite the cache (a suspected bad artifact): every stage, or only STAGE (e.g. "
                   "quantize, export, export:gguf; comma-separated). The old artifact is replaced, never pulled "
                   "from --cache.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: here, stage after stage. ray: every variant's stages as tasks on a Ray cluster (pip "
                   "install 'toolchain[ray]'); workers share artifacts through --cache, else the store must be a "
                   "filesystem every node mounts at the same path.")
@click.option("--address", default="auto", show_default=True, metavar="auto|HOST:PORT|ray://HOST:PORT",
              help="The Ray cluster to run on (--executor ray).")
@click.option("--max-retries", type=click.IntRange(0, 100), default=2, show_default=True,
              help="With --executor ray: times a stage is retried when its worker dies or it raises.")
def build(profiles: tuple[str, ...], store_dir: str | None, source: str | None, as_json: bool, quiet: bool,
          cache: str | None, insecure: bool, verify: bool, force: str | None, executor: str, address: str,
          max_retries: int) -> None:
    """Build PROFILE... (default: the SmolLM2 INT4 demo profile): every stage that is not cached, of every variant
    of a profile with `matrix:` (a stage the variants share is built once).

    Exit code 0 when every target is built and passed its gates, 1 when a stage or a gate failed,
    2 for bad input, 130 when interrupted.
    """
    t0 = time.perf_counter()
    if force is not None and not profiles and force != "*" and (force.endswith((".yaml", ".yml"))
                                                                or Path(force).is_file()):
        profiles, force = (force,), "*"  # `build --force PROFILE`: the flag took the profile as its STAGE
    reporter = Reporter(quiet=quiet)  # with --json, progress still goes to stderr: CI logs show the stages
    try:
        from .executors import execute_all

        if executor == "ray":
            from .executors.ray import ray_module

            ray_module()  # not installed: exit 2 before any work
        variants = _load_variants(profiles, source)
        store = _store(store_dir)
        remote = None
        cache = cache or os.environ.get("TOOLCHAIN_CACHE")
        if cache:
            from .registry.cache import RemoteCache

            remote = RemoteCache(cache, insecure=insecure, reporter=reporter)
        plans = [_plan_variant(v, store, reporter) for v in variants]
        for plan in plans:
            for note in plan.notes:
                reporter.warn(note)
        stages = tuple(x.strip() for x in force.split(",")) if force else ()
        known = {s.name for p in plans for s in p.stages} | {s.name.split(":")[0] for p in plans for s in p.stages}
        if any(x not in known | {"*"} for x in stages):
            raise InputError(f"--force {force}: no such stage; this profile's stages are "
                             f"{', '.join(dict.fromkeys(s.name for p in plans for s in p.stages))}")
        if executor == "ray" and (verify or stages):
            raise InputError("--verify and --force run with --executor local only (the cluster's workers share "
                             "artifacts through --cache, which verifies every pull already)")
        for plan in plans:
            _refuse_read_only(plan, store, rewrites=bool(stages))
        try:
            per_plan = execute_all(plans, store, reporter, executor, remote=remote, cache=cache, insecure=insecure,
                                   address=address, max_retries=max_retries, verify=verify, force=stages)
        finally:
            if remote is not None:
                remote.close()
    except ToolchainError as e:
        _fail(e, as_json)
        return
    seconds = time.perf_counter() - t0
    docs = [_document(plan, store, results, seconds) for plan, results in zip(plans, per_plan, strict=True)]
    failed = any(s["status"] == "failed" for d in docs for s in d["stages"])
    doc = docs[0] if len(docs) == 1 else {"ok": not failed, "exit_code": 1 if failed else 0, "variants": docs,
                                          "store": str(store.root), "seconds": round(seconds, 3),
                                          "failures": _failures(docs)}
    if remote is not None:
        doc["cache"] = remote.summary()
    if as_json:
        click.echo(json.dumps(_finite(doc), indent=2))
    elif not quiet:
        for d in docs:
            _print_summary(d)
        if len(docs) > 1:
            _print_matrix(doc)
    sys.exit(1 if failed else 0)


def _refuse_read_only(plan, store, rewrites: bool = False) -> None:
    """A build that will write (a stage to build or to force, a new ref) needs a writable store: said before any
    work. A fully cached build writes nothing and runs on a read-only store."""
    from .checks import check_store_writable
    from .plan import ref_name, ref_record

    if (rewrites or any(not s.skip_reason and not store.has(s.key) for s in plan.stages)
            or store.read_ref(ref_name(plan.profile.profile.name, plan.source)) != ref_record(plan)):
        check_store_writable(store.root)


def _failures(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"variant": d["profile"], "stage": s["name"], "reason": s["reason"]}
            for d in docs for s in d["stages"] if s["status"] == "failed"]


def _print_matrix(doc: dict[str, Any]) -> None:
    """One line per variant, then each failure: which variant, which stage, why."""
    from rich.markup import escape

    out.print(f"[bold]matrix: {len(doc['variants'])} variants, {doc['seconds']:.2f} s[/]")
    for d in doc["variants"]:
        counts: dict[str, int] = {}
        for s in d["stages"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        out.print(escape(f"  {d['profile']}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))))
    for f in doc["failures"]:
        out.print(escape(f"  FAILED {f['variant']} {f['stage']}: {f['reason']}"), style="bold red")


@main.command()
@click.argument("profiles", nargs=-1)
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--source", help="Override the source, as for build.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def plan(profiles: tuple[str, ...], store_dir: str | None, source: str | None, as_json: bool) -> None:
    """Show what `build PROFILE...` would do: each stage, its key, cached or not, and what changed since the last
    build of this profile (e.g. `quantize: group_size 64 -> 32`); each variant of a profile with `matrix:`."""
    try:
        store = _store(store_dir)
        variants = _load_variants(profiles, source)
        docs = [_plan_doc(v, _plan_variant(v, store, Reporter(quiet=as_json)), store) for v in variants]
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        doc = docs[0][0] if len(docs) == 1 else {"variants": [d for d, _ in docs]}
        click.echo(json.dumps(_finite(doc), indent=2))
        return
    for doc, p in docs:
        _print_plan(doc, p)


def _plan_doc(v, p, store) -> tuple[dict[str, Any], Any]:
    from .plan import explain, ref_name

    loaded = v.loaded
    previous = {s["name"]: s for s in (store.read_ref(ref_name(loaded.profile.name, p.source)) or {}).get("stages", [])}
    stages = []
    for s in p.stages:
        if s.skip_reason:
            status, reason = "skipped", s.skip_reason
        else:
            reason = explain(s, previous.get(s.name), store)
            status = "cached" if reason == "cached" else "build"
        stages.append({"name": s.name, "key": s.key, "status": status, "reason": reason,
                       "inputs": {r: k[:12] for r, k in s.inputs.items()}})
    recipe = loaded.profile.quantize.model_dump(mode="json")
    doc = {"profile": loaded.profile.name, "source": p.source.label, "notes": p.notes, "stages": stages,
           "quantize": {"preset": loaded.preset, "recipe": recipe},
           "targets": [{"name": t.label, "format": t.format, "runtimes": p.runtimes.get(t.label, [])}
                       for t in loaded.profile.targets]}
    if v.axes:
        doc["matrix"] = v.axes
    return doc, p


def _print_plan(doc: dict[str, Any], p) -> None:
    from rich.table import Table

    for note in p.notes:
        console.print(f"[bold yellow]warning:[/] {note}")
    table = Table(title=f"plan for {doc['profile']} (source {p.source.label})")
    for col in ("stage", "key", "inputs", "status", "why"):
        table.add_column(col)
    for s in doc["stages"]:
        colour = {"cached": "green", "build": "yellow", "skipped": "dim"}[s["status"]]
        inputs = ", ".join(f"{r}:{k}" for r, k in s["inputs"].items())
        table.add_row(s["name"], s["key"][:12], inputs, f"[{colour}]{s['status']}[/]", s["reason"])
    out.print(table)
    from .presets import describe

    preset = doc["quantize"]["preset"]
    out.print(f"[bold]quantize[/]: {describe(doc['quantize']['recipe'])}"
              + (f" (preset {preset})" if preset else ""), soft_wrap=True)
    _print_runtimes(doc["targets"])


def _print_runtimes(targets: list[dict[str, Any]]) -> None:
    """Per target: which runtimes (with versions) will load the artifact, and why not where they will not."""
    from rich.markup import escape

    for t in targets:
        out.print(f"[bold]{t['name']}[/] ({t['format']}): runtimes")
        for v in t["runtimes"]:
            verdict = "[green]loads it[/]" if v["loads"] else "[bold red]will NOT load it[/]"
            out.print(f"  {v['runtime']} {escape(v['version'])}: {verdict}", soft_wrap=True)
            for r in v["rules"]:
                head = "why" if r["effect"] == "refuses" else "caveat"
                out.print(escape(f"    {head}: {r['says']}; fix: {r['fix']} [rule {r['id']}: {r['source']}]"),
                              soft_wrap=True)


def _verdict(status: str, val: Any) -> str:
    """pass / fail / skipped, whatever the cache did: a cached validation that passed is a pass."""
    if status == "failed":
        return "fail"
    return "skipped" if val is None or val.status == "skipped" else "pass"


def _document(plan, store, results, seconds: float) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    targets = []
    for t in plan.profile.profile.targets:
        export = by_name.get(f"export:{t.label}")
        val = by_name.get(f"validate:{t.label}")
        engine = by_name.get(f"engine:{t.label}")
        publish = by_name.get(f"publish:{t.label}")
        speed = by_name.get(f"speed:{t.label}")
        failed = val is None or any(s is not None and s.status == "failed" for s in (val, engine, speed))
        status = "failed" if failed else export.status
        targets.append({
            "format": t.format,
            "name": t.label,
            "path": str(store.object_dir(export.key)) if export else None,
            "status": status,
            "validation": (val.info.get("validation") or {"passed": val.info.get("passed"), "reason": val.reason})
            if val else None,
            "conformance": val.info.get("conformance") if val else None,
            "checked_by": (val.info.get("model_json") or {}).get("checked_by") if val else None,
            "verdict": _verdict(status, val),
            # the gates' words ("all gates passed", "gate failed: ..."), kept in the manifest for a cached one
            "verdict_reason": (store.manifest(val.key).get("reason", val.reason) if store.has(val.key)
                               else val.reason) if val else "no validate stage",
            "export_fidelity": val.info.get("export_fidelity") if val else None,
            "engine": {"path": str(store.object_dir(engine.key)), "status": engine.status, "reason": engine.reason}
            if engine else None,
            "published": publish.info.get("published") if publish and publish.status in ("built", "cached")
            else None,
            "runtimes": plan.runtimes.get(t.label, []),
            "speed": {"status": speed.status, "reason": speed.reason, **speed.info.get("speed", {})} if speed else None,
        })
    failed = any(r.status == "failed" for r in results)
    return {
        "ok": not failed,
        "exit_code": 1 if failed else 0,
        "profile": plan.profile.profile.name,
        "source": plan.source.label,
        "store": str(store.root),
        "seconds": round(seconds, 3),
        "notes": plan.notes,
        "stages": [{"name": r.name, "key": r.key, "status": r.status, "seconds": round(r.seconds, 3),
                    "size": r.size, "reason": r.reason, **({"node": r.node} if r.node else {})} for r in results],
        "targets": targets,
    }


def _result(stage: dict[str, Any], target: dict[str, Any] | None) -> str:
    """The summary's result column: why a stage failed or was skipped, a validation's verdict; never why it was
    (re)built (that is `plan`'s job)."""
    if stage["status"] in ("failed", "skipped"):
        return stage["reason"]
    if target is not None and target["verdict"] in ("pass", "fail"):
        return f"{target['verdict']}: {target['verdict_reason']}"
    return ""


def _print_summary(doc: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{doc['profile']}: {doc['seconds']:.2f} s, {'ok' if doc['ok'] else 'FAILED'}")
    for col in ("stage", "status", "seconds", "size", "result"):
        table.add_column(col)
    colours = {"built": "green", "cached": "cyan", "failed": "bold red", "skipped": "dim"}
    verdicts = {f"validate:{t['name']}": t for t in doc["targets"]}
    for s in doc["stages"]:
        table.add_row(s["name"], f"[{colours[s['status']]}]{s['status']}[/]", f"{s['seconds']:.2f}",
                      _fmt_size(s["size"]) if s["size"] else "", escape(_result(s, verdicts.get(s["name"]))))
    out.print(table)
    for t in doc["targets"]:
        v = t["validation"] or {}
        out.print(f"[bold]{t['format']}[/]: {t['status']} -> {t['path']}")
        if "ppl" in v:
            out.print(
                f"  perplexity {v['reference_ppl']:.3f} (reference) -> {v['ppl']:.3f} ({v['ppl_increase_pct']:+.2f}%),"
                f" KL {v['kl_mean']:.4f}, top-1 agreement {v['top1_agreement']:.4f}\n"
                f"  measured on {Path(v['dataset']).name}: {v['tokens']} tokens, seq_len {v['seq_len']}, "
                f"stride {v['stride']}, tokenizer {v['tokenizer']}, {v['runtime']}")
        elif v:
            out.print(f"  {v.get('reason', '')}")
        if "ppl" in v:
            out.print(f"  {t['verdict']}: {t['verdict_reason']}")
        if t.get("checked_by"):
            out.print(f"  model.json checked by {t['checked_by']}")
        if t["runtimes"]:
            from .runtimes.rules import summary

            out.print(f"  runtimes: {summary(t['runtimes'])}")
        if t.get("speed"):
            _print_speed(t["speed"])
    for note in doc["notes"]:
        out.print(f"[bold yellow]{note}[/]")


def _resolve_push(target: str, store, to: str, label: str | None):
    """push's TARGET: a profile (its built, validated targets) or a store key (that artifact as it is)."""
    from .errors import BuildError
    from .registry.package import destination, key_package, target_package
    from .registry.reference import parse_reference

    parse_reference(to, need_tag=True)
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        from .plan import build_plan

        loaded = _load_profile(target, None)
        plan = build_plan(loaded, store, Reporter(quiet=True))
        labels = [t.label for t in loaded.profile.targets]
        if label is not None and label not in labels:
            raise InputError(f"--target {label}: the profile's targets are {', '.join(labels)}")
        chosen = [label] if label else labels
        out = []
        for lab in chosen:
            fmt = next(t.format for t in loaded.profile.targets if t.label == lab)
            key, files, descriptor, config, annotations = target_package(
                store, plan.stages, lab, fmt, plan.profile.profile.name, plan.profile_ref, plan.model_config)
            failed = [s.name for s in plan.stages if s.target == lab and store.has(s.key)
                      and store.manifest(s.key).get("status") == "failed"]
            if failed:
                raise BuildError(f"target {lab}: {', '.join(failed)} failed its gate; a failed artifact is not pushed")
            out.append((destination(to, lab, len(chosen)), key, files, descriptor, config, annotations))
        return out
    try:
        key = store.find(target)
    except KeyError as e:
        raise InputError(f"{e.args[0]}; give a profile (.yaml) or an artifact key from `toolchain ls`") from None
    files, descriptor, config, annotations = key_package(store, key)
    return [(parse_reference(to, need_tag=True), key, files, descriptor, config, annotations)]


@main.command()
@click.argument("target")
@click.option("--to", "to", required=True, metavar="oci://HOST/REPO:TAG", help="Where to push.")
@click.option("--target", "label", help="With a profile of several targets: push only this one.")
@click.option("--insecure", is_flag=True, help="Plain HTTP (a registry on localhost). HTTPS is verified otherwise.")
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help='Print {"digest", "reference", "layers"} on stdout.')
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def push(target: str, to: str, label: str | None, insecure: bool, store_dir: str | None, as_json: bool,
         quiet: bool) -> None:
    """Push TARGET to an OCI registry as a CNCF ModelPack artifact (one layer per file).

    TARGET is a profile (each of its built targets that passed its gates; with several targets the tag gets
    the target's name appended) or an artifact key from `toolchain ls`. The same artifact always gets the same
    manifest digest. Credentials: TOOLCHAIN_REGISTRY_USERNAME/PASSWORD or TOOLCHAIN_REGISTRY_TOKEN, else
    docker's config.json (`docker login`). Exit 1 when the registry refuses, 2 for bad input.
    """
    from .registry.package import push_files

    reporter = Reporter(quiet=quiet)
    store = _store(store_dir)
    try:
        docs = []
        for ref, key, files, descriptor, config, annotations in _resolve_push(target, store, to, label):
            pushed = push_files(ref, store.object_dir(key), files, descriptor, config, annotations, insecure,
                                reporter, interruptible=True)
            docs.append({**pushed.document(), "tag": str(ref), "key": key})
            if not as_json and not quiet:
                click.echo(f"pushed {ref} -> {pushed.digest} ({len(files)} layers, "
                              f"{_fmt_size(pushed.uploaded_bytes)} sent, {pushed.skipped_layers} already there"
                              + (f", resumed at {_fmt_size(pushed.resumed_bytes)}" if pushed.resumed_bytes else "")
                              + ")")
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps(docs[0] if len(docs) == 1 else {"artifacts": docs}, indent=2))


@main.command()
@click.argument("reference", metavar="oci://HOST/REPO:TAG|oci://HOST/REPO@sha256:...")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--insecure", is_flag=True, help="Plain HTTP (a registry on localhost). HTTPS is verified otherwise.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written (files, digests) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def pull(reference: str, directory: str, insecure: bool, as_json: bool, quiet: bool) -> None:
    """Pull a ModelPack artifact into DIRECTORY, each file where it was pushed from.

    Every blob is checked against its digest before anything is written; paths that would leave DIRECTORY
    (absolute, `..`, through a symlink) are refused; files appear only once all of them are verified.
    """
    from .registry import auth, transfer
    from .registry.client import RegistryClient
    from .registry.reference import parse_reference

    reporter = Reporter(quiet=quiet)
    try:
        ref = parse_reference(reference)
        with RegistryClient(ref.host, auth.lookup(ref.host), insecure=insecure) as client:
            doc = transfer.pull(client, ref, Path(directory), reporter)
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif not quiet:
        click.echo(f"pulled {ref} ({doc['digest']}): {len(doc['files'])} files, "
                      f"{_fmt_size(sum(f['size'] for f in doc['files']))} verified into {directory}")


def _print_speed(sp: dict[str, Any]) -> None:
    if "per_batch" not in sp:
        out.print(f"  speed: {sp['status']}: {sp['reason']}")
        return
    card = sp["card"]
    out.print(f"  speed ({sp['status']}) by {sp['runtime']} {sp.get('runtime_version') or ''} on {card['name']}"
                  f" (driver {card.get('driver', '?')}), copy bandwidth {sp['copy_bandwidth_gbs']:.0f} GB/s:")
    for b in sp["per_batch"]:
        if b.get("skipped"):
            out.print(f"    batch {b['batch_size']:>3}: {b['skipped']}")
            continue
        ratio = b.get("bandwidth_ratio")
        out.print(
            f"    batch {b['batch_size']:>3}: TTFT {b['ttft_ms']:.1f} ms, prefill {b['prefill_tok_s']:.0f} tok/s, "
            f"decode {b['decode_tok_s']:.1f} tok/s, ITL p50 {b['itl_ms_p50']:.2f} / p99 {b['itl_ms_p99']:.2f} ms"
            + (f", {b['effective_bandwidth_gbs']:.0f} GB/s ({100 * ratio:.0f}% of copy)" if ratio else ""))
    if sp["status"] == "failed":
        out.print(f"  [bold red]{sp['reason']}[/]")


@main.command(name="ls")
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--all", "show_all", is_flag=True, help="List every stage artifact (key, stage, status) instead.")
@click.option("--profile", "profile_name", help="Only this profile's builds (its `name:`).")
@click.option("--format", "fmt", help="Only targets of this format (or target name), e.g. gguf.")
@click.option("--failed", is_flag=True, help="Only targets that failed a gate or are incomplete.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON on stdout.")
def ls_cmd(store_dir: str | None, show_all: bool, profile_name: str | None, fmt: str | None, failed: bool,
           as_json: bool) -> None:
    """List the builds in the store: per profile and target its format, status (pass / failed / incomplete /
    built), size, artifact path and age. --all lists the stage artifacts they are made of."""
    from rich.table import Table

    from .listing import builds, filter_builds, fmt_age, stage_rows

    store = _store(store_dir)
    if show_all:
        rows = stage_rows(store)
        if profile_name:
            rows = [r for r in rows if r["profile"] == profile_name]
        if failed:
            rows = [r for r in rows if r["status"] == "failed"]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        table = Table(title=f"{len(rows)} artifacts in {store.root}")
        for col in ("key", "stage", "status", "profile", "size", "seconds"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["key"][:12], r["stage"], r["status"], r["profile"] or "", _fmt_size(r["size"]),
                          f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
        out.print(table)
        return
    rows = filter_builds(builds(store), profile_name, fmt, failed)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} builds in {store.root}")
    for col in ("profile", "target", "format", "status", "size", "path", "age"):
        table.add_column(col, overflow="fold")
    colours = {"pass": "green", "built": "green", "failed": "bold red", "incomplete": "yellow"}
    for r in rows:
        name = r["profile"] + (" (synthetic)" if r["source"].startswith("synthetic") else "")
        table.add_row(name, r["target"], r["format"], f"[{colours[r['status']]}]{r['status']}[/]",
                      _fmt_size(r["size"]) if r["path"] else "", r["path"] or "", fmt_age(r["age_seconds"]))
    out.print(table)


@main.command()
@click.argument("target")
@click.option("--store", "store_dir", help=STORE_HELP)
def inspect(target: str, store_dir: str | None) -> None:
    """Print the manifest of an artifact: TARGET is a key (or a unique prefix) or an artifact directory."""
    from .listing import find_key

    path = Path(target)
    if (path / "manifest.json").is_file():
        click.echo((path / "manifest.json").read_text())
        return
    store = _store(store_dir)
    try:
        key = find_key(store, target)
    except ToolchainError as e:
        _fail(e, False)
        return
    click.echo((store.object_dir(key) / "manifest.json").read_text())


@main.command(name="rm")
@click.argument("target", metavar="KEY|PROFILE")
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--force", is_flag=True,
              help="Remove an artifact that a profile's last build records (a gc root); that build then "
                   "rebuilds it.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON on stdout.")
def rm_cmd(target: str, store_dir: str | None, force: bool, dry_run: bool, as_json: bool) -> None:
    """Remove a build or an artifact from the store.

    \b
    PROFILE (a YAML or a profile name): its build record and the artifacts only it reaches; what other
    profiles share (e.g. the source) stays.
    KEY (or a unique prefix): that artifact; refused for one a profile's last build records, unless --force.
    Waits for running builds (the store's lock, as gc). Exit 2 for an unknown or ambiguous TARGET.
    """
    from .verbs import remove

    store = _store(store_dir)
    try:
        removed = remove(store, target, force=force, dry_run=dry_run,
                         on_wait=lambda: console.print("a build is running on this store; rm waits for it"))
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        out.print(f"{verb} build record {r['ref']}" if "ref" in r
                  else f"{verb} {r['key'][:12]} {r['stage']} ({_fmt_size(r['size'])})")
    arts = [r for r in removed if "key" in r]
    out.print(f"{verb} {len(arts)} artifacts, {_fmt_size(sum(r['size'] for r in arts))}")


@main.command(name="export")
@click.argument("target", metavar="KEY|PROFILE")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--copy", is_flag=True,
              help="Copy every file. By default files are hard-linked where the file system allows (no space "
                   "used; editing an exported file in place would then edit the store's copy).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
def export_cmd(target: str, directory: str, store_dir: str | None, copy: bool, as_json: bool) -> None:
    """Copy an artifact out of the store into DIRECTORY (new or empty), each file verified by its sha256.

    KEY (or a unique prefix): that artifact's files. PROFILE: the exported checkpoint of each target of its
    last build (in DIRECTORY/<target> when there are several). The manifest comes along as
    toolchain-manifest.json. Exit 1 if a file does not match its manifest, 2 for bad input.
    """
    from .verbs import export

    try:
        docs = export(_store(store_dir), target, directory, copy=copy)
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    for d in docs:
        out.print(f"exported {d['key'][:12]} {d['stage']} -> {d['dir']} ({d['files']} files, "
                  f"{_fmt_size(d['size'])}, {d['linked']} hard-linked, {d['copied']} copied, sha256 verified)")


@main.command()
@click.argument("profiles", nargs=-1, metavar="[PROFILE]...")
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("-o", "--output", "html_path", metavar="FILE.html",
              help="Write the HTML report here [default report.html unless only --markdown or --json is given].")
@click.option("--markdown", "md_path", metavar="FILE.md",
              help="Also write the report as Markdown (`-` for stdout), e.g. for $GITHUB_STEP_SUMMARY.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON on stdout instead.")
def report(profiles: tuple[str, ...], store_dir: str | None, html_path: str | None, md_path: str | None,
           as_json: bool) -> None:
    """Report builds from the store: one self-contained HTML file (inline SVG charts, opens offline) and/or
    Markdown with the same content.

    \b
    PROFILE: YAML files or profile names (default: every build in the store), side by side in one table and
    one chart. Per build: each target's gates with values and thresholds, perplexity / KL / top-1 against the
    reference, per-layer weight error where recorded, speed per batch size with the bandwidth roofline, which
    runtimes load each artifact and why not, and the provenance (keys, versions, card, dataset protocol).
    """
    from .report import collect
    from .report import html as html_report
    from .report import markdown as md_report

    try:
        doc = collect(_store(store_dir), list(profiles) or None)
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps(_finite(doc), indent=2))
        return
    if md_path == "-":
        click.echo(md_report.render(doc), nl=False)
    elif md_path:
        Path(md_path).write_text(md_report.render(doc))
        out.print(f"wrote {md_path}", soft_wrap=True)
    if html_path or not md_path:
        html_path = html_path or "report.html"
        Path(html_path).write_text(html_report.render(doc))
        if md_path != "-":
            out.print(f"wrote {html_path}", soft_wrap=True)


@main.command()
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def gc(store_dir: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove artifacts that no profile's last build references, and leftovers of killed builds."""
    store = _store(store_dir)
    if not dry_run:
        from .checks import check_store_writable

        check_store_writable(store.root)

    def waiting() -> None:
        console.print("a build is running on this store; gc waits for it to finish")

    removed = store.gc(dry_run=dry_run, on_wait=waiting)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        out.print(f"{verb} {r['key'][:12]} {r['stage']} ({_fmt_size(r['size'])})")
    out.print(f"{verb} {len(removed)} entries, {_fmt_size(sum(r['size'] for r in removed))}")


@main.command(name="verify")
@click.argument("target", metavar="[KEY|PROFILE]", required=False)
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def verify_cmd(target: str | None, store_dir: str | None, as_json: bool) -> None:
    """Re-hash every file of the artifacts a profile's last build references (PROFILE: a file or a name), of
    one artifact (a key prefix), or of the whole store (no argument). Exit 1 naming each file that changed."""
    from .verify import resolve, verify

    try:
        store = _store(store_dir)
        what, keys = resolve(store, target)
        doc = {"verified": what, **verify(store, keys)}
    except ToolchainError as e:
        _fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for p in doc["problems"]:
            click.echo(f"{p['problem']}: {p['path']} (stage {p['stage']}, key {p['key'][:12]})", err=True)
        n = len(doc["problems"])
        verdict = "all match" if doc["ok"] else f"{n} file{'s do' if n > 1 else ' does'} not match"
        click.echo(f"verified {what}: {doc['artifacts']} artifacts, {doc['files']} files, "
                   f"{_fmt_size(doc['bytes'])} in {doc['seconds']:.1f} s: {verdict}")
    sys.exit(0 if doc["ok"] else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Report torch, CUDA/GPU and the optional backends: found (with version) or missing (with the install)."""
    from .doctor import checks

    rows = checks()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="toolchain doctor")
    for col in ("component", "status", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "[green]found[/]" if r["found"] else "[yellow]missing[/]", r["detail"])
    out.print(table)


if __name__ == "__main__":
    main()
