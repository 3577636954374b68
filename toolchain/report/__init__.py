"""`toolchain report`: a build's (or several builds') results as one self-contained HTML file and as Markdown for
a CI job summary. data.py reads the store; html.py and markdown.py render the same document."""

from __future__ import annotations

from .data import collect

__all__ = ["collect"]
