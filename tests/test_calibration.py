"""Calibration samples: deterministic per seed, from text / JSONL / random, and never the evaluation text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT, needs_wikitext, tiny_profile, write_profile

from toolchain.errors import InputError
from toolchain.quant import calibration as cal

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def _src(tmp_path: Path, text: str = TEXT, name: str = "cal.txt") -> cal.CalibrationSource:
    p = tmp_path / name
    p.write_text(text)
    return cal.parse(str(p), Path)


def test_same_seed_same_samples_other_seed_other_samples(tmp_path):
    src = _src(tmp_path)
    a, info = cal.token_ids(src, "text", 8, 64, seed=0, tokenizer=None, vocab_size=1024)
    b, _ = cal.token_ids(src, "text", 8, 64, seed=0, tokenizer=None, vocab_size=1024)
    c, _ = cal.token_ids(src, "text", 8, 64, seed=1, tokenizer=None, vocab_size=1024)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert info["sampling"].startswith("non-overlapping")
    # Each sample is a window of the byte stream of the text, at a multiple of seq_len.
    stream = torch.tensor(list(TEXT.encode()))
    for row in a:
        starts = [s for s in range(0, len(stream) - 63, 64) if torch.equal(stream[s : s + 64], row)]
        assert starts, "a sample is not a window of the text"
    assert len({tuple(r.tolist()) for r in a}) == 8, "windows are drawn without replacement"
    assert info["preview"] and info["preview"] in TEXT


def test_short_text_uses_random_offsets_and_too_short_is_refused(tmp_path):
    src = _src(tmp_path, TEXT[:300])
    ids, info = cal.token_ids(src, "text", 8, 64, seed=0, tokenizer=None, vocab_size=1024)
    assert ids.shape == (8, 64) and info["sampling"].startswith("random offsets")
    with pytest.raises(InputError, match="fewer than seq_len"):
        cal.token_ids(_src(tmp_path, "tiny", "t.txt"), "text", 2, 64, seed=0, tokenizer=None, vocab_size=1024)


def test_jsonl_text_field(tmp_path):
    recs = [{"text": f"record {i} " * 20, "other": "x"} for i in range(50)]
    p = tmp_path / "cal.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    src = cal.parse(str(p), Path)
    assert cal.read_text(src, "text", 0) == "\n\n".join(r["text"] for r in recs)
    with pytest.raises(InputError, match="no field 'body'"):
        cal.read_text(src, "body", 0)


def test_random_ids_within_vocab():
    ids, info = cal.token_ids(cal.parse("random", Path), "text", 4, 32, seed=3, tokenizer=None, vocab_size=50)
    assert ids.shape == (4, 32) and int(ids.max()) < 50 and "random" in info["tokenizer"]


def test_hf_spec_is_checked():
    with pytest.raises(InputError, match="hf:<dataset>:<split>"):
        cal.read_text(cal.parse("hf:wikitext", Path), "text", 10)


def test_tokenizer_is_used_when_present(tmp_path):
    calls = []

    class Tok:
        def __call__(self, text, add_special_tokens):
            calls.append(add_special_tokens)
            return {"input_ids": [ord(ch) % 97 for ch in text]}

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    ids, info = cal.token_ids(_src(tmp_path), "text", 4, 32, seed=0, tokenizer=Tok(), vocab_size=1024)
    assert calls == [False], "calibration must tokenize as the evaluation does: no special tokens"
    assert int(ids.max()) < 97 and "Tok" in info["tokenizer"]


def _gptq_profile(dataset: str, **cal_over) -> dict:
    return tiny_profile(quantize={"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False,
                                  "calibration": {"dataset": dataset, "samples": 4, "seq_len": 32, **cal_over}},
                        validate={"accuracy": {"dataset": str(WIKITEXT), "seq_len": 64, "max_tokens": 256,
                                                     "gates": "none"}})


@needs_wikitext
def test_refuses_to_calibrate_on_the_evaluation_text(tmp_path, cli):
    copy = tmp_path / "renamed-copy.txt"
    copy.write_bytes(WIKITEXT.read_bytes())  # another name, same content: still the evaluation text
    for path in (WIKITEXT, copy):
        profile = write_profile(tmp_path, _gptq_profile(str(path)))
        r = cli("plan", str(profile), "--store", str(tmp_path / "store"))
        assert r.exit_code == 2, r.output
        assert "same content" in r.output and "validate.accuracy.dataset" in r.output


@needs_wikitext
def test_calibration_content_shapes_the_key_not_its_path(tmp_path):
    from toolchain import profile as prof
    from toolchain.plan import build_plan
    from toolchain.store import Store

    store = Store(tmp_path / "store")
    a = tmp_path / "a.txt"
    a.write_text(TEXT)

    def qkey(path: Path, **over) -> tuple[str, dict]:
        loaded = prof.from_dict(_gptq_profile(str(path), **over), base_dir=tmp_path)
        stage = build_plan(loaded, store).stage("quantize")
        return stage.key, stage.config

    key, config = qkey(a)
    assert config["calibration"]["dataset_sha256"] and "dataset" not in config["calibration"]
    b = tmp_path / "moved.txt"
    b.write_text(TEXT)
    assert qkey(b)[0] == key, "same content under another path must be the same artifact"
    b.write_text(TEXT + "more")
    assert qkey(b)[0] != key
    assert qkey(a, samples=8)[0] != key
    assert qkey(a, seq_len=64)[0] != key
    assert qkey(a, seed=1)[0] != key
