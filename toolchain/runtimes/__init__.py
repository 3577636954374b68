"""Serving runtimes: what each one loads and the rules it imposes on our artifacts (rules.py)."""
