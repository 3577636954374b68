"""The `toolchain` command. Parsing and presentation only: the work lives in plan, run and the stage modules.

Exit codes: 0 ok; 1 a build or a gate failed; 2 bad input (profile, paths, recipe, missing tool).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import InputError, ToolchainError
from .progress import Reporter, console

STORE_HELP = "Artifact store directory [env TOOLCHAIN_STORE; default ./artifacts]."


def _store(path: str | None):
    from .store import Store

    return Store(path or os.environ.get("TOOLCHAIN_STORE") or "artifacts")


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
    return prof.from_dict(data, loaded.path, loaded.base_dir)


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
        click.echo(json.dumps({"error": str(e), "exit_code": e.exit_code}))
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="toolchain")
def main() -> None:
    """Build quantized, validated LLM checkpoints from a declarative profile, cached by content hash.

    \b
    A profile (YAML) names a source model, a quantization recipe, target formats and accuracy gates:
      toolchain plan profiles/smollm2-int4.yaml     what would run, what is cached, and why
      toolchain build profiles/smollm2-int4.yaml    run it (a second run is a no-op)
      toolchain ls / inspect KEY / gc --dry-run     look after the artifact store
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
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: here, stage after stage. ray: every variant's stages as tasks on a Ray cluster (pip "
                   "install 'toolchain[ray]'); workers share artifacts through --cache, else the store must be a "
                   "filesystem every node mounts at the same path.")
@click.option("--address", default="auto", show_default=True, metavar="auto|HOST:PORT|ray://HOST:PORT",
              help="The Ray cluster to run on (--executor ray).")
@click.option("--max-retries", type=click.IntRange(0, 100), default=2, show_default=True,
              help="With --executor ray: times a stage is retried when its worker dies or it raises.")
def build(profiles: tuple[str, ...], store_dir: str | None, source: str | None, as_json: bool, quiet: bool,
          cache: str | None, insecure: bool, executor: str, address: str, max_retries: int) -> None:
    """Build PROFILE... (default: the SmolLM2 INT4 demo profile): every stage that is not cached, of every variant
    of a profile with `matrix:` (a stage the variants share is built once).

    Exit code 0 when every target is built and passed its gates, 1 when a stage or a gate failed,
    2 for bad input, 130 when interrupted.
    """
    t0 = time.perf_counter()
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
        try:
            per_plan = execute_all(plans, store, reporter, executor, remote=remote, cache=cache, insecure=insecure,
                                   address=address, max_retries=max_retries)
        finally:
            if remote is not None:
                remote.close()
    except ToolchainError as e:
        _fail(e, as_json)
        return
    except KeyboardInterrupt:
        click.echo("error: interrupted; every store holds only finished artifacts (run build again to go on)",
                   err=True)
        sys.exit(130)
    seconds = time.perf_counter() - t0
    docs = [_document(plan, store, results, seconds) for plan, results in zip(plans, per_plan, strict=True)]
    doc = docs[0] if len(docs) == 1 else {"variants": docs, "store": str(store.root), "seconds": round(seconds, 3),
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
    failed = any(s["status"] == "failed" for d in docs for s in d["stages"])
    sys.exit(1 if failed else 0)


def _failures(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"variant": d["profile"], "stage": s["name"], "reason": s["reason"]}
            for d in docs for s in d["stages"] if s["status"] == "failed"]


def _print_matrix(doc: dict[str, Any]) -> None:
    """One line per variant, then each failure: which variant, which stage, why."""
    from rich.markup import escape

    console.print(f"[bold]matrix: {len(doc['variants'])} variants, {doc['seconds']:.2f} s[/]")
    for d in doc["variants"]:
        counts: dict[str, int] = {}
        for s in d["stages"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        console.print(escape(f"  {d['profile']}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))))
    for f in doc["failures"]:
        console.print(escape(f"  FAILED {f['variant']} {f['stage']}: {f['reason']}"), style="bold red")


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
    doc = {"profile": loaded.profile.name, "source": p.source.label, "notes": p.notes, "stages": stages,
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
    console.print(table)
    _print_runtimes(doc["targets"])


def _print_runtimes(targets: list[dict[str, Any]]) -> None:
    """Per target: which runtimes (with versions) will load the artifact, and why not where they will not."""
    from rich.markup import escape

    for t in targets:
        console.print(f"[bold]{t['name']}[/] ({t['format']}): runtimes")
        for v in t["runtimes"]:
            verdict = "[green]loads it[/]" if v["loads"] else "[bold red]will NOT load it[/]"
            console.print(f"  {v['runtime']} {escape(v['version'])}: {verdict}", soft_wrap=True)
            for r in v["rules"]:
                head = "why" if r["effect"] == "refuses" else "caveat"
                console.print(escape(f"    {head}: {r['says']}; fix: {r['fix']} [rule {r['id']}: {r['source']}]"),
                              soft_wrap=True)


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
            "verdict": val.reason if val else None,  # "all gates passed", "no gates (...)", "gate failed: ..."
            "export_fidelity": val.info.get("export_fidelity") if val else None,
            "engine": {"path": str(store.object_dir(engine.key)), "status": engine.status, "reason": engine.reason}
            if engine else None,
            "published": publish.info.get("published") if publish and publish.status in ("built", "cached")
            else None,
            "runtimes": plan.runtimes.get(t.label, []),
            "speed": {"status": speed.status, "reason": speed.reason, **speed.info.get("speed", {})} if speed else None,
        })
    return {
        "profile": plan.profile.profile.name,
        "source": plan.source.label,
        "store": str(store.root),
        "seconds": round(seconds, 3),
        "notes": plan.notes,
        "stages": [{"name": r.name, "key": r.key, "status": r.status, "seconds": round(r.seconds, 3),
                    "size": r.size, "reason": r.reason, **({"node": r.node} if r.node else {})} for r in results],
        "targets": targets,
    }


def _print_summary(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{doc['profile']}: {doc['seconds']:.2f} s")
    for col in ("stage", "status", "seconds", "size", "result"):
        table.add_column(col)
    colours = {"built": "green", "cached": "cyan", "failed": "bold red", "skipped": "dim"}
    for s in doc["stages"]:
        table.add_row(s["name"], f"[{colours[s['status']]}]{s['status']}[/]", f"{s['seconds']:.2f}",
                      _fmt_size(s["size"]) if s["size"] else "", s["reason"] if s["status"] != "cached" else "")
    console.print(table)
    for t in doc["targets"]:
        v = t["validation"] or {}
        console.print(f"[bold]{t['format']}[/]: {t['status']} -> {t['path']}")
        if "ppl" in v:
            console.print(
                f"  perplexity {v['reference_ppl']:.3f} (reference) -> {v['ppl']:.3f} ({v['ppl_increase_pct']:+.2f}%),"
                f" KL {v['kl_mean']:.4f}, top-1 agreement {v['top1_agreement']:.4f}\n"
                f"  measured on {Path(v['dataset']).name}: {v['tokens']} tokens, seq_len {v['seq_len']}, "
                f"stride {v['stride']}, tokenizer {v['tokenizer']}, {v['runtime']}")
        elif v:
            console.print(f"  {v.get('reason', '')}")
        if "ppl" in v and t.get("verdict"):
            console.print(f"  {t['verdict']}")
        if t.get("checked_by"):
            console.print(f"  model.json checked by {t['checked_by']}")
        if t["runtimes"]:
            from .runtimes.rules import summary

            console.print(f"  runtimes: {summary(t['runtimes'])}")
        if t.get("speed"):
            _print_speed(t["speed"])
    for note in doc["notes"]:
        console.print(f"[bold yellow]{note}[/]")


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
        console.print(f"  speed: {sp['status']}: {sp['reason']}")
        return
    card = sp["card"]
    console.print(f"  speed ({sp['status']}) by {sp['runtime']} {sp.get('runtime_version') or ''} on {card['name']}"
                  f" (driver {card.get('driver', '?')}), copy bandwidth {sp['copy_bandwidth_gbs']:.0f} GB/s:")
    for b in sp["per_batch"]:
        if b.get("skipped"):
            console.print(f"    batch {b['batch_size']:>3}: {b['skipped']}")
            continue
        ratio = b.get("bandwidth_ratio")
        console.print(
            f"    batch {b['batch_size']:>3}: TTFT {b['ttft_ms']:.1f} ms, prefill {b['prefill_tok_s']:.0f} tok/s, "
            f"decode {b['decode_tok_s']:.1f} tok/s, ITL p50 {b['itl_ms_p50']:.2f} / p99 {b['itl_ms_p99']:.2f} ms"
            + (f", {b['effective_bandwidth_gbs']:.0f} GB/s ({100 * ratio:.0f}% of copy)" if ratio else ""))
    if sp["status"] == "failed":
        console.print(f"  [bold red]{sp['reason']}[/]")


@main.command(name="ls")
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(store_dir: str | None, as_json: bool) -> None:
    """List the artifacts in the store."""
    from rich.table import Table

    store = _store(store_dir)
    rows = [{"key": m["key"], "stage": m["stage"], "status": m.get("status", "ok"), "profile": m.get("profile"),
             "size": m.get("size", 0), "seconds": m.get("seconds")} for m in store.ls()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} artifacts in {store.root}")
    for col in ("key", "stage", "status", "profile", "size", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"][:12], r["stage"], r["status"], r["profile"] or "", _fmt_size(r["size"]),
                      f"{r['seconds']:.1f}" if r["seconds"] is not None else "")
    console.print(table)


@main.command()
@click.argument("target")
@click.option("--store", "store_dir", help=STORE_HELP)
def inspect(target: str, store_dir: str | None) -> None:
    """Print the manifest of an artifact: TARGET is a key (or a unique prefix) or an artifact directory."""
    path = Path(target)
    if (path / "manifest.json").is_file():
        click.echo((path / "manifest.json").read_text())
        return
    store = _store(store_dir)
    try:
        key = store.find(target)
    except KeyError as e:
        click.echo(f"error: {e.args[0]}", err=True)
        sys.exit(2)
    click.echo((store.object_dir(key) / "manifest.json").read_text())


@main.command()
@click.option("--store", "store_dir", help=STORE_HELP)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def gc(store_dir: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove artifacts that no profile's last build references, and leftovers of killed builds."""
    store = _store(store_dir)

    def waiting() -> None:
        console.print("a build is running on this store; gc waits for it to finish")

    removed = store.gc(dry_run=dry_run, on_wait=waiting)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        console.print(f"{verb} {r['key'][:12]} {r['stage']} ({_fmt_size(r['size'])})")
    console.print(f"{verb} {len(removed)} entries, {_fmt_size(sum(r['size'] for r in removed))}")


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
    console.print(table)


if __name__ == "__main__":
    main()
