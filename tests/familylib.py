"""Tiny random Qwen2, Qwen3 and Mistral checkpoints built from transformers' own config and model classes, with
a tokenizer of each family's kind (Qwen's byte-level BPE with its pre-tokenizer and ChatML special tokens;
SentencePiece for Mistral) trained here on the calibration text, and the transformers forward of an IR's
dequantized weights that exports are scored against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import SHAKESPEARE, shipped

FAMILIES = ("qwen2", "qwen3", "mistral")

# Qwen2.5's default system prompt (its chat template inserts it when a conversation has none).
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QWEN25_SYSTEM
                         + "<|im_end|>\n{% endif %}" + CHATML)


def hf_config(family: str):
    """A two-block config of the family. Qwen3 keeps head_dim 128 with q wider than hidden (as Qwen3-0.6B):
    transformers' GGUF loader reads no head_dim for qwen3 and assumes 128."""
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    common = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 1024,
              "max_position_embeddings": 2048, "hidden_act": "silu"}
    if family == "qwen2":  # q/k/v biases, tied embedding (as Qwen2.5-0.5B)
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**common, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                           tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6)
    if family == "mistral":
        return MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None)
    raise ValueError(family)


def _qwen_tokenizer(out: Path, chat_template: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = shipped(SHAKESPEARE).read_text()[:200_000]
    bpe.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]],
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = chat_template
    tok.save_pretrained(out)
    return tok


def _mistral_tokenizer(out: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = shipped(SHAKESPEARE).read_text()[:100_000]
    (out / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(out / "train.txt"), model_prefix=str(out / "tokenizer"),
                                   vocab_size=1000, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    for f in ("train.txt", "tokenizer.vocab"):
        (out / f).unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return AutoTokenizer.from_pretrained(out)


def tiny_family_dir(family: str, out: Path, seed: int = 0) -> Path:
    """An HF model directory: transformers' own model class with random weights (norm weights and biases
    perturbed away from their 1 / 0 initialisation, so a dropped or misplaced one shows), and a tokenizer."""
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(family)
    if family == "mistral":
        tok = _mistral_tokenizer(out)
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    else:
        tok = _qwen_tokenizer(out, CHATML_DEFAULT_SYSTEM if family == "qwen2" else CHATML)
        eos = "<|endoftext|>" if family == "qwen2" else "<|im_end|>"
        cfg.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
        cfg.eos_token_id = tok.convert_tokens_to_ids(eos)
        cfg.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def hf_forward_of(ir_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of transformers' own model class holding the IR's dequantized weights (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolchain.validate.fidelity import ir_weights

    cfg = AutoConfig.from_pretrained(ir_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    get = ir_weights(ir_dir)
    state = {n: get(n).float() for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        return model(ids[None]).logits[0]


def fidelity(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ours || theirs) in nats, top-1 agreement) over positions."""
    lp, lq = ours.double().log_softmax(-1), theirs.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()
    return kl, top1


def random_ids(vocab: int, n: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
