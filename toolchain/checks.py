"""Plan-time checks of inputs that would otherwise fail after a stage started (issue 22): each raises InputError
(exit 2) naming the YAML path and the fix. Torch-free and cheap: `plan` runs them on every call.

The names here are the one grammar of everything that becomes a file name or an OCI tag: profile names (refs/),
target names (stage names, tags `<tag>-<target>`); schemas/build.schema.json uses the same pattern.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from .errors import InputError

# A profile or target name: a file name (refs/<name>.json) and part of an OCI tag, whose grammar is
# [A-Za-z0-9_][A-Za-z0-9._-]{0,127}; 128 characters also stay far below a file name's 255 bytes.
NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_PATTERN = rf"^{NAME_BODY}$"
NAME_HINT = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"

# The shortest evaluation text that scores at all: one window of the shortest seq_len a profile allows
# (validate.accuracy.seq_len >= 16).
MIN_EVAL_TOKENS = 16

# Deeper than any published decoder (a few hundred layers): plans and stages list layers one by one.
MAX_SYNTHETIC_LAYERS = 4096

# A safetensors header is JSON of a few KB per hundred tensors; the format's own reader caps it at 100 MB.
MAX_SAFETENSORS_HEADER = 100 << 20


def check_name(value: str, what: str) -> str:
    if not re.fullmatch(NAME_BODY, value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(f"{what} {shown!r} (length {len(value)}) is not a valid name: use {NAME_HINT}")
    return value


# -- the store ------------------------------------------------------------------------------------------------

def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_store_path(root: Path, flag: str = "--store") -> None:
    """The store is a directory, or can become one."""
    try:
        found = _existing_ancestor(root)
    except OSError as e:  # ENAMETOOLONG, ELOOP, ...
        raise InputError(f"{flag}: {root}: {e.strerror}; give a directory for the artifact store") from None
    if not found.is_dir():
        where = "" if found == root else f" (its parent {found} is a file)"
        raise InputError(f"{flag}: {root} is not a directory{where}; give a directory for the artifact store "
                         "(it is created when missing), e.g. --store ./artifacts")


def check_store_writable(root: Path) -> None:
    """A build or gc that will write: refuse a read-only store before any work, rather than halfway."""
    found = _existing_ancestor(root)
    for p in (root, root / "refs", root / "objects", root / "tmp", root / "locks", root / "cache"):
        if p.exists() and not os.access(p, os.W_OK | os.X_OK):
            found = p
            break
    else:
        if os.access(found, os.W_OK | os.X_OK):
            return
    raise InputError(f"--store: {found} is not writable (read-only file system or permissions), and this command "
                     f"must write to the store {root}; give a writable --store (or TOOLCHAIN_STORE), or run "
                     "`toolchain plan` / `gc --dry-run`, which only read")


# -- sources ----------------------------------------------------------------------------------------------------

def check_safetensors(path: Path, yaml_path: str = "source.path") -> None:
    """A safetensors file's header (8-byte length, JSON, offsets inside the file), read without the weights."""
    size = path.stat().st_size

    def bad(why: str) -> InputError:
        return InputError(f"{yaml_path}: {path} is not a valid safetensors file ({why}); it is corrupt or "
                          "truncated: restore it from the model's source and compare its sha256")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise bad(f"header length {n} does not fit the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise bad(f"tensor {name!r} lies outside the file's {data} data bytes (data_offsets {offsets})")


def check_source_files(src: Any, yaml_path: str) -> None:
    """Every safetensors shard of an HF directory source has a sane header."""
    if src.kind != "hf" or src.path is None:
        return
    for shard in sorted(src.path.glob("*.safetensors")):
        check_safetensors(shard, yaml_path)


def synthetic_bytes(cfg: dict[str, Any]) -> int:
    """The bytes of a synthetic model's weights, computed from its shape without listing its layers."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    heads = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2) + h
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(cfg.get("dtype", "float32"), 4)
    return (per_layer * layers + heads) * width


def check_synthetic_size(cfg: dict[str, Any], store_root: Path) -> None:
    """Synthetic weights are written to the store: bound num_layers by the disk they need, before anything
    (planning included) allocates per layer."""
    need = synthetic_bytes(cfg)
    free = shutil.disk_usage(_existing_ancestor(store_root)).free
    if need <= free:
        if cfg["num_hidden_layers"] > MAX_SYNTHETIC_LAYERS:
            raise InputError(f"source.synthetic.num_layers: {cfg['num_hidden_layers']} layers; published decoders "
                             f"have at most a few hundred, and every stage walks them one by one: use at most "
                             f"{MAX_SYNTHETIC_LAYERS}")
        return
    per_layer = max(1, synthetic_bytes({**cfg, "num_hidden_layers": 1}) - synthetic_bytes({**cfg,
                                                                                         "num_hidden_layers": 0}))
    fit = max(0, (free - synthetic_bytes({**cfg, "num_hidden_layers": 0})) // per_layer)
    raise InputError(f"source.synthetic.num_layers: {cfg['num_hidden_layers']} layers of this shape need "
                     f"{need / 2**30:,.1f} GiB of weights, more than the {free / 2**30:,.1f} GiB free in the store "
                     f"({store_root}); use at most {fit} layers, or a store with more space")


def check_architecture(cfg: dict[str, Any], yaml_path: str) -> Any:
    """The config's family (toolchain.families), or exit 2 naming what is unsupported and what is supported: an
    unknown model type, or a feature of a known one we do not implement (sliding window, rope scaling)."""
    from . import families

    try:
        return families.check(cfg)
    except families.UnsupportedModel as e:
        archs = ", ".join(map(str, cfg.get("architectures") or [])) or "none listed"
        raise InputError(f"{yaml_path}: {e} (its config.json architectures: {archs}); point {yaml_path} at a "
                         "checkpoint of a supported family") from None


# -- the recipe against the model ---------------------------------------------------------------------------------

def check_something_to_quantize(cfg: dict[str, Any], q: Any) -> None:
    from . import arch

    if q.method == "none":
        return
    names = [n for n, _o, _i in arch.linear_shapes(cfg)]
    if names and all(arch.is_ignored(n, q.ignore) for n in names):
        raise InputError(f"quantize.ignore: {list(q.ignore)} matches every linear layer ({len(names)}), so nothing "
                         f"is left to quantize with method {q.method}; ignore fewer layers (e.g. ignore: [lm_head]), "
                         "or write `method: none` to export the model unquantized")


def check_positions(cfg: dict[str, Any], q: Any) -> None:
    """Calibration windows longer than the model's positions: refused now, not inside the quantize stage."""
    limit = cfg.get("max_position_embeddings")
    cal = getattr(q, "calibration", None)
    if cal is None or not isinstance(limit, int) or cal.seq_len <= limit:
        return
    raise InputError(f"quantize.calibration.seq_len: {cal.seq_len} exceeds the model's max_position_embeddings "
                     f"{limit}; use at most {limit}")


def check_eval_file(path: Path) -> None:
    if path.suffix == ".jsonl":
        raise InputError(f"validate.accuracy.dataset: {path} is a .jsonl file, but the evaluation text is scored as "
                         "plain text (its JSON would be scored as words); write its text to a .txt file, e.g. "
                         f"`jq -r .text {path.name} > {path.stem}.txt`")


# -- texts long enough for one window ----------------------------------------------------------------------------

def _tokenizer_file(model_dir: Path | None) -> Path | None:
    if model_dir is None:
        return None
    path = model_dir / "tokenizer.json"
    return path if path.is_file() else None


def count_tokens(text: str, model_dir: Path | None, has_tokenizer: bool, enough: int) -> tuple[int, bool]:
    """(tokens, exact) of `text` as the stages tokenize it, counted no further than needed: the source's
    tokenizer.json (the `tokenizers` library; no torch), UTF-8 bytes for a source without a tokenizer (what
    calibration does then), else an upper bound (bytes + 1: every tokenizer here spends at most one token per
    byte, plus a prefix space)."""
    prefix = text[: enough * 64 + 4096]  # no tokenizer here spends more than 64 characters on one token
    tok_file = _tokenizer_file(model_dir)
    if tok_file is not None:
        try:
            from tokenizers import Tokenizer

            return len(Tokenizer.from_file(str(tok_file)).encode(prefix, add_special_tokens=False).ids), True
        except Exception:  # an unreadable tokenizer fails where the stage loads it, with its own error
            pass
    n = len(prefix.encode("utf-8"))
    return (n, True) if not has_tokenizer else (n + 1, False)


def has_tokenizer(model_dir: Path) -> bool:
    """What toolchain.quant.calibration.load_tokenizer looks for; without one, calibration reads UTF-8 bytes."""
    return any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _tokens(n: int, exact: bool) -> str:
    return f"{'' if exact else 'at most '}{n} token{'' if n == 1 else 's'}"


def check_eval_tokens(path: Path, model_dir: Path | None) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read(MIN_EVAL_TOKENS * 64 + 4096)  # what count_tokens looks at, not a whole corpus
    n, exact = count_tokens(text, model_dir, True, MIN_EVAL_TOKENS)
    if n < MIN_EVAL_TOKENS:
        counted = _tokens(n, exact)
        raise InputError(f"validate.accuracy.dataset: {path} holds {counted}; scoring needs at least "
                         f"{MIN_EVAL_TOKENS} (one window of the shortest seq_len); give a longer text, e.g. "
                         "WikiText-2's wiki.test.raw")


def check_calibration_tokens(text: str, label: str, seq_len: int, model_dir: Path | None, tokenized: bool) -> None:
    """`tokenized`: the source has a tokenizer (else calibration reads the text as UTF-8 bytes)."""
    n, exact = count_tokens(text, model_dir, tokenized, seq_len)
    if n < seq_len:
        counted = _tokens(n, exact)
        raise InputError(f"quantize.calibration.dataset: {label} holds {counted}; one calibration window needs "
                         f"seq_len {seq_len}; give a longer text or lower quantize.calibration.seq_len")


def check_publish_tags(profile: Any) -> None:
    """Each target's publish destination (`<tag>-<target>` or `{target}` in the tag) goes through the reference
    parser: a tag grown past the OCI grammar (128 characters) is refused now, not at the push."""
    from .registry.package import destination
    from .registry.reference import parse_reference

    labels = [t.label for t in profile.targets]
    for i, pub in enumerate(profile.publish):
        for label in labels:
            try:
                ref = destination(pub.to, label, len(labels))
                parse_reference(str(ref), need_tag=True)
            except InputError as e:
                raise InputError(f"publish.{i}.to: for target {label}: {e}; shorten the tag or the target's "
                                 "`name:`") from None
