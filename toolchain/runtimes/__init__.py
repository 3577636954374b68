"""Runtimes that time a built artifact on this machine (the speed stage), and the rules its loaders impose."""
