"""Calibration samples for GPTQ/AWQ: `samples` windows of `seq_len` token ids, deterministic for a seed.

Where the text comes from (profile `quantize.calibration.dataset`):
  a .txt file                 the whole file
  a .jsonl file               the `text_field` of every record, joined by blank lines
  hf:<name>[:<config>]:<split> an HF dataset from the local `datasets` cache (offline; nothing is downloaded),
                              its `text_field` records in order until enough text is read
  random                      uniform token ids (speed runs on synthetic models only; no text)
The text is tokenized whole with the source's tokenizer (without special tokens, as the evaluation is) or, for
a source that has none (synthetic models), as UTF-8 bytes. When it holds at least `samples` non-overlapping
windows, that many are drawn without replacement (torch.randperm seeded with `seed`); otherwise windows start at
seeded random offsets. The content hash of the file is part of the quantize stage's key (toolchain.plan), and a
file with the evaluation dataset's hash is refused: calibrating on the text you measure on flatters the result.

Plan-time helpers (`identity`, `refuse_eval_text`) must not import torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingToolError

RANDOM = "random"


@dataclass(frozen=True)
class CalibrationSource:
    kind: str  # "file" | "hf" | "random"
    label: str  # what the user wrote, for messages
    path: Path | None = None


def parse(dataset: str, resolve: Callable[[str], Path]) -> CalibrationSource:
    """The profile's `dataset` string -> where the text is. `resolve` turns a profile path into a Path."""
    if dataset == RANDOM:
        return CalibrationSource("random", dataset)
    if dataset.startswith("hf:"):
        return CalibrationSource("hf", dataset)
    path = resolve(dataset)
    if not path.is_file():
        raise InputError(f"quantize.calibration.dataset: {path} does not exist; give a .txt or .jsonl file, "
                         "hf:<dataset>:<split>, or `random`")
    return CalibrationSource("file", dataset, path)


def refuse_eval_text(calibration_sha256: str | None, eval_sha256: str | None, label: str) -> None:
    if calibration_sha256 and calibration_sha256 == eval_sha256:
        raise InputError(
            f"quantize.calibration.dataset: {label} has the same content (sha256 {calibration_sha256[:12]}) as "
            "validate.accuracy.dataset. Calibrating on the evaluation text overfits the quantizer to it and "
            "inflates the measured accuracy; calibrate on other text (e.g. a training split, or "
            "tinyshakespeare/input.txt)."
        )


# -- plan-time checks: bad text is bad input, found before any work -----------------------------------------

def check_utf8(path: Path, yaml_path: str) -> None:
    """The file decodes as UTF-8 (read in chunks: the error names the byte offset)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise InputError(f"{yaml_path}: {path} is not UTF-8 text (byte {offset + e.start}: {e.reason}); "
                                 "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise InputError(f"{yaml_path}: {path} ends inside a UTF-8 character ({e.reason}); the file is cut "
                         "short or not UTF-8") from None


def check_source(src: CalibrationSource, text_field: str) -> None:
    """Everything about the calibration text that would otherwise fail mid-quantize."""
    if src.kind == "file":
        check_utf8(src.path, "quantize.calibration.dataset")
        if src.path.suffix == ".jsonl":
            _jsonl_text(src.path.read_text(encoding="utf-8"), text_field, src.path)
    elif src.kind == "hf":
        _hf_dataset(src.label[3:])


def plan_text(src: CalibrationSource, text_field: str) -> str | None:
    """The text a file source gives (what `read_text` reads), for plan-time checks; None for hf and random."""
    return read_text(src, text_field, 0) if src.kind == "file" else None


# -- reading and tokenizing ---------------------------------------------------------------------------------

def read_text(src: CalibrationSource, text_field: str, min_chars: int) -> str:
    """All the text of a file; for an HF dataset, records in order until `min_chars` are read."""
    if src.kind == "file":
        raw = src.path.read_text(encoding="utf-8")
        if src.path.suffix == ".jsonl":
            return _jsonl_text(raw, text_field, src.path)
        return raw
    if src.kind == "hf":
        return _hf_text(src.label[3:], text_field, min_chars)
    raise ValueError(f"no text for a {src.kind} calibration source")


def _jsonl_text(raw: str, field: str, path: Path) -> str:
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"quantize.calibration.dataset: {path}:{n}: not a JSON line ({e.msg} at column "
                             f"{e.colno}); fix that line (one JSON object per line)") from None
        if not isinstance(rec, dict) or field not in rec:
            raise InputError(f"quantize.calibration.dataset: {path}:{n}: no field {field!r} in this record; set "
                             "quantize.calibration.text_field to the field that holds the text")
        texts.append(str(rec[field]))
    return "\n\n".join(texts)


def _hf_text(spec: str, field: str, min_chars: int) -> str:
    ds = _hf_dataset(spec)
    texts, total = [], 0
    for rec in ds:
        t = str(rec[field])
        texts.append(t)
        total += len(t)
        if total >= min_chars:
            break
    return "\n\n".join(texts)


def _hf_dataset(spec: str) -> Any:
    """An HF dataset from the local cache only. The offline flag is set before `datasets` is imported: the
    library reads it once, at import."""
    import os

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"quantize.calibration.dataset: hf:{spec}: write hf:<dataset>:<split> or "
                         "hf:<dataset>:<config>:<split>")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # offline by design: nothing is downloaded
    try:
        import datasets
    except ImportError:
        raise MissingToolError("calibrating on an HF dataset needs the `datasets` package: pip install datasets") \
            from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline and not cached, unknown split, ...
        raise InputError(f"quantize.calibration.dataset: hf:{spec} could not be loaded from the local cache "
                         f"({type(e).__name__}: {e}); put it in the HF datasets cache, or use a local "
                         ".txt/.jsonl file") from None


def load_tokenizer(model_dir: Path) -> Any | None:
    """The source's tokenizer, or None when it ships none (synthetic models)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def token_ids(
    src: CalibrationSource, text_field: str, samples: int, seq_len: int, seed: int, tokenizer: Any | None,
    vocab_size: int,
):
    """(ids (samples, seq_len) int64, info for the manifest and the build output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"dataset": src.label, "samples": samples, "seq_len": seq_len, "seed": seed}
    if src.kind == "random":
        info.update(tokenizer="none (uniform random token ids)", sampling="random")
        return torch.randint(0, vocab_size, (samples, seq_len), generator=g), info
    text = read_text(src, text_field, min_chars=samples * seq_len * 16)
    if tokenizer is not None:
        stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        info["tokenizer"] = f"{type(tokenizer).__name__} of the source"
    else:
        stream = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long() % vocab_size
        info["tokenizer"] = "UTF-8 bytes (the source has no tokenizer)"
    n = len(stream)
    if n < seq_len:
        raise InputError(f"quantize.calibration: {src.label} has {n} tokens, fewer than seq_len {seq_len}")
    if n // seq_len >= samples:
        starts = torch.randperm(n // seq_len, generator=g)[:samples] * seq_len
        info["sampling"] = "non-overlapping windows, drawn without replacement"
    else:
        starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
        info["sampling"] = "random offsets (the text is too short for non-overlapping windows)"
    ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    info["text_tokens"] = n
    info["text_chars"] = len(text)
    info["preview"] = tokenizer.decode(ids[0, :48].tolist()) if tokenizer is not None \
        else bytes(ids[0, :48].tolist()).decode("utf-8", errors="replace") if vocab_size >= 256 else ""
    return ids, info
