"""IR -> an ollama import directory: the GGUF (toolchain.formats.gguf.export) plus a Modelfile that `ollama create NAME
-f Modelfile` reads:
  FROM ./model.gguf
  TEMPLATE  the HF chat template rewritten in ollama's Go-template syntax, for the families we can prove:
            ChatML (<|im_start|>role ... <|im_end|>, SmolLM2, Qwen) and Llama 3 (<|start_header_id|>...<|eot_id|>).
            A family is accepted only when the HF template (rendered by transformers) produces exactly the
            family's text on probe conversations. Otherwise no TEMPLATE is written and ollama falls back to its
            own detection from the GGUF's tokenizer.chat_template; the manifest says so.
  SYSTEM    the default system prompt the HF template inserts when a conversation has none (ollama prepends the
            Modelfile's SYSTEM as a system message when a chat request starts without one).
  PARAMETER stop  the family's end-of-turn markers and the eos token.
  LICENSE   the `license` option, else the source GGUF's general.license.
The Modelfile grammar (ollama's parser/parser.go): a command word, then a value that is bare (to the end of the
line), "quoted" or \"\"\"triple-quoted\"\"\" (may span lines); # starts a comment line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError
from ..gguf.export import chat_template_of, source_gguf_fields, write_gguf
from ..gguf.spec import FILE_NAME, GGUFOptions
from .spec import MODELFILE, OllamaOptions

if TYPE_CHECKING:
    from ...stage import StageContext


Message = dict[str, str]


@dataclass(frozen=True)
class Family:
    """A chat format: how it renders messages (to compare with the HF template), its Go template, its stops."""

    name: str
    render: Callable[[list[Message], str], str]  # (messages, bos text) -> prompt with the assistant turn opened
    go_template: str
    stops: tuple[str, ...]


def _chatml(msgs: list[Message], bos: str) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"


def _llama3(msgs: list[Message], bos: str) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                    for m in msgs)
    return bos + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# ollama hands a template .Messages (system messages included, in order); each template opens the assistant turn.
FAMILIES = (
    Family("chatml", _chatml,
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
           ("<|im_end|>", "<|im_start|>")),
    Family("llama3", _llama3,
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
           ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
)

PROBES: tuple[list[Message], ...] = (
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3"}],
)


def render_hf(tokenizer, msgs: list[Message]) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def match_family(tokenizer) -> tuple[Family, str | None] | None:
    """The family whose rendering equals the HF template's on every probe, and the default system prompt the HF
    template inserts when there is none (None if it inserts nothing)."""
    bos = tokenizer.bos_token or ""
    for fam in FAMILIES:
        user_only = PROBES[0]
        hf = render_hf(tokenizer, user_only)
        default = None
        bare = fam.render(user_only, bos)
        if hf != bare:
            default = _default_system(fam, hf, user_only, bos)
            if default is None:
                continue
        if all(render_hf(tokenizer, p) == fam.render(with_system(p, default), bos) for p in PROBES):
            return fam, default
    return None


def _default_system(fam: Family, hf: str, msgs: list[Message], bos: str) -> str | None:
    """Recover the system text S for which fam renders [system S] + msgs as `hf`."""
    marker = "\x00SYSTEM\x00"
    pattern = fam.render(with_system(msgs, marker), bos)
    before, _, after = pattern.partition(marker)
    if hf.startswith(before) and hf.endswith(after) and len(hf) >= len(before) + len(after):
        return hf[len(before): len(hf) - len(after)]
    return None


def with_system(msgs: list[Message], system: str | None) -> list[Message]:
    if system is None or (msgs and msgs[0]["role"] == "system"):
        return msgs
    return [{"role": "system", "content": system}, *msgs]


# -- the Modelfile -----------------------------------------------------------------------------------------

def quote(value: str) -> str:
    """A Modelfile value: bare when it is one line without edge spaces, else quoted."""
    if '"""' in value:
        raise BuildError('a Modelfile value cannot contain """')
    if "\n" in value or '"' in value or value != value.strip() or not value:
        return f'"""{value}"""'
    return value


def write_modelfile(commands: list[tuple[str, str]]) -> str:
    return "".join(f"{name} {quote(value)}\n" for name, value in commands)


def checked_modelfile(commands: list[tuple[str, str]]) -> str:
    """The Modelfile text, refused unless ollama's grammar reads back exactly these commands."""
    text = write_modelfile(commands)
    try:
        ok = parse_modelfile(text) == commands
    except ValueError:
        ok = False
    if not ok:
        raise BuildError("the Modelfile does not parse back to what we wrote (quoting bug)")
    return text


TRIPLE = re.compile(r'"""(.*?)"""(?=[ \t\r\n]|$)', re.S)
SINGLE = re.compile(r'"(.*?)"(?=[ \t\r\n]|$)', re.S)
COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, value) pairs, PARAMETER as ("PARAMETER name", value): ollama's grammar, read independently of
    write_modelfile so a quoting bug shows up as a mismatch."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            eol = text.find("\n", i)
            i = n if eol < 0 else eol
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        if not m or m.group(1).lower() not in COMMANDS:
            raise ValueError(f"Modelfile: invalid command at offset {i}: {text[i:i + 20]!r}")
        name, i = m.group(1).upper(), m.end()
        if name in ("PARAMETER", "MESSAGE"):
            m = re.compile(r"([A-Za-z0-9_]+)[ \t]+").match(text, i)
            if not m:
                raise ValueError(f"Modelfile: {name} without a name at offset {i}")
            name, i = f"{name} {m.group(1)}", m.end()
        if text.startswith('"', i):
            # a quoted value ends at the first closing quote(s) followed by whitespace or the end, as ollama's
            # parser only tries to unquote at whitespace
            m = (TRIPLE if text.startswith('"""', i) else SINGLE).match(text, i)
            if not m:
                raise ValueError(f"Modelfile: unterminated quote at offset {i}")
            value, i = m.group(1), m.end()
        else:
            end = text.find("\n", i)
            end = n if end < 0 else end
            value, i = text[i:end].strip(), end
        out.append((name, value))
    if not any(c == "FROM" for c, _ in out):
        raise ValueError("Modelfile: no FROM line")
    return out


GO_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
GO_FIELDS = {".Messages", ".Role", ".Content", ".System", ".Prompt", ".Response", "$.Messages", "$.System"}


def check_go_template(tmpl: str) -> list[str]:
    """Structural check of a Go template (balanced range/if/with ... end, only fields ollama provides).
    Returns the problems found (empty = fine)."""
    problems, depth = [], 0
    for action in GO_ACTION.findall(tmpl):
        word = action.split(" ", 1)[0]
        if word in ("range", "if", "with"):
            depth += 1
        elif word == "end":
            depth -= 1
            if depth < 0:
                problems.append("{{ end }} without an opening block")
        for field in re.findall(r"\$?\.[A-Za-z]+", action):
            if field not in GO_FIELDS:
                problems.append(f"unknown field {field}")
    if depth > 0:
        problems.append(f"{depth} block(s) not closed")
    if tmpl.count("{{") != tmpl.count("}}"):
        problems.append("unbalanced {{ }}")
    return problems


def modelfile_commands(ir_dir: Path, opts: OllamaOptions, vocab: list[str], eos: str | None, src: dict[str, Any]
                       ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    from transformers import AutoTokenizer

    commands: list[tuple[str, str]] = [("FROM", f"./{FILE_NAME}")]
    info: dict[str, Any] = {"template": None}
    stops: list[str] = []
    if chat_template_of(ir_dir) is not None:
        tok = AutoTokenizer.from_pretrained(ir_dir)
        found = match_family(tok)
        if found is None:
            info["template"] = ("not converted: the chat template is not ChatML or Llama 3; ollama infers one "
                                "from the GGUF's tokenizer.chat_template")
        else:
            fam, default_system = found
            commands.append(("TEMPLATE", fam.go_template))
            system = opts.system if opts.system is not None else default_system
            if system:
                commands.append(("SYSTEM", system))
            stops += [s for s in fam.stops if s in vocab]
            info.update(template=fam.name, default_system=default_system)
        if eos:
            stops.append(eos)
    for s in dict.fromkeys(stops):
        commands.append(("PARAMETER stop", s))
    for k, v in opts.parameters.items():
        commands.append((f"PARAMETER {k}", str(v)))
    license_text = opts.license or src.get("general.license")
    if license_text:
        commands.append(("LICENSE", str(license_text)))
    info.update(stops=list(dict.fromkeys(stops)), license=bool(license_text))
    return commands, info


def gguf_vocab(path: Path) -> tuple[list[str], str | None]:
    """The GGUF's tokens and its eos token's text (the file's own ids, not a tokenizer_config's guess)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    if "tokenizer.ggml.tokens" not in fields:
        return [], None
    tokens = fields["tokenizer.ggml.tokens"].contents()
    eos = fields["tokenizer.ggml.eos_token_id"].contents() if "tokenizer.ggml.eos_token_id" in fields else None
    return tokens, (tokens[eos] if eos is not None else None)


def run(ctx: StageContext) -> dict[str, Any]:
    opts = OllamaOptions.model_validate(ctx.config.get("options", {}))
    source_gguf = ctx.data.get("source_gguf")
    gguf_opts = opts.model_dump(include=set(GGUFOptions.model_fields))
    info = write_gguf(ctx.inputs["quantize"], ctx.out / FILE_NAME, gguf_opts, source_gguf, ctx.reporter)
    commands, mf_info = modelfile_commands(ctx.inputs["quantize"], opts, *gguf_vocab(ctx.out / FILE_NAME),
                                           source_gguf_fields(source_gguf))
    (ctx.out / MODELFILE).write_text(checked_modelfile(commands))
    return {**info, "format": "ollama", "modelfile": mf_info, "gguf": FILE_NAME,
            "create": f"ollama create NAME -f {MODELFILE}"}
