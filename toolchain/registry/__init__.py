"""OCI registries: push and pull artifacts as CNCF ModelPack, and use a registry as a remote stage cache.

  reference.py  oci://HOST/REPO:TAG|@sha256:... parsed and checked
  auth.py       credentials (env, docker config.json, credential helpers) and the Basic/Bearer challenge flow
  client.py     the OCI distribution API over httpx: retries, chunked resumable uploads, verified downloads
  modelpack.py  files -> ModelPack config and manifest (reproducible bytes)
  package.py    a store artifact or a profile's target -> files, ModelPack config and our annotations
  transfer.py   push a directory of files, pull one back safely
  cache.py      the registry as a remote cache keyed by stage key
"""

from .errors import RegistryError
from .reference import Reference, parse_reference

__all__ = ["RegistryError", "Reference", "parse_reference"]
