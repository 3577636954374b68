"""Where the oracle interpreters live: venvs that scripts/setup layers on the running environment for peers whose
pins clash with ours (GPTQModel, ModelOpt, Xinference). Each sees its own packages first, then this environment's
(a .pth, not --system-site-packages), so it runs with the torch and transformers the toolchain runs with."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def venv_root() -> Path:
    """$TOOLCHAIN_VENV_DIR, else <this environment's prefix>/toolchain-oracles: one set per environment."""
    return Path(os.environ.get("TOOLCHAIN_VENV_DIR") or Path(sys.prefix) / "toolchain-oracles")


def venv_python(name: str) -> Path:
    """The interpreter of oracle venv `name` (it may not exist: callers check and say how to make it)."""
    return venv_root() / name / "bin" / "python"
