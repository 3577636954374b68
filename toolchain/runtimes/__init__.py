"""The serving side, torch-free at import: the rules serving runtimes' loaders impose on our artifacts (rules.py),
which runtime times a target here (select.py), the speed stage's figures and gates (speed.py), and the adapters of
the external runtimes (external.py). Our own runtime's engine is toolchain.engine."""
