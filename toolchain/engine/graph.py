"""Compiling the decoder blocks (torch.compile) and capturing a decode step in one CUDA graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Model


# -- decoding in one CUDA graph --------------------------------------------------------------------------------

class DecodeGraph:
    """One decode step, argmax and position + 1 captured in a CUDA graph: `replay()` emits the next token."""

    def __init__(self, model: Model, batch: int, warmup: int = 3):
        self.model = model
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, autotune and allocate outside the capture
            for _ in range(warmup):
                self._step()
                self.pos.zero_()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        logits = self.model.decode(self.ids, self.pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def start(self, first_ids: torch.Tensor, position: int) -> None:
        self.ids.copy_(first_ids.view(-1, 1))
        self.pos.fill_(position)

    def replay(self) -> None:
        self.graph.replay()


def compile_blocks(model: Model) -> str:
    """torch.compile each decoder block (one compiled graph serves every layer); returns what was done."""
    # Dynamo caches compiled graphs per function, and `_block` is one function for every model in the process:
    # each model (linear kinds, partial-sum splits), the first block (no previous output) and batch sizes add
    # variants. The default limit of 8 was reached by the third model of one process on the H200 (2026-11-30),
    # which then ran eager; 64 covers a build's targets.
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64 if "accumulated" not in name else 512))
    try:
        model.block = torch.compile(model._block, dynamic=True, fullgraph=False)  # one graph for every batch size
        model.head = torch.compile(model._head, dynamic=True, fullgraph=False)  # its sums fuse: ~20 launches fewer
        return f"torch.compile (inductor, torch {torch.__version__})"
    except Exception as e:  # noqa: BLE001  (an old or broken compiler: run eager, say so)
        model.block, model.head = model._block, model._head
        return f"eager (torch.compile unavailable: {type(e).__name__}: {e})"


def compile_fallbacks() -> int:
    """How many times dynamo has given up on a frame for its recompile limit in this process. It then runs the
    frame eagerly and only logs a warning, so a timing that claims compiled blocks checks this count."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    marks = ("recompile limit", "recompile_limit", "cache_size_limit", "cache size limit")
    return sum(n for reason, n in counters["unimplemented"].items() if any(m in reason.lower() for m in marks))


def blocks_after(how: str, fallbacks_before: int) -> str:
    """`how` the blocks ran (compile_blocks' answer), corrected if dynamo fell back to eager since the count."""
    if how.startswith("torch.compile") and compile_fallbacks() > fallbacks_before:
        return "eager (torch.compile hit dynamo's recompile limit and ran the blocks uncompiled)"
    return how
