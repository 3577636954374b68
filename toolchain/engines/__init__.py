"""Stages that compile an exported checkpoint with an external runtime (trtllm-build)."""
