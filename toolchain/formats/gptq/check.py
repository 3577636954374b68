"""Validate a GPTQ v1 checkpoint: our own unpacking of every layer, then a real loader, then the logits.

1. Independent unpacking (`unpack_layer`, written from the format's description, not from our packer): every
   quantized layer's weight must equal our IR's dequantization with float16 scales, bit for bit.
2. A loader: transformers with optimum + GPTQModel (the kernels are GPTQModel's). GPTQModel cannot be installed
   into our interpreter here (it pins numpy==2.2.6), so the loader runs in the Python named by
   TOOLCHAIN_GPTQMODEL_PYTHON (default: the venv scripts/setup makes, toolchain.formats.gptq.loader_python), as a worker
   process speaking a small pipe protocol (toolchain.formats.gptq.worker). The loader's dequantized weights
   must equal ours in the loader's arithmetic, bit for bit: (q - z) * scale in the dtype it holds the scales in
   (it says which: float32 for a bf16 checkpoint loaded in float32, float16 for an fp16 one), see ARITHMETIC.
   GPTQModel.load itself refuses sym=False v1 checkpoints not written by GPTQModel >= 0.9 (its guard against
   AutoGPTQ's zero-point overflow), so transformers' path is the one used; tests load symmetric ones with both.
3. `finish_validation` measures export fidelity and scores against the reference with the block-streamed runner
   over the weights the loader dequantized (asked for layer by layer from its process; the rest from the files),
   on the profile's scoring device and dtype. No GPTQModel forward runs (on CPU its TorchAtenLinear would repack
   the weights at the first forward and multiply in bfloat16).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import BuildError
from ...stage import StageContext
from ...validate.compare import conformance_failure
from .export import arithmetic, unpack_layer
from .spec import loader_python


def check_config(export_dir: Path) -> dict[str, Any]:
    qc = json.loads((export_dir / "quantize_config.json").read_text())
    embedded = json.loads((export_dir / "config.json").read_text()).get("quantization_config")
    if embedded != qc:
        raise BuildError("config.json's quantization_config differs from quantize_config.json")
    if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format") != "gptq":
        raise BuildError(f"not a GPTQ v1 checkpoint: quant_method {qc.get('quant_method')!r}, "
                         f"checkpoint_format {qc.get('checkpoint_format')!r}")
    return qc


# GPTQ stores float16 scales; (q - z) * scale needs at most 9 + 11 significant bits, so float32 holds it exactly,
# and a loader computing in a half dtype rounds that exact product once. Our unpacking forms it in float32; the
# loader (GPTQModel's dequantize_weight) computes in the dtype it holds the scales in, which it reports: ours is
# rounded to the same. A runtime computing in the model's dtype (vLLM's Marlin in bf16/fp16) rounds it alike.
def summarise(pairs: Iterator[tuple[str, torch.Tensor, torch.Tensor]], ir_dir: Path,
              compute: Callable[[], str] = lambda: "float32") -> dict[str, Any]:
    """One layer at a time (a 7B's dense weights would not fit twice in memory). `compute` names the dtype the
    comparison was made in, once the pairs are consumed."""
    from ...validate.compare import WeightComparison

    check = WeightComparison("")
    for name, theirs, ours in pairs:
        check.add(name, theirs, ours)
    check.arithmetic = arithmetic(ir_dir, compute())
    return check.result()


def unpacked_errors(export_dir: Path, ir_dir: Path) -> dict[str, float]:
    """Per layer: max |our unpacking - ours| (inf for a non-finite value)."""
    from ...validate.compare import max_abs_diff

    return {n: max_abs_diff(a, b) for n, a, b in unpacked_pairs(export_dir, ir_dir)}


def unpacked_pairs(export_dir: Path, ir_dir: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per layer: (our unpacking of the checkpoint, the IR dequantized with float16 scales)."""
    from ...ir import IRReader, TensorReader
    from .export import to_gptq

    qc = check_config(export_dir)
    ir, ckpt = IRReader(ir_dir), TensorReader(export_dir)
    for name in ir.layers:
        t = {k: ckpt.get(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        yield name, unpack_layer(t, qc["bits"]), to_gptq(ir.layer(name), check=False).dequantize()


# -- the loader, in its own interpreter --------------------------------------------------------------------------

class LoaderProcess:
    """A worker process holding the model as a GPTQ loader built it. Requests go over its stdin as one JSON
    line, tensors come back as raw little-endian bytes behind a JSON header (see worker.py)."""

    def __init__(self, export_dir: Path, loader: str):
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
               "PYTHONPATH": str(Path(__file__).resolve().parents[3])}  # the directory holding toolchain/
        self.dtypes: set[str] = set()  # the dtypes the loader dequantized weights in
        self.proc = subprocess.Popen([loader_python(), "-m", "toolchain.formats.gptq.worker", str(export_dir),
                                      loader], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self.info = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise BuildError(f"the GPTQ loader process exited ({code}) before answering; its stderr says why")
        head = json.loads(line)
        if "error" in head:
            raise BuildError(f"GPTQ loader: {head['error']}")
        return head

    def _tensor(self) -> torch.Tensor:
        head = self.last_header = self._read_header()
        (n,) = struct.unpack("<q", self.proc.stdout.read(8))
        data = bytearray(self.proc.stdout.read(n))
        return torch.frombuffer(data, dtype=torch.float32).reshape(head["shape"]).clone()

    def request(self, **req: Any) -> torch.Tensor:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._tensor()

    def weight(self, name: str) -> torch.Tensor:
        return self.request(op="weight", name=name)

    def weight_and_dtype(self, name: str) -> tuple[torch.Tensor, torch.dtype]:
        """The loader's dense weight (float32) and the dtype it computed it in (its scales')."""
        w = self.request(op="weight", name=name)
        return w, getattr(torch, self.last_header.get("dtype", "float32"))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.request(op="logits", ids=ids.tolist())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def loader_errors(proc: LoaderProcess, ir_dir: Path) -> dict[str, float]:
    """Per layer: max |the loader's weight - ours| (inf for a non-finite value)."""
    from ...validate.compare import max_abs_diff

    return {n: max_abs_diff(a, b) for n, a, b in loader_pairs(proc, ir_dir)}


def loader_pairs(proc: LoaderProcess, ir_dir: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per layer: (the loader's dequantized weight, ours in the loader's arithmetic): (q - z) * scale in the dtype
    the loader holds the scales in (float32 for a bf16 checkpoint loaded in float32: exact; float16 for an fp16 one:
    the exact product rounded once)."""
    from ...ir import IRReader
    from .export import to_gptq

    ir = IRReader(ir_dir)
    for name in ir.layers:
        theirs, dtype = proc.weight_and_dtype(name)
        proc.dtypes.add(str(dtype).removeprefix("torch."))
        yield name, theirs, to_gptq(ir.layer(name), check=False).dequantize().to(dtype).float()


def loader_weights(proc: LoaderProcess, export_dir: Path, ir_dir: Path):
    """The checkpoint as the loader holds it, as a weight source: quantized linears dequantized by the loader's
    kernels (in its process), the rest read from the files."""
    from ...ir import IRReader, TensorReader

    layers, files = set(IRReader(ir_dir).layers), TensorReader(export_dir)

    def get(name: str) -> torch.Tensor:
        layer = name.removesuffix(".weight")
        return proc.weight(layer) if name.endswith(".weight") and layer in layers else files.get(name)

    return get


def run_validate(ctx: StageContext) -> dict[str, Any]:
    from ...validate.accuracy import finish_validation

    export_dir, ir_dir = ctx.inputs["export"], ctx.inputs["quantize"]
    unpacked = summarise(unpacked_pairs(export_dir, ir_dir), ir_dir)
    ctx.reporter.info(f"  our unpacking: {unpacked['layers_checked']} layers, max |w - ours| = "
                      f"{unpacked['max_abs_err']:.3g}")
    failure = conformance_failure(unpacked)
    if failure:
        return {"format": ctx.config["format"], "status": "failed", "passed": False, "conformance": unpacked,
                "reason": f"our unpacking: {failure}"}
    proc = LoaderProcess(export_dir, "transformers")
    try:
        conformance = {**summarise(loader_pairs(proc, ir_dir), ir_dir, lambda: "/".join(sorted(proc.dtypes))),
                       "unpacked": unpacked}
        i = proc.info
        label = f"transformers {i['transformers']} + GPTQModel {i['gptqmodel']} ({i['kernel']}, {i['device']})"
        return finish_validation(ctx, label, conformance, proc.logits, loader_weights(proc, export_dir, ir_dir))
    finally:
        proc.close()
