"""What a decoder family is, as data: the one description that plan-time shapes, the source stage, the block
runners, the exporters' name maps and the runtime read. Torch-free (it is read at plan time).

A family is a frozen `Family`; its module (toolchain/families/<name>.py) builds one and the registry
(toolchain/families/__init__.py) lists it. Everything a consumer needs from a config.json goes through a Family
method, so a new family is one module plus one registry line.

Names are relative to a decoder block (`model.layers.{i}.`): "self_attn.q_proj", "mlp.down_proj",
"self_attn.q_norm". Full names: `block_prefix(i) + rel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UnsupportedModel(ValueError):
    """A config.json this toolchain cannot build: an unknown family or a feature of it we do not implement. The
    message names what is supported; the planner turns it into exit 2."""


Q_PROJ, K_PROJ, V_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
O_PROJ = "self_attn.o_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
ATTENTION = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ)
MLP = (GATE_PROJ, UP_PROJ, DOWN_PROJ)
# Linears exporters fuse into one tensor (TensorRT-LLM's qkv and gate_up, llama.cpp's fused variants): members in
# concatenation order. They must share a scheme (one scale grid), which every method here gives them.
FUSED = {"qkv": (Q_PROJ, K_PROJ, V_PROJ), "gate_up": (GATE_PROJ, UP_PROJ)}
Q_NORM, K_NORM = "self_attn.q_norm", "self_attn.k_norm"

# llama.cpp's tensor names (gguf-py constants MODEL_TENSOR / TENSOR_NAMES), per block and whole-model.
GGUF_BLOCK = {"input_layernorm": "attn_norm", Q_PROJ: "attn_q", K_PROJ: "attn_k", V_PROJ: "attn_v",
              O_PROJ: "attn_output", "post_attention_layernorm": "ffn_norm", GATE_PROJ: "ffn_gate", UP_PROJ: "ffn_up",
              DOWN_PROJ: "ffn_down",
              Q_NORM: "attn_q_norm", K_NORM: "attn_k_norm"}
GGUF_MODEL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


@dataclass(frozen=True)
class Shapes:
    """A config.json's numbers, with the family's defaults applied."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding (no lm_head.weight in the checkpoint)
    context: int  # max_position_embeddings
    rms_norm_eps: float
    rope_theta: float


@dataclass(frozen=True)
class SmoothPair:
    """An AWQ scale: `producer`'s output channels (a norm's weight or a linear's rows, bias included) divided by
    s, the `consumers`' input columns multiplied by s. Exact only where nothing nonlinear sits between them."""

    producer: str
    consumers: tuple[str, ...]
    why: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" (HF classes)
    # Which projections carry a bias: a fixed tuple of block-relative names, or "config" (config.attention_bias
    # puts one on all four attention projections, as Llama and Qwen3 do).
    bias: tuple[str, ...] | str = ()
    qk_norm: bool = False  # RMSNorm(head_dim) on each head of q and k after the projection, before RoPE
    # Sliding-window attention: "none" (the family has none), "whole-context" (config.sliding_window null or at
    # least max_position_embeddings is plain attention; shorter is refused), "flag" (only use_sliding_window false).
    sliding_window: str = "none"
    rope_types: tuple[str, ...] = ("default",)  # rope_scaling types supported; others are refused
    head_dim_default: str = "hidden/heads"  # "hidden/heads", or "128" (Qwen3's config default)
    smoothing: tuple[SmoothPair, ...] = ()  # AWQ's scale pairs, in the order they are searched
    gguf_arch: str | None = None  # llama.cpp's general.architecture
    gguf_permute_qk: bool = False  # llama.cpp's LlamaModel permutes q/k rows (rotary pairs interleaved)
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)  # named configs for --source synthetic
    notes: str = ""

    def __post_init__(self) -> None:
        # A per-head RMSNorm after q_proj/k_proj normalizes away any scale on their rows: no AWQ fold through it.
        through_norm = [p.producer for p in self.smoothing if self.qk_norm and p.producer in (Q_PROJ, K_PROJ)]
        if through_norm:
            raise ValueError(f"family {self.name}: smoothing pair with producer {through_norm[0]} folds a scale "
                             "through q_norm/k_norm, which normalizes it away")

    # -- numbers ------------------------------------------------------------------------------------------------
    def dims(self, cfg: dict[str, Any]) -> Shapes:
        heads = cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or (128 if self.head_dim_default == "128" else cfg["hidden_size"] // heads)
        return Shapes(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                      layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                      head_dim=hd, vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                      context=cfg.get("max_position_embeddings") or 0, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                      rope_theta=float(rope_parameters(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0))))

    def block_linears(self, cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
        """(block-relative name, out_features, in_features) of one block's linears, in checkpoint order."""
        s = self.dims(cfg)
        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        return [(Q_PROJ, q_out, s.hidden), (K_PROJ, kv_out, s.hidden), (V_PROJ, kv_out, s.hidden),
                (O_PROJ, s.hidden, q_out), (GATE_PROJ, s.intermediate, s.hidden), (UP_PROJ, s.intermediate, s.hidden),
                (DOWN_PROJ, s.hidden, s.intermediate)]

    def biases(self, cfg: dict[str, Any]) -> tuple[str, ...]:
        """Block-relative names of the linears with a bias (never quantized: carried as they are)."""
        if self.bias == "config":
            return ATTENTION if cfg.get("attention_bias") else ()
        return tuple(self.bias)

    def block_tensors(self, cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        """(block-relative tensor name, shape) of every tensor of one block, in checkpoint order."""
        s = self.dims(cfg)
        lin = self.block_linears(cfg)
        biased = set(self.biases(cfg))
        out: list[tuple[str, tuple[int, ...]]] = [("input_layernorm.weight", (s.hidden,))]
        for name, o, i in lin:
            if name == GATE_PROJ:
                out.append(("post_attention_layernorm.weight", (s.hidden,)))
            out.append((f"{name}.weight", (o, i)))
            if name in biased:
                out.append((f"{name}.bias", (o,)))
            if name == O_PROJ and self.qk_norm:  # after the projections, as Qwen3Attention lists them
                out += [(f"{Q_NORM}.weight", (s.head_dim,)), (f"{K_NORM}.weight", (s.head_dim,))]
        return out

    def gguf_names(self) -> dict[str, str]:
        """Block-relative HF module -> llama.cpp tensor base name (add ".weight"/".bias"; blocks are blk.N.)."""
        return {k: v for k, v in GGUF_BLOCK.items() if self.qk_norm or k not in (Q_NORM, K_NORM)}

    # -- what we refuse -------------------------------------------------------------------------------------
    def check(self, cfg: dict[str, Any]) -> None:
        """Raise UnsupportedModel for a feature of this config that nothing here implements."""
        mt = cfg.get("model_type")
        if cfg.get("mlp_bias"):
            raise UnsupportedModel(f"model_type {mt!r} with mlp_bias: true is not supported (no biases on the MLP "
                                   "projections in any runtime here)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {cfg.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
        self._check_sliding_window(cfg)
        rope = rope_parameters(cfg)
        rtype = rope.get("rope_type") or rope.get("type") or "default"
        if rtype not in self.rope_types:
            raise UnsupportedModel(f"rope scaling type {rtype!r} of model_type {mt!r} is not supported; the "
                                   f"{self.name} family supports: {', '.join(self.rope_types)}")

    def _check_sliding_window(self, cfg: dict[str, Any]) -> None:
        sw, ctx = cfg.get("sliding_window"), cfg.get("max_position_embeddings") or 0
        if self.sliding_window == "whole-context":
            if sw is not None and sw < ctx:
                raise UnsupportedModel(
                    f"sliding_window {sw} is shorter than the context ({ctx} = max_position_embeddings): "
                    f"sliding-window attention is not implemented. Supported for {self.name}: sliding_window null "
                    f"or >= max_position_embeddings (plain causal attention)")
        elif self.sliding_window == "flag":
            layer_types = cfg.get("layer_types") or []
            if cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
                raise UnsupportedModel(
                    f"use_sliding_window: true is not supported for {self.name} (sliding-window attention is not "
                    f"implemented); supported: use_sliding_window false (every layer full attention)")


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of a config.json: transformers 5's rope_parameters or the older rope_scaling (null = none)."""
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            return cfg[key]
    return {}


# The AWQ pairs every Llama-style block has (toolchain.quant.awq). Per family the module says why they hold.
LLAMA_PAIRS = (
    SmoothPair("input_layernorm", (Q_PROJ, K_PROJ, V_PROJ),
               "the RMSNorm's weight scales its outputs channel by channel"),
    SmoothPair(V_PROJ, (O_PROJ,), "attention mixes v's rows linearly (softmax weights do not depend on v); a v bias is "
               "divided with its rows"),
    SmoothPair("post_attention_layernorm", (GATE_PROJ, UP_PROJ), "as input_layernorm"),
    SmoothPair(UP_PROJ, (DOWN_PROJ,), "silu(gate) * up is linear in up"),
)
