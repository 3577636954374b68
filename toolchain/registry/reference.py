"""`oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`: the only way a registry location is written on our command line.

Grammar of repository names, tags and digests: the OCI distribution spec (opencontainers/distribution-spec,
spec.md "Pulling manifests": `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*` and
`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?$")


def check_repository(repo: str) -> str:
    if not isinstance(repo, str) or not REPO_RE.match(repo):
        raise InputError(f"repository {repo!r} is not valid (lowercase letters, digits, . _ - and /; no empty or "
                         "'..' component)")
    return repo


def check_ref(ref: str) -> str:
    """A tag or a sha256 digest: nothing that a URL could normalize out of its repository (`..`, `/`)."""
    if not isinstance(ref, str) or not (TAG_RE.match(ref) or DIGEST_RE.match(ref)):
        raise InputError(f"tag {ref!r} is not valid (letters, digits, . _ -, not starting with . or -; at most "
                         "128) and not a sha256: digest")
    return ref


def api_path(repo: str, kind: str, ref: str) -> str:
    """/v2/<repo>/<kind>/<ref>, built only from names the OCI grammar accepts: a request never leaves the
    repository it names, whatever a caller passes (defence in depth behind the profile's own checks)."""
    check_repository(repo)
    if kind == "blobs" and ref == "uploads/":
        return f"/v2/{repo}/blobs/uploads/"
    if kind == "blobs" and not (isinstance(ref, str) and DIGEST_RE.match(ref)):
        raise InputError(f"blob digest {ref!r} is not sha256: and 64 lowercase hex digits")
    if kind not in ("blobs", "manifests"):
        raise ValueError(f"unknown API kind {kind!r}")
    return f"/v2/{repo}/{kind}/{check_ref(ref)}"


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        # Every Reference, however made (parse_reference, with_tag), holds only names the grammar accepts.
        if not HOST_RE.match(self.host):
            raise InputError(f"{self.host!r} is not a registry host[:port]")
        check_repository(self.repository)
        if self.tag is not None and not TAG_RE.match(self.tag):
            raise InputError(f"tag {self.tag!r} is not valid (letters, digits, . _ -, not starting with . or -; "
                             "at most 128)")
        if self.digest is not None and not DIGEST_RE.match(self.digest):
            raise InputError(f"digest {self.digest!r} is not sha256: and 64 lowercase hex digits")

    @property
    def ref(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.repository, tag, None)

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else ""
        return f"oci://{self.host}/{self.repository}{tail}"


def parse_reference(text: str, need_tag: bool = False, allow_tag: bool = True) -> Reference:
    """Parse and check a reference; errors say which part is wrong and what a good one looks like."""
    example = "e.g. oci://registry.example.com/team/model:int4"
    if not text.startswith("oci://"):
        raise InputError(f"{text!r}: a registry reference starts with oci:// ({example})")
    rest = text[len("oci://"):]
    if "@" in rest.split("/", 1)[0]:
        raise InputError(f"{text!r}: put credentials in docker's config.json or TOOLCHAIN_REGISTRY_USERNAME/"
                         "TOOLCHAIN_REGISTRY_PASSWORD, never in the reference")
    host, sep, path = rest.partition("/")
    if not sep or not host or not path:
        raise InputError(f"{text!r}: expected oci://HOST/REPOSITORY[:TAG] ({example})")
    if not HOST_RE.match(host):
        raise InputError(f"{text!r}: {host!r} is not a registry host[:port]")
    digest = tag = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not DIGEST_RE.match(digest):
            raise InputError(f"{text!r}: digest must be sha256: and 64 lowercase hex digits")
    elif ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not TAG_RE.match(tag):
            raise InputError(f"{text!r}: tag {tag!r} is not valid (letters, digits, . _ -; at most 128)")
    if not REPO_RE.match(path):
        raise InputError(f"{text!r}: repository {path!r} is not valid (lowercase letters, digits, . _ - and /)")
    if need_tag and not tag:
        raise InputError(f"{text!r}: name the tag to push to ({example})")
    if not allow_tag and (tag or digest):
        raise InputError(f"{text!r}: give the repository only (oci://HOST/REPO); stage keys become the tags")
    return Reference(host, path, tag, digest)
