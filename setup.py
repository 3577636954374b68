"""Only what pyproject.toml cannot say: the package list, found rather than written out, so that a new format or
method folder under toolchain/ ships without a line here. The profiles and texts are mapped in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["toolchain", "toolchain.*"]), "toolchain.profiles", "toolchain.data"])
