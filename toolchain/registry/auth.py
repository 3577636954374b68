"""Where registry credentials come from, and the two ways a registry asks for them.

Sources, first match wins:
  1. TOOLCHAIN_REGISTRY_TOKEN: a registry bearer token, sent as is (CI systems that mint one per job).
  2. TOOLCHAIN_REGISTRY_USERNAME + TOOLCHAIN_REGISTRY_PASSWORD.
  3. docker's config.json ($DOCKER_CONFIG/config.json, else ~/.docker/config.json): `credHelpers[host]`, then
     `auths[host]` (`auth` = base64 "user:password", or `username`/`password`), then `credsStore`.
     Helpers are the `docker-credential-<name> get` programs `docker login` uses.

A registry answers 401 with `WWW-Authenticate: Basic realm=...` (htpasswd) or `Bearer realm=...,service=...,
scope=...` (the token flow of the distribution spec's token auth: GET realm?service=&scope= with Basic
credentials returns {"token": ...}). Secrets live only in `Credentials`, whose repr hides them; no message,
log line, manifest or --json document carries one.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # a ready bearer token
    source: str = "none"  # where they came from, for error messages (never the secret itself)

    @property
    def present(self) -> bool:
        return bool(self.token or (self.username and self.password))

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _host_keys(host: str) -> list[str]:
    # docker login writes the bare host; older clients wrote URLs.
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"http://{host}/v1/"]


def _from_helper(helper: str, host: str, where: str) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get"], input=host, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if not secret:
        return None
    if user == "<token>":  # the helper protocol's marker for an identity token
        return Credentials(token=secret, source=f"docker-credential-{helper} ({where})")
    return Credentials(user, secret, source=f"docker-credential-{helper} ({where})")


def from_docker_config(host: str, path: Path | None = None) -> Credentials | None:
    path = path or docker_config_path()
    try:
        cfg = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, PermissionError):
        return None
    helpers = cfg.get("credHelpers") or {}
    for key in _host_keys(host):
        if key in helpers:
            found = _from_helper(helpers[key], host, str(path))
            if found:
                return found
    auths = cfg.get("auths") or {}
    for key in _host_keys(host):
        entry = auths.get(key)
        if not entry:
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return Credentials(user, password, source=f"docker config {path}")
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"], source=f"docker config {path}")
        if entry.get("registrytoken"):
            return Credentials(token=entry["registrytoken"], source=f"docker config {path}")
    if cfg.get("credsStore"):
        return _from_helper(cfg["credsStore"], host, str(path))
    return None


def lookup(host: str) -> Credentials:
    env = os.environ
    if env.get("TOOLCHAIN_REGISTRY_TOKEN"):
        return Credentials(token=env["TOOLCHAIN_REGISTRY_TOKEN"], source="env TOOLCHAIN_REGISTRY_TOKEN")
    if env.get("TOOLCHAIN_REGISTRY_USERNAME") and env.get("TOOLCHAIN_REGISTRY_PASSWORD"):
        return Credentials(env["TOOLCHAIN_REGISTRY_USERNAME"], env["TOOLCHAIN_REGISTRY_PASSWORD"],
                           source="env TOOLCHAIN_REGISTRY_USERNAME/TOOLCHAIN_REGISTRY_PASSWORD")
    return from_docker_config(host) or Credentials()


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="https://auth/token",service="registry",scope="repository:x:pull"` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _PARAM.finditer(rest)}
    return scheme.lower(), params
