"""Errors that map to the CLI's exit codes: 2 for bad input, 1 for a failed build or gate."""


class ToolchainError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(ToolchainError):
    """The user's input is wrong (profile, paths, recipe). Raised before any work starts."""

    exit_code = 2


class MissingToolError(ToolchainError):
    """An optional backend (a package, a binary, a GPU) is absent; the message names what to install."""

    exit_code = 2


class BuildError(ToolchainError):
    """A stage ran and failed."""

    exit_code = 1
