"""toolchain.blocks, the one HF block-streaming path of calibration and validation: a tiny model of every family
(transformers' own config classes; random biases and q/k norm weights) streamed block by block gives transformers'
own whole-model forward, and the calibration runner's blocks are the same blocks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_logits_equal_transformers_forward(family, tiny_family_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from toolchain.validate.streamed import StreamedModel

    d = tiny_family_dir(family)
    cfg = json.loads((d / "config.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    sm = StreamedModel(cfg, tensors.__getitem__, device="cpu", dtype="float32")
    sm.run(list(ids))
    ours = torch.stack([sm.window_logits(j) for j in range(len(ids))])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids).logits
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-5 * scale, ((ours - ref).abs().max(), scale)
    assert ref.std() > 0.1  # not a degenerate model (random biases and norms drawn)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_dropped_bias_or_norm_is_seen(family, tiny_family_dir):
    """The check above can fail: zeroing the family's biases or resetting its q/k norms changes the logits."""
    from safetensors.torch import load_file

    from toolchain.validate.streamed import StreamedModel

    d = tiny_family_dir(family)
    cfg = json.loads((d / "config.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    ids = [torch.arange(32)]

    def logits(weights):
        sm = StreamedModel(cfg, weights.__getitem__, device="cpu", dtype="float32")
        sm.run(ids)
        return sm.window_logits(0)

    changed = {k: (torch.zeros_like(v) if k.endswith(".bias") else torch.ones_like(v)) if
               (k.endswith(".bias") or "q_norm" in k or "k_norm" in k) else v for k, v in tensors.items()}
    assert (logits(tensors) - logits(changed)).abs().max() > 1e-2
