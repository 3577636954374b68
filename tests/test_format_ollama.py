"""ollama export: GGUF + Modelfile. The Modelfile is parsed back, its Go template is executed (a subset of Go's
text/template, with ollama's data model) and compared with the HF chat template rendered by transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import needs_smollm2, smol_profile, tiny_profile, write_profile

import toolchain.formats.gguf.spec as G
import toolchain.formats.ollama.export as O
from toolchain.errors import BuildError
from toolchain.formats.ollama.check import modelfile_check, ollama_render, render_go_template

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_modelfile_quoting_round_trips():
    cmds = [("FROM", "./model.gguf"), ("TEMPLATE", "{{ .System }}\n  indented \"quoted\"\n"),
            ("SYSTEM", " leading space"), ("PARAMETER stop", "<|im_end|>"), ("PARAMETER temperature", "0.7"),
            ("LICENSE", "Apache License 2.0\n\nfull text")]
    text = O.write_modelfile(cmds)
    assert O.parse_modelfile("# a comment\n\n" + text) == cmds


def test_modelfile_parser_reads_ollama_grammar():
    text = 'FROM ./m.gguf\nparameter stop "<|eot_id|>"\nSYSTEM """two\nlines"""\nTEMPLATE {{ .Prompt }}\n'
    assert O.parse_modelfile(text) == [("FROM", "./m.gguf"), ("PARAMETER stop", "<|eot_id|>"),
                                       ("SYSTEM", "two\nlines"), ("TEMPLATE", "{{ .Prompt }}")]
    with pytest.raises(ValueError, match="invalid command"):
        O.parse_modelfile("FROM x\nTEMPLATES y\n")
    with pytest.raises(ValueError, match="no FROM"):
        O.parse_modelfile("SYSTEM hi\n")
    with pytest.raises(ValueError, match="unterminated"):
        O.parse_modelfile('FROM x\nSYSTEM """open\n')


def test_go_renderer_on_ollamas_own_chatml_case():
    """ollama's template_test.go case 'chatml/messages': its template, its messages, its expected text."""
    tmpl = ("\n{{- range $index, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "You are a helpful assistant!"}, {"role": "user", "content": "Hello friend!"},
            {"role": "assistant", "content": "Hello human!"}, {"role": "user", "content": "What is your name?"}]
    want = ("<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
            "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
            "<|im_start|>assistant\n")
    tmpl = tmpl.replace("range $index, $_ := .Messages", "range .Messages")  # the subset: no range variables
    assert ollama_render(tmpl, None, msgs) == want
    # trim markers and if/else
    assert render_go_template("a  {{- if .X }} yes {{- else }} no {{- end -}}  b", {"X": ""}) == "a nob"


def test_go_template_structure_check():
    assert O.check_go_template(O.FAMILIES[0].go_template) == []
    assert "1 block(s) not closed" in O.check_go_template("{{ range .Messages }}x")
    assert "unknown field .Rol" in O.check_go_template("{{ range .Messages }}{{ .Rol }}{{ end }}")


@pytest.fixture(scope="module")
def smol_tok(tmp_path_factory) -> tuple[Path, Path]:
    from test_format_gguf import smol_tokenizer_files

    return smol_tokenizer_files(tmp_path_factory.getbasetemp())


def _smol_dir(smol_tok, tmp_path: Path) -> tuple[Path, Path]:
    """The SmolLM2 tokenizer as an HF dir, and a fresh ollama dir holding a vocabulary-only GGUF of it."""
    tok_dir, gguf_dir = smol_tok
    out = tmp_path / "ollama"
    shutil.copytree(gguf_dir, out)
    return tok_dir, out


def _write(out: Path, tok_dir: Path, **options) -> dict:
    cmds, info = O.modelfile_commands(tok_dir, O.OllamaOptions(**options), *O.gguf_vocab(out / G.FILE_NAME), {})
    (out / O.MODELFILE).write_text(O.write_modelfile(cmds))
    return info


@needs_smollm2
def test_smollm2_chatml_template_converted_and_proven(smol_tok, tmp_path):
    tok_dir, out = _smol_dir(smol_tok, tmp_path)
    info = _write(out, tok_dir, license="apache-2.0")
    assert info["template"] == "chatml" and info["default_system"] == SMOL_SYSTEM
    assert info["stops"] == ["<|im_end|>", "<|im_start|>"]  # eos (id 2) is <|im_end|>
    cmds = dict(O.parse_modelfile((out / O.MODELFILE).read_text()))
    assert cmds["FROM"] == "./model.gguf" and cmds["SYSTEM"] == SMOL_SYSTEM and cmds["LICENSE"] == "apache-2.0"
    check = modelfile_check(out, tok_dir, {})
    assert check["problems"] == [] and check["probes_rendered"] == len(O.PROBES)


@needs_smollm2
def test_broken_template_system_and_stop_are_caught(smol_tok, tmp_path, monkeypatch):
    tok_dir, out = _smol_dir(smol_tok, tmp_path)
    chatml = O.FAMILIES[0]
    broken = O.Family("chatml", chatml.render, chatml.go_template.replace("{{ .Role }}\n", "{{ .Role }} "),
                      chatml.stops)
    monkeypatch.setattr(O, "FAMILIES", (broken, *O.FAMILIES[1:]))
    _write(out, tok_dir)
    assert any("TEMPLATE renders" in p for p in modelfile_check(out, tok_dir, {})["problems"])
    monkeypatch.undo()

    _write(out, tok_dir, system="Something else")  # overriding the system prompt is allowed and declared
    assert modelfile_check(out, tok_dir, {"options": {"system": "Something else"}})["problems"] == []
    assert any("TEMPLATE renders" in p for p in modelfile_check(out, tok_dir, {})["problems"])

    text = O.write_modelfile([("FROM", "./model.gguf"), ("PARAMETER stop", "<|eot_id|>")])
    (out / O.MODELFILE).write_text(text)
    assert modelfile_check(out, tok_dir, {})["problems"] == ["stop '<|eot_id|>' is not a token of the GGUF vocabulary"]


def test_quoting_bug_fails_the_export_self_check(monkeypatch):
    cmds = [("FROM", "./m.gguf"), ("SYSTEM", "two\nlines"), ("TEMPLATE", '"quoted"')]
    O.checked_modelfile(cmds)
    monkeypatch.setattr(O, "quote", lambda v: v)
    with pytest.raises(BuildError, match="quoting bug"):
        O.checked_modelfile(cmds)


@needs_smollm2
def test_llama3_family_detected_and_rendered(smol_tok, tmp_path):
    """A Llama-3-format template (written here) is recognised; the Go template renders the same prompt once
    llama.cpp has added the bos token."""
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(smol_tok[0], tok_dir)
    (tok_dir / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    fam, default = O.match_family(tok)
    assert fam.name == "llama3" and default is None
    for probe in O.PROBES:
        assert tok.bos_token + ollama_render(fam.go_template, None, probe) == O.render_hf(tok, probe)


def test_unknown_template_is_left_to_ollama(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    assert O.match_family(tok) is None


def test_tiny_pipeline_without_tokenizer(cli, tmp_path):
    data = tiny_profile(targets=[{"format": "ollama"}])
    doc = json.loads(cli("build", str(write_profile(tmp_path, data)), "--store", str(tmp_path / "s"), "--json").stdout)
    assert doc["targets"][0]["status"] == "built", doc["stages"]
    out = Path(doc["targets"][0]["path"])
    assert O.parse_modelfile((out / "Modelfile").read_text()) == [("FROM", "./model.gguf")]
    assert doc["targets"][0]["conformance"]["max_abs_err"] == 0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_ollama_pipeline_and_create(smol_store, tmp_path):
    """The full target on SmolLM2: weights, tokenizer and Modelfile checked, logits scored; then `ollama create`
    where ollama is installed."""
    from conftest import build_json

    profile = write_profile(tmp_path, smol_profile(targets=[{"format": "ollama", "type": "Q8_0"}]))
    doc = build_json(str(profile), "--store", str(smol_store))
    t = doc["targets"][0]
    assert t["status"] in ("built", "cached"), doc["stages"]
    assert t["conformance"]["max_abs_err"] == 0
    if shutil.which("ollama") is None:
        pytest.skip("ollama not installed (https://ollama.com/download); the Modelfile was checked without it")
    r = subprocess.run(["ollama", "create", "toolchain-test-smollm2", "-f", "Modelfile"], cwd=t["path"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
