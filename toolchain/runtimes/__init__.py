"""Serving runtimes: the rules their loaders impose on our artifacts (rules.py), and the adapters that time a
built artifact on this machine (the speed stage)."""
