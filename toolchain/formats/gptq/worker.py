"""Worker process for validating a GPTQ checkpoint with a real loader, run in an interpreter that has GPTQModel
(see toolchain.formats.gptq.check): `python -m toolchain.formats.gptq.worker EXPORT_DIR transformers|gptqmodel`.

Protocol on stdin/stdout (stderr is the loader's own logging):
  -> first a JSON line {"gptqmodel", "transformers", "kernel", "device", "layers"} once the model is loaded
  <- a JSON request per line: {"op": "weight", "name": module} or {"op": "logits", "ids": [...]}
  -> a JSON line {"shape": [...]} (weights also {"dtype": the loader's scale dtype}) (or {"error": ...}), 8 bytes
     little-endian length, float32 little-endian data
Weights come back (out, in), as the loader's kernel dequantizes them (`dequantize_weight`); logits (L, vocab).
Weights must be asked for before any logits: GPTQModel's CPU kernel repacks them at its first forward.
Only the standard library, torch and the loader are imported: this runs outside our interpreter.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load(export_dir: Path, loader: str):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export_dir, device_map="cpu", dtype=torch.float32)
    elif loader == "gptqmodel":
        import gptqmodel.models.loader as gm_loader
        from gptqmodel import GPTQModel

        if not any((export_dir / f).is_file() for f in TOKENIZER_FILES):
            # Synthetic test models have no tokenizer; GPTQModel insists on loading one but never needs it here.
            gm_loader.load_hf_tokenizer = lambda *a, **k: None
        model = GPTQModel.load(str(export_dir), device="cpu", dtype=torch.float32).model
    else:
        raise ValueError(f"unknown loader {loader!r}")
    model.eval()
    return model


def send(out, shape: list[int] | None = None, data: bytes = b"", error: str | None = None,
         meta: dict | None = None) -> None:
    head = {"error": error} if error else {"shape": shape, **(meta or {})}
    out.write((json.dumps(head) + "\n").encode())
    if not error:
        out.write(struct.pack("<q", len(data)))
        out.write(data)
    out.flush()


def main() -> None:
    export_dir, loader = Path(sys.argv[1]), sys.argv[2]
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # the loaders print banners; keep the protocol channel clean
    try:
        import torch
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        model = load(export_dir, loader)
        qlinears = {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
        import gptqmodel
        import transformers

        kernel = sorted({type(m).__name__ for m in qlinears.values()})
        out.write((json.dumps({"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                               "loader": loader, "kernel": ",".join(kernel), "device": "cpu",
                               "layers": len(qlinears)}) + "\n").encode())
        out.flush()
    except Exception as e:  # report, then exit: the parent turns it into a BuildError
        out.write((json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        out.flush()
        raise
    forwarded = False
    for line in sys.stdin.buffer:
        req = json.loads(line)
        try:
            meta = {}
            with torch.inference_mode():
                if req["op"] == "weight":
                    if forwarded:  # CPU kernels repack weights at their first forward
                        raise RuntimeError("weights must be read before any logits")
                    if req["name"] not in qlinears:
                        raise KeyError(f"{req['name']} was not loaded as a GPTQ module")
                    t = qlinears[req["name"]].dequantize_weight().t()  # GPTQ kernels dequantize to (in, out)
                    # the arithmetic: (q - z) * scales in the dtype the loader holds the scales in
                    meta["dtype"] = str(qlinears[req["name"]].scales.dtype).removeprefix("torch.")
                else:
                    forwarded = True
                    ids = torch.tensor(req["ids"], dtype=torch.long)
                    t = model(ids.unsqueeze(0)).logits[0]
            t = t.float().contiguous()
            send(out, list(t.shape), t.numpy().tobytes(), meta=meta)
        except Exception as e:
            send(out, error=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
