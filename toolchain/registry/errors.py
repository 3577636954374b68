"""Registry errors: a failed transfer is exit code 1 (the build did not deliver), a bad reference exit code 2."""

from __future__ import annotations

from ..errors import ToolchainError


class RegistryError(ToolchainError):
    """The registry refused or could not be reached; the message names the fix. Never carries a secret."""

    exit_code = 1


class IntegrityError(RegistryError):
    """What the registry served does not match its digest, or would write outside the destination."""


class UploadInterrupted(RegistryError):
    """The user stopped a push (Ctrl-C, SIGTERM) between chunks; the next push of the same blob resumes."""

    exit_code = 130
