"""Validation: reload each artifact with an independent loader and compare it with the reference."""
