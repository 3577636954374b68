"""IR -> one GGUF file (llama.cpp, ollama, LM Studio, Xinference's llama.cpp engine), written with llama.cpp's
own gguf-py.

Types (target option `type:`): F32, F16, BF16 (what ollama's own quantizer starts from), Q8_0, Q4_0, Q4_1, or
`auto` (the smallest type that holds the IR exactly, else F16). A quantized layer is written one of three ways:
  direct       our integer codes become the GGUF blocks as they are, when the IR's scheme maps onto the type:
                 Q4_0  w = d * (q - 8)   q = codes + 8               symmetric int4
                 Q4_1  w = d * q + m     q = codes + 8, m = -(zero + 8) * scale          int4, any
                 Q8_0  w = d * q         q = codes - zero (|q| <= 15 for int4)           int4, symmetric int8
               and every block of 32 input columns lies in one of our groups (group_size % 32 == 0, per channel,
               per tensor). d and m are stored as float16 (d = fp16(scale), m = fp16(-(zero + 8) * scale)): that
               rounding is the only difference from the IR, reported as `ir_max_abs_err` (0 when the IR's scales
               are already float16).
  cast         F32/F16/BF16 hold our dequantized weight (F32 exactly; F16/BF16 up to their rounding).
  requantized  otherwise: the IR is dequantized and quantized again by gguf-py (gguf.quants). Not lossless
               with respect to the IR; the manifest says `requantized: true` and how far the weights moved.
`exact: true` forbids requantizing (and F16/BF16 rounding of quantized layers): checked at plan time.
Tensors the IR keeps unquantized: 1-D (norms) as F32; 2-D (embeddings, an ignored lm_head) as F16 (BF16 for
type BF16 or a bfloat16 source, F32 for type F32). Llama's q/k rows are permuted as llama.cpp's converter does
(its RoPE pairs adjacent rows; HF's pairs row i with row i + head_dim/2); Qwen2/Qwen3 are not (llama.cpp's `qwen2`
and `qwen3` use NEOX-style RoPE, HF's halves). The architecture, tensor names, biases (F32) and q/k norms come from
the model's family (toolchain.families). The tokenizer (GPT-2 BPE, Qwen's BPE, or SentencePiece) and the chat
template are carried over. Tensors are written one at a time: memory stays bounded by
one layer.

This module is imported at plan time (options, plan checks): heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError, MissingToolError
from .spec import BLOCK, FILE_NAME, QUANT_TYPES, GGUFOptions, exact_types, gguf_arch, resolve_type

if TYPE_CHECKING:
    import numpy as np

    from ...ir import QuantizedLinear
    from ...stage import StageContext


# -- the numerics of one tensor -----------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ImportError:
        raise MissingToolError("the gguf target needs llama.cpp's gguf-py: pip install gguf") from None
    return gguf


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order of a q/k projection: within each head, rows (i, i + d/2) become adjacent
    (2i, 2i+1), because ggml's RoPE rotates adjacent pairs. Works on any per-row array (codes, scales)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> HF row order (the inverse of permute_qk)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def block_params(q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Scale (and zero) of every 32-column block, (out, in/32), or None when a block straddles two groups."""
    import torch

    from ...ir import default_g_idx

    out_f, in_f = q.shape
    if in_f % BLOCK:
        return None
    g_idx = q.g_idx.long() if q.g_idx is not None else default_g_idx(in_f, q.meta.get("group_size"))
    blocks = g_idx.reshape(-1, BLOCK)
    if not bool((blocks == blocks[:, :1]).all()):
        return None
    first = blocks[:, 0]

    def per_block(t: torch.Tensor) -> np.ndarray:
        t = t.float()
        t = t[:, first] if t.dim() == 2 else t.reshape(1, 1).expand(out_f, len(first))
        return t.contiguous().numpy()

    return per_block(q.scale), (per_block(q.zero) if q.zero is not None else None)


def fp16(x: np.ndarray) -> np.ndarray:
    import numpy as np

    h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise BuildError("a scale overflows float16 (GGUF stores d and m as fp16); use type: F32 or F16")
    return h


def pack_direct(q: QuantizedLinear, gtype: str, n_head: int | None) -> np.ndarray | None:
    """Our codes as GGUF blocks (uint8, one row per output row), or None when this layer does not map."""
    import numpy as np

    if q.type != "int":
        return None
    params = block_params(q)
    bits = q.meta.get("bits")
    if params is None or gtype not in exact_types({"method": "rtn", **q.meta}) or bits not in (4, 8):
        return None
    scale, zero = params
    codes = q.codes.numpy().astype(np.int16)
    if n_head:
        codes, scale = permute_qk(codes, n_head), permute_qk(scale, n_head)
        zero = permute_qk(zero, n_head) if zero is not None else None
    out_f, in_f = codes.shape
    nb = in_f // BLOCK
    codes = codes.reshape(out_f, nb, BLOCK)
    zero_b = np.zeros_like(scale) if zero is None else zero
    d = fp16(scale).view(np.uint8).reshape(out_f, nb, 2)
    if gtype == "Q8_0":
        qs = (codes - zero_b[..., None].astype(np.int16)).astype(np.int8).view(np.uint8)
        parts = [d, qs]
    else:
        u = (codes + 8).astype(np.uint8)  # signed int4 [-8, 7] -> the unsigned nibble [0, 15]
        qs = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4)  # element j low nibble, j + 16 high nibble
        parts = [d, qs]
        if gtype == "Q4_1":
            m = fp16(-(zero_b + 8) * scale).view(np.uint8).reshape(out_f, nb, 2)
            parts = [d, m, qs]
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def expected_direct(q: QuantizedLinear, gtype: str) -> np.ndarray:
    """What a GGUF reader must dequantize a direct layer to (unpermuted): the IR with d, m rounded to fp16."""
    import numpy as np

    scale, zero = block_params(q)
    out_f, in_f = q.shape
    c = q.codes.numpy().astype(np.float32).reshape(out_f, in_f // BLOCK, BLOCK)
    z = np.zeros_like(scale) if zero is None else zero
    d = scale.astype(np.float16).astype(np.float32)[..., None]
    if gtype == "Q4_1":
        m = (-(z + 8) * scale).astype(np.float16).astype(np.float32)[..., None]
        w = (c + 8) * d + m
    else:
        w = (c - z[..., None]) * d
    return w.reshape(out_f, in_f)


def encode_layer(q: QuantizedLinear, gtype: str, n_head: int | None, exact: bool
                 ) -> tuple[np.ndarray, str, float]:
    """One quantized layer -> (GGUF data, mode, max |GGUF weight - IR weight|). The data is read back with
    gguf-py's own dequantizer before it is written: a packing mismatch fails the export, not the user."""
    import numpy as np

    from ...validate.compare import check_finite

    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[gtype]
    check_finite(f"GGUF {gtype} layer of shape {q.shape}", "of the IR", scale=q.scale, **q.extras)
    ir_w = q.dequantize().numpy()
    packed = pack_direct(q, gtype, n_head) if gtype in QUANT_TYPES else None
    if packed is not None:
        mode, intended = "direct", expected_direct(q, gtype)
    else:
        if exact and gtype != "F32":
            raise BuildError(f"layer of shape {q.shape} ({q.meta}) does not map exactly onto {gtype} "
                             "(exact: true)")
        mode = "requantized" if gtype in QUANT_TYPES else "cast"
        packed = gguf.quants.quantize(permute_qk(ir_w, n_head) if n_head else ir_w, qtype)
        intended = None
    back = gguf.quants.dequantize(packed, qtype)
    if n_head:  # undo the q/k permutation to compare with the IR
        back = unpermute_qk(back, n_head)
    if intended is not None and not np.array_equal(back, intended):
        raise BuildError(f"GGUF {gtype} read-back differs from our codes by "
                         f"{np.abs(back - intended).max():.3g}: packing bug")
    return packed, mode, float(np.abs(back - ir_w).max())


def plain_type(ndim: int, gtype: str, source_dtype: str | None = None) -> str:
    """Tensors the IR keeps unquantized: norms F32; matrices F16 (BF16/F32 when that is the file's type, BF16 when
    the IR holds them in bfloat16: float16 would round their small values and overflow their large ones)."""
    if ndim == 1 or gtype == "F32":
        return "F32"
    return "BF16" if gtype == "BF16" or source_dtype == "bfloat16" else "F16"


def encode_plain(w: np.ndarray, gtype: str, source_dtype: str | None = None) -> tuple[np.ndarray, str, float]:
    import numpy as np

    gguf = _gguf()
    ptype = plain_type(w.ndim, gtype, source_dtype)
    qtype = gguf.GGMLQuantizationType[ptype]
    data = gguf.quants.quantize(w, qtype)
    err = float(np.abs(gguf.quants.dequantize(data, qtype) - w).max())
    return data, ptype, err


# -- metadata -----------------------------------------------------------------------------------------------

def _rope_theta(cfg: dict[str, Any]) -> float:
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise BuildError(f"GGUF export: rope type {kind!r} is not supported yet (only default RoPE)")
    return float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def write_hparams(w, cfg: dict[str, Any], gtype: str, name: str) -> None:
    import gguf

    from ...arch import head_dim

    heads = cfg["num_attention_heads"]
    hd = head_dim(cfg)
    # llama.cpp's converter writes key/value_length whenever config.json names head_dim (TextModel); the llama
    # arch keeps its earlier files (llama.cpp derives head_dim from n_embd / n_head there).
    explicit_hd = gguf_arch(cfg) != "llama" and cfg.get("head_dim") is not None
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(hd)
    if hd != cfg["hidden_size"] // heads or explicit_hd:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_vocab_size(cfg["vocab_size"])
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
                 "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}[gtype]
    w.add_file_type(gguf.LlamaFileType[file_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def source_gguf_fields(path: Path | None) -> dict[str, Any]:
    """Metadata worth carrying over from a GGUF source: its pre-tokenizer name, model name, license."""
    if path is None:
        return {}
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keys = ("tokenizer.ggml.pre", "general.name", "general.license")
    return {k: r.fields[k].contents() for k in keys if k in r.fields}


# The Split regexes of tokenizer.json pre-tokenizers whose llama.cpp name we know (llama.cpp's
# convert_hf_to_gguf.py get_vocab_base_pre and llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_* regexes).
KNOWN_SPLITS = {
    # Qwen2, Qwen2.5, Qwen3 (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX): digits one by one
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
}


def detect_pre(tok_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name when we can recognise it (GPT-2's own regex, Qwen's Split + ByteLevel);
    None = ask the user."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True):
        return KNOWN_SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def _byte_level(pre: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json pre-tokenizer maps bytes to GPT-2's printable alphabet (ByteLevel)."""
    if not pre:
        return False
    return pre.get("type") == "ByteLevel" or any(_byte_level(p) for p in pre.get("pretokenizers", []))


def _special_ids(ir_dir: Path, n_vocab: int) -> dict[str, int]:
    """bos/eos/unk/pad ids. The model's config.json wins over tokenizer_config.json: it is what generation
    uses (a GGUF-converted tokenizer_config can name the wrong eos)."""
    ids: dict[str, int] = {}
    for fname in ("config.json", "generation_config.json"):
        f = ir_dir / fname
        doc = json.loads(f.read_text()) if f.is_file() else {}
        for typ in ("bos", "eos", "unk", "pad"):
            v = doc.get(f"{typ}_token_id")
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int) and 0 <= v < n_vocab and typ not in ids:
                ids[typ] = v
    return ids


def chat_template_of(ir_dir: Path) -> str | None:
    if (ir_dir / "chat_template.jinja").is_file():
        return (ir_dir / "chat_template.jinja").read_text()
    cfg = ir_dir / "tokenizer_config.json"
    tmpl = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    return tmpl if isinstance(tmpl, str) else None


def write_tokenizer(w, ir_dir: Path, n_vocab: int, pre: str | None) -> dict[str, Any]:
    """Vocabulary, merges/scores, special ids and chat template. GPT-2 BPE from tokenizer.json (what
    llama.cpp calls `gpt2`), SentencePiece from tokenizer.model (`llama`)."""
    import gguf

    tok_file = ir_dir / "tokenizer.json"
    tok_json = json.loads(tok_file.read_text()) if tok_file.is_file() else None
    model = (tok_json or {}).get("model", {})
    info: dict[str, Any]
    if tok_json is None and not (ir_dir / "tokenizer.model").is_file():
        return {"model": None, "note": "the IR has no tokenizer: llama.cpp needs one to run this file"}
    if not (model.get("type") == "BPE" and _byte_level(tok_json.get("pre_tokenizer"))):
        # SentencePiece: its own model file, else a Llama-style tokenizer.json (both read by gguf-py)
        if (ir_dir / "tokenizer.model").is_file():
            vocab = gguf.vocab.SentencePieceVocab(ir_dir)
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString((ir_dir / "tokenizer.model").read_bytes())
            # llama.cpp normalises the text itself: tell it what the model was trained with
            w.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
            w.add_remove_extra_whitespaces(bool(proto.normalizer_spec.remove_extra_whitespaces))
        else:
            vocab = gguf.vocab.LlamaHfVocab(ir_dir)
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        tokens = [t.decode("utf-8") if isinstance(t, bytes) else t for t in tokens]
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        w.add_token_scores(list(scores))
        w.add_token_types([int(t) for t in types])
        info = {"model": "llama (SentencePiece)", "tokens": len(tokens)}
    else:  # byte-level BPE (GPT-2 style); byte_fallback is moot when every byte is a token
        pre = pre or detect_pre(tok_json)
        if pre is None:
            raise BuildError("GGUF export: cannot tell llama.cpp's pre-tokenizer for this tokenizer.json; set the "
                             "target option tokenizer_pre (e.g. llama-bpe, qwen2, gpt-2)")
        vocab = model["vocab"]
        added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
        by_id = {i: t for t, i in vocab.items()} | {i: a["content"] for i, a in added.items()}
        tokens, types = [], []
        for i in range(n_vocab):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(by_id[i])
                a = added.get(i)
                types.append(gguf.TokenType.NORMAL if a is None else
                             gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
        merges = model.get("merges", [])
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([int(t) for t in types])
        w.add_token_merges(merges)
        info = {"model": "gpt2 (byte-level BPE)", "pre": pre, "tokens": len(tokens), "merges": len(merges)}
    special = _special_ids(ir_dir, n_vocab)
    for typ, tid in special.items():
        getattr(w, f"add_{typ}_token_id")(tid)
    add_bos, add_eos = _adds_bos_eos(ir_dir, special)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    tmpl = chat_template_of(ir_dir)
    if tmpl is not None:
        w.add_chat_template(tmpl)
    return {**info, "special_ids": special, "add_bos": add_bos, "add_eos": add_eos,
            "chat_template": tmpl is not None}


def _adds_bos_eos(ir_dir: Path, special: dict[str, int]) -> tuple[bool, bool]:
    """Whether the source tokenizer adds bos/eos around a text: asked of the tokenizer itself."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ir_dir)("hello world").input_ids
    return (bool(ids) and ids[0] == special.get("bos"), len(ids) > 1 and ids[-1] == special.get("eos"))


# -- the writer ---------------------------------------------------------------------------------------------

def tensor_name_map(arch: str, blocks: int):
    """gguf-py's HF -> llama.cpp tensor name map of an architecture (only that arch's tensors: a q_norm in a
    `qwen2` file would find no name and fail the export)."""
    gguf = _gguf()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], blocks)


def _gguf_name(name: str, tmap) -> str:
    base = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if base is None:
        raise BuildError(f"GGUF export: no llama.cpp name for tensor {name}")
    return base if base.endswith((".weight", ".bias")) else base + ".weight"


def _qk_heads(name: str, cfg: dict[str, Any]) -> int | None:
    """The head count to permute a q/k projection's rows by, for the families llama.cpp permutes; else None."""
    from ...families import family_of

    if not family_of(cfg).gguf_permute_qk:
        return None
    if name.endswith("self_attn.q_proj"):
        return cfg["num_attention_heads"]
    if name.endswith("self_attn.k_proj"):
        return cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return None


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1, name
    return (0 if "embed" in name else 10**9), name


def write_gguf(ir_dir: Path, out_path: Path, options: dict[str, Any], source_gguf: Path | None = None,
               reporter=None, model_name: str | None = None) -> dict[str, Any]:
    """Write `out_path` from the IR in `ir_dir`; returns what the manifest should say. Reused by the ollama
    and xinference exporters."""
    import numpy as np

    from ...ir import IRReader
    from ...validate.compare import check_finite

    gguf = _gguf()
    opts = GGUFOptions.model_validate(options)
    ir = IRReader(ir_dir)
    cfg = ir.config
    arch = gguf_arch(cfg)
    gtype = resolve_type(opts.type, ir.layers_scheme())
    if any(n.endswith(".pre_quant_scale") for n in ir.tensors.keys()):
        raise BuildError("GGUF has no place for AWQ's pre_quant_scale; fold it into the weights first")
    src = source_gguf_fields(source_gguf)
    name = model_name or src.get("general.name") or cfg.get("_name_or_path") or "model"
    tmap = tensor_name_map(arch, cfg["num_hidden_layers"])

    w = gguf.GGUFWriter(str(out_path), arch)
    write_hparams(w, cfg, gtype, str(name))
    if "general.license" in src:
        w.add_license(str(src["general.license"]))
    tok_info = write_tokenizer(w, ir_dir, cfg["vocab_size"], opts.tokenizer_pre or src.get("tokenizer.ggml.pre"))

    # Pass 1 declares every tensor (shape, type, size); pass 2 encodes and writes them one at a time.
    names = sorted([*ir.plain_names(), *ir.layers], key=_order)
    declared: list[tuple[str, str]] = []
    for n in names:
        if n in ir.layers:
            out_f, in_f = ir.layers[n]["shape"]
            shape, tname = (out_f, in_f), _gguf_name(n, tmap)
            ttype = gtype
            if gtype in QUANT_TYPES and in_f % BLOCK:
                raise BuildError(f"{n}: in_features {in_f} is not a multiple of {BLOCK} ({gtype} blocks)")
        else:
            t = ir.tensors.get(n)
            shape, tname = tuple(t.shape), _gguf_name(n, tmap)
            ttype = plain_type(t.dim(), gtype, str(t.dtype).removeprefix("torch."))
        qtype = gguf.GGMLQuantizationType[ttype]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * type_size
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        declared.append((n, tname))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    modes = {"direct": 0, "cast": 0, "requantized": 0}
    ir_err = plain_err = 0.0
    requantized: list[str] = []
    progress = reporter.task(f"write GGUF {gtype}", total=len(declared)) if reporter else nullcontext()
    with progress as task:
        for n, _tname in declared:
            if n in ir.layers:
                data, mode, err = encode_layer(ir.layer(n), gtype, _qk_heads(n, cfg), opts.exact)
                modes[mode] += 1
                ir_err = max(ir_err, err)
                if mode == "requantized":
                    requantized.append(n)
            else:
                t = ir.tensors.get(n)
                check_finite(n, "of the IR", tensor=t)
                source_dtype, t = str(t.dtype).removeprefix("torch."), t.float().numpy()
                heads = _qk_heads(n.removesuffix(".weight"), cfg) if t.ndim == 2 else None
                data, _ptype, err = encode_plain(permute_qk(t, heads) if heads else t, gtype, source_dtype)
                plain_err = max(plain_err, err)
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
            if task is not None:
                task.advance()
    w.close()

    scale_dtype = ir.scheme.get("scale_dtype")
    if modes["direct"]:
        rounding = (f"d{' and m' if gtype == 'Q4_1' else ''} stored as float16 (IR scales are {scale_dtype}); "
                    f"max |w_gguf - w_ir| = {ir_err:.3g}")
    elif modes["requantized"]:
        rounding = f"re-quantized by gguf-py to {gtype}: max |w_gguf - w_ir| = {ir_err:.3g}"
    else:
        rounding = f"{gtype}: max |w_gguf - w_ir| = {ir_err:.3g}"
    return {
        "format": "gguf", "file": out_path.name, "type": gtype, "architecture": arch,
        "layers": modes, "requantized": bool(requantized), "requantized_layers": requantized,
        "lossless_wrt_ir": ir_err == 0.0, "ir_max_abs_err": ir_err, "rounding": rounding,
        "plain_tensor_max_abs_err": plain_err, "tokenizer": tok_info,
        "note": ("re-quantized with gguf-py's quantizer: NOT lossless with respect to the IR" if requantized
                 else "our integer codes written as they are" if modes["direct"] else "dequantized weights"),
    }


def run(ctx: StageContext) -> dict[str, Any]:
    return write_gguf(ctx.inputs["quantize"], ctx.out / FILE_NAME, ctx.config.get("options", {}),
                      ctx.data.get("source_gguf"), ctx.reporter)
