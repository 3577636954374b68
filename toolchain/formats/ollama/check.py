"""validate:<ollama target>: the GGUF as the gguf target checks it, then the Modelfile: parsed as ollama parses it,
its Go template rendered against the source's chat template."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...stage import StageContext
from ..gguf.check import validate_gguf
from ..gguf.spec import FILE_NAME

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _go_parse(tmpl: str) -> list:
    """A Go text/template of the subset ollama chat templates use (text, {{ .Field }}, {{ $.Field }},
    range/if/else/end, trim markers) -> a tree of ("text", s) | ("field", path) | (kind, path, body, else)."""
    tokens: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(tmpl):
        text = tmpl[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = tmpl[pos:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))

    def block(i: int) -> tuple[list, list | None, int]:
        body: list = []
        other: list | None = None
        cur = body
        while i < len(tokens):
            kind, val = tokens[i]
            i += 1
            if kind == "text":
                if val:
                    cur.append(("text", val))
                continue
            word, _, arg = val.partition(" ")
            if word in ("range", "if"):
                inner, alt, i = block(i)
                cur.append((word, arg.strip(), inner, alt))
            elif word == "else":
                other = cur = []
            elif word == "end":
                return body, other, i
            elif re.fullmatch(r"\$?(\.[A-Za-z]+)+|\.", val):
                cur.append(("field", val))
            else:
                raise ValueError(f"unsupported Go template action {{{{ {val} }}}}")
        return body, other, i

    tree, _alt, _i = block(0)
    return tree


def render_go_template(tmpl: str, data: dict[str, Any]) -> str:
    """Execute the subset parsed by _go_parse against ollama's data (System, Messages [{Role, Content}])."""

    def lookup(path: str, dot: Any) -> Any:
        obj = data if path.startswith("$") else dot
        for part in path.lstrip("$").split(".")[1:]:
            if part:
                obj = obj.get(part, "") if isinstance(obj, dict) else ""
        return obj

    def run(nodes: list, dot: Any) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "field":
                out.append(str(lookup(node[1], dot)))
            elif node[0] == "if":
                out.append(run(node[2] if lookup(node[1], dot) else (node[3] or []), dot))
            elif node[0] == "range":
                items = lookup(node[1], dot) or []
                out.append("".join(run(node[2], item) for item in items) if items else run(node[3] or [], dot))
        return "".join(out)

    return run(_go_parse(tmpl), data)


def ollama_render(template: str, system: str | None, msgs: list[dict[str, str]]) -> str:
    """What ollama feeds the model for a chat request: the Modelfile's SYSTEM is prepended when the request has
    no system message (server/routes.go), then the template gets .System and .Messages (template.go)."""
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    go_msgs: list[dict[str, str]] = []
    for m in msgs:  # consecutive messages of one role are merged (template.go's collate)
        if go_msgs and go_msgs[-1]["Role"] == m["role"]:
            go_msgs[-1]["Content"] += "\n\n" + m["content"]
        else:
            go_msgs.append({"Role": m["role"], "Content": m["content"]})
    sys_text = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return render_go_template(template, {"System": sys_text, "Messages": go_msgs})


def modelfile_check(export_dir: Path, ir_dir: Path, export_config: dict[str, Any]) -> dict[str, Any]:
    """Parse the Modelfile back and check what it claims: FROM is the GGUF, the Go template renders like the HF
    chat template (through transformers) on probe conversations, every stop string is a token of the vocab."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from .export import PROBES, check_go_template, parse_modelfile, render_hf
    from .spec import MODELFILE

    problems: list[str] = []
    cmds = parse_modelfile((export_dir / MODELFILE).read_text())
    get = {c: v for c, v in cmds}
    if (export_dir / get["FROM"]).resolve() != (export_dir / FILE_NAME).resolve():
        problems.append(f"FROM {get['FROM']} is not ./{FILE_NAME}")
    fields = GGUFReader(str(export_dir / FILE_NAME)).fields
    vocab = set(fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in fields else set()
    stops = [v for c, v in cmds if c == "PARAMETER stop"]
    problems += [f"stop {s!r} is not a token of the GGUF vocabulary" for s in stops if s not in vocab]
    rendered = 0
    if "TEMPLATE" in get:
        problems += check_go_template(get["TEMPLATE"])
        tok = AutoTokenizer.from_pretrained(ir_dir)
        overridden = export_config.get("options", {}).get("system") is not None
        add_bos = "tokenizer.ggml.add_bos_token" in fields and fields["tokenizer.ggml.add_bos_token"].contents()
        bos = (tok.bos_token or "") if add_bos else ""  # llama.cpp adds it when tokenizing the prompt
        for probe in PROBES:
            if overridden and probe[0]["role"] != "system":
                continue  # the user replaced the default system prompt: HF's text differs by design
            ours = bos + ollama_render(get["TEMPLATE"], get.get("SYSTEM"), probe)
            if ours != render_hf(tok, probe):
                problems.append(f"TEMPLATE renders {ours!r} where the HF chat template gives "
                                f"{render_hf(tok, probe)!r}")
                break
            rendered += 1
    return {"commands": [c for c, _ in cmds], "stops": stops, "probes_rendered": rendered, "problems": problems}


def run_validate_ollama(ctx: StageContext) -> dict[str, Any]:
    manifest = ctx.input_manifests["export"]
    check = modelfile_check(ctx.inputs["export"], ctx.inputs["quantize"], manifest.get("config", {}))
    if check["problems"]:
        return {"format": ctx.config["format"], "modelfile": check, "passed": False, "status": "failed",
                "reason": "Modelfile: " + "; ".join(check["problems"])[:500]}
    result = validate_gguf(ctx, ctx.inputs["export"], manifest.get("info", {}))
    return {**result, "modelfile": check}
