"""The OCI distribution API (opencontainers/distribution-spec, spec.md) over httpx, with what CI needs around it.

- Every request is retried with exponential backoff on connection errors, 429 and 5xx; bodies are re-opened from
  the file on each attempt, so a retry never holds a copy in memory.
- A 401 is answered once with the registry's own challenge (Basic, or Bearer through its token realm); the
  token is cached per scope. A 401/403/404/413 that remains becomes a RegistryError naming the fix.
- Credentials (Basic, a ready or a fetched bearer token) go only to the registry's own scheme://host:port: an
  upload Location or a redirect elsewhere gets none, and a 401 from there is an error, never answered. A
  fetched token is sent only for the scope it was issued for; a password never goes to a plain-HTTP realm of
  an HTTPS registry. Request paths are built by reference.api_path, so they never leave /v2/<repo>/.
- Blobs go up in PATCH chunks read from the file as they are sent (memory independent of the file size); the
  upload's location is saved after every chunk, so a push stopped between chunks (Ctrl-C or SIGTERM let the
  chunk in flight finish) resumes from what the registry holds. A chunk cut in the middle (SIGKILL, a dropped
  connection) leaves the registry holding more than the last saved state says; distribution 2.8 then declares
  the upload invalid (BLOB_UPLOAD_INVALID), and the client starts that blob over rather than fail.
- Blobs come down streamed, hashed as they are written, and are accepted only when digest and size match.

Why httpx and not oras-py (both tried side by side, see BENCHMARKS.md "OCI push"): oras-py 0.2 uploads a blob
either monolithically (the whole file read into memory) or in chunks without resume, has no artifactType
for a ModelPack manifest, and its pull trusts the blob it receives without checking its digest. Bending it to
these needs meant overriding its upload, manifest and download paths: more of our code than this client.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import httpx

from .auth import Credentials, parse_challenge
from .errors import IntegrityError, RegistryError, UploadInterrupted
from .reference import api_path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                             "application/vnd.docker.distribution.manifest.v2+json"])
RETRY_STATUS = {429, 500, 502, 503, 504}
READ_BLOCK = 1 << 20


def chunk_bytes() -> int:
    return int(float(os.environ.get("TOOLCHAIN_REGISTRY_CHUNK_MB", "64")) * (1 << 20))


def upload_state_dir() -> Path:
    base = os.environ.get("TOOLCHAIN_UPLOAD_STATE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "toolchain", "uploads")
    return Path(base)


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """scheme, host, port (the scheme's default made explicit): the only place credentials may go."""
    u = httpx.URL(url)
    return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)


def _file_range(path: Path, start: int, end: int, on_bytes: Callable[[int], None] | None) -> Iterator[bytes]:
    """Bytes [start, end) of a file, a block at a time: the request body of one chunk."""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                raise RegistryError(f"{path} shrank while it was being pushed")
            left -= len(block)
            if on_bytes:
                on_bytes(len(block))
            yield block


class RegistryClient:
    def __init__(self, host: str, credentials: Credentials | None = None, insecure: bool = False,
                 retries: int | None = None, timeout: float = 300.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.host = host
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.origin = origin(self.base)
        self.credentials = credentials or Credentials()
        self.retries = retries if retries is not None else int(os.environ.get("TOOLCHAIN_REGISTRY_RETRIES", "5"))
        self._sleep = sleep
        self.stop: threading.Event | None = None  # set (by a signal handler) to stop between chunks
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._basic = False  # the registry asked for Basic: send it up front from now on
        # verify=True always: plain HTTP (--insecure) is the only way around TLS, never an unverified certificate.
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=15.0), follow_redirects=True,
                                  verify=True, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests, auth, retries ---------------------------------------------------------------------
    def _url(self, path_or_url: str) -> str:
        return path_or_url if path_or_url.startswith(("http://", "https://")) else self.base + path_or_url

    def _auth_header(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self.credentials.token and not self._basic:
            return {"Authorization": f"Bearer {self.credentials.token}"}
        if self._basic and self.credentials.present and self.credentials.username:
            return {"Authorization": self.credentials.basic_header()}
        return {}

    def _answer_challenge(self, resp: httpx.Response, scope: str) -> bool:
        """Get what the 401 asks for; False when we have nothing to answer with."""
        scheme, params = parse_challenge(resp.headers.get("www-authenticate", ""))
        if scheme == "basic":
            if not (self.credentials.username and self.credentials.password):
                return False
            self._basic = True
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        query = {"service": params.get("service", ""), "scope": params.get("scope") or scope}
        headers = {}
        if self.credentials.username and self.credentials.password:
            if httpx.URL(params["realm"]).scheme != "https" and self.origin[0] == "https":
                raise RegistryError(f"{self.host}: token service {params['realm']} is not HTTPS: the password "
                                    "would cross the network in clear text; refused")
            headers["Authorization"] = self.credentials.basic_header()
        try:
            r = self._http.get(params["realm"] + "?" + urlencode({k: v for k, v in query.items() if v}),
                               headers=headers)
        except httpx.HTTPError as e:
            raise RegistryError(f"{self.host}: token service {params['realm']} unreachable: "
                                f"{type(e).__name__}") from None
        if r.status_code in (401, 403):
            self._raise_auth(r.status_code, scope, via=f"token service {params['realm']}")
        if r.status_code != 200:
            raise RegistryError(f"{self.host}: token service {params['realm']} answered HTTP {r.status_code}")
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not token:
            raise RegistryError(f"{self.host}: token service {params['realm']} returned no token")
        self._tokens[scope] = token
        return True

    def _raise_auth(self, status: int, scope: str, via: str = "") -> None:
        who = (f"the credentials from {self.credentials.source}" if self.credentials.present
               else "no credentials (none found)")
        where = f" ({via})" if via else ""
        if status == 401:
            raise RegistryError(
                f"{self.host}: authentication failed (HTTP 401){where} with {who}. Fix: set "
                "TOOLCHAIN_REGISTRY_USERNAME and TOOLCHAIN_REGISTRY_PASSWORD (or TOOLCHAIN_REGISTRY_TOKEN), or run "
                f"`docker login {self.host}`")
        action = scope.rsplit(":", 1)[-1]
        repo = scope.split(":")[1] if scope.count(":") >= 2 else scope
        raise RegistryError(
            f"{self.host}: access denied (HTTP 403){where}: {who} may not {action} {repo}. Fix: ask the "
            "registry's admin for that permission, or use a repository this account can write")

    def request(self, method: str, path: str, *, scope: str, headers: dict[str, str] | None = None,
                body: Callable[[], Any] | None = None, stream: bool = False, what: str = "") -> httpx.Response:
        """One API call with auth and retries. `body` makes fresh content per attempt (a file is re-read)."""
        url = self._url(path)
        # Credentials go only to the registry's own scheme, host and port: never to an upload Location or a
        # redirect elsewhere (httpx drops Authorization on a cross-origin redirect; the 401 check below sees
        # the final URL).
        own = origin(url) == self.origin
        challenged = False
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            auth = self._auth_header(scope) if own else {}
            req = self._http.build_request(method, url, headers={**(headers or {}), **auth},
                                           content=body() if body else None)
            try:
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as e:
                text = str(e)
                if "SSL" in text or "CERTIFICATE" in text.upper():  # retrying cannot fix a TLS mismatch
                    raise RegistryError(
                        f"{self.host}: TLS failed ({text}). Fix: give the registry a certificate this machine trusts "
                        "(SSL_CERT_FILE), or, for a plain-HTTP registry on localhost, pass --insecure") from None
                if attempt > self.retries:
                    raise RegistryError(f"{self.host}: {method} {what or path} failed after {attempt} attempts: "
                                        f"{type(e).__name__}: {e}. Is the registry up and the host right? (plain "
                                        "HTTP registries need --insecure)") from None
                self._sleep(delay)
                delay = min(delay * 2, 16.0)
                continue
            if resp.status_code == 401 and (not own or origin(resp.url) != self.origin):
                resp.close()
                raise RegistryError(
                    f"{self.host}: {resp.url.scheme}://{resp.url.netloc.decode()} asked for credentials (HTTP 401) "
                    f"during {what or method}; credentials are sent only to {self.base}, never to another host. "
                    "Fix: configure the registry to answer uploads and blobs on its own address")
            if resp.status_code == 401 and not challenged:
                challenged = True
                resp.close()
                if self._answer_challenge(resp, scope):
                    attempt -= 1  # answering a challenge is not a failure
                    continue
                self._raise_auth(401, scope)
            if resp.status_code in RETRY_STATUS and attempt <= self.retries:
                resp.close()
                wait = delay
                if resp.status_code == 429 and resp.headers.get("retry-after", "").isdigit():
                    wait = min(float(resp.headers["retry-after"]), 60.0)
                self._sleep(wait)
                delay = min(delay * 2, 16.0)
                continue
            return resp

    def check(self, resp: httpx.Response, ok: tuple[int, ...], scope: str, what: str) -> httpx.Response:
        if resp.status_code in ok:
            return resp
        if not resp.is_closed:
            resp.read()  # a streamed error response: its body holds the registry's error JSON
        if resp.status_code in (401, 403):
            self._raise_auth(resp.status_code, scope)
        detail = _error_detail(resp)
        if resp.status_code == 404:
            raise RegistryError(f"{self.host}: {what} not found (HTTP 404{detail}). Fix: check the repository and "
                                "tag; `toolchain push` it first if it was never pushed")
        if resp.status_code == 413:
            raise RegistryError(
                f"{self.host}: {what}: request body too large for the registry or a proxy before it (HTTP 413). "
                f"Fix: lower TOOLCHAIN_REGISTRY_CHUNK_MB (now {chunk_bytes() >> 20}) or raise the proxy's body "
                "limit (nginx: client_max_body_size)")
        raise RegistryError(f"{self.host}: {what} failed: HTTP {resp.status_code}{detail}")

    # -- blobs ---------------------------------------------------------------------------------------
    def blob_exists(self, repo: str, digest: str) -> bool:
        scope = f"repository:{repo}:pull"
        r = self.request("HEAD", api_path(repo, "blobs", digest), scope=scope, what=f"blob {digest[:19]}")
        if r.status_code == 404:
            return False
        self.check(r, (200,), scope, f"blob {digest[:19]}")
        return True

    def upload_blob(self, repo: str, path: Path, digest: str, size: int,
                    on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Push one file as a blob unless the registry has it; resume an earlier interrupted upload of it."""
        if self.blob_exists(repo, digest):
            return {"skipped": True, "sent": 0, "resumed_from": 0}
        scope = f"repository:{repo}:pull,push"
        state_file = upload_state_dir() / f"{hashlib.sha256(f'{self.host}/{repo}/{digest}'.encode()).hexdigest()}.json"
        location, offset = self._resume_point(state_file, scope)
        resumed_from = offset
        if on_bytes and offset:
            on_bytes(offset)
        sent = 0
        restarts = 0
        chunk = chunk_bytes()
        while location is None or offset < size:
            if location is None:
                r = self.check(self.request("POST", api_path(repo, "blobs", "uploads/"), scope=scope,
                                            headers={"Content-Length": "0"}, what=f"start upload to {repo}"),
                               (202,), scope, f"start upload to {repo}")
                location, offset = self._location(r), 0
                continue
            if self.stop is not None and self.stop.is_set():
                raise UploadInterrupted(f"interrupted: {offset} of {size} bytes of {path.name} are on {self.host}; "
                                        "run the same push again to resume from there")
            end = min(offset + chunk, size)
            self._save_state(state_file, location, offset)
            r = self.request(
                "PATCH", location, scope=scope, what=f"upload {path.name}",
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(end - offset),
                         "Content-Range": f"{offset}-{end - 1}"},
                body=lambda s=offset, e=end: _file_range(path, s, e, on_bytes))
            if r.status_code in (400, 404, 416) and restarts < 2 and (
                    "BLOB_UPLOAD" in r.text or r.status_code == 416):
                # A chunk cut mid-way (a retried connection error) desynchronised the upload: start it over.
                restarts += 1
                location, offset = None, 0
                continue
            self.check(r, (202,), scope, f"upload of {path.name}")
            location = self._location(r)
            sent += end - offset
            offset = end
            self._save_state(state_file, location, offset)
        sep = "&" if "?" in location else "?"
        r = self.request("PUT", f"{location}{sep}digest={digest}", scope=scope, headers={"Content-Length": "0"},
                         what=f"finish upload of {path.name}")
        if r.status_code == 400 and "DIGEST_INVALID" in r.text:
            state_file.unlink(missing_ok=True)
            raise IntegrityError(f"{self.host}: {path} does not hash to {digest}: it changed after it was hashed")
        self.check(r, (201,), scope, f"upload of {path.name}")
        state_file.unlink(missing_ok=True)
        return {"skipped": False, "sent": sent, "resumed_from": resumed_from}

    def _location(self, resp: httpx.Response) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{self.host}: upload answer without a Location header (not an OCI registry?)")
        return str(resp.url.join(loc))

    def _status(self, location: str, scope: str) -> tuple[str, int]:
        r = self.check(self.request("GET", location, scope=scope, what="upload status"), (204,), scope,
                       "upload status")
        rng = r.headers.get("range", "0-0")
        last = int(rng.split("-")[-1])
        # "0-0" is ambiguous (nothing, or one byte); the registry also reports it for an empty upload.
        return self._location(r) if r.headers.get("location") else location, (last + 1 if last > 0 else 0)

    def _resume_point(self, state_file: Path, scope: str) -> tuple[str | None, int]:
        try:
            saved = json.loads(state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None, 0
        try:
            return self._status(saved["location"], scope)
        except (RegistryError, KeyError, ValueError):
            state_file.unlink(missing_ok=True)  # expired or unknown upload: start over
            return None, 0

    @staticmethod
    def _save_state(state_file: Path, location: str, offset: int) -> None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"location": location, "offset": offset}))
        os.replace(tmp, state_file)

    def upload_bytes(self, repo: str, data: bytes, digest: str) -> None:
        """A small blob (a config) in one monolithic PUT."""
        if self.blob_exists(repo, digest):
            return
        scope = f"repository:{repo}:pull,push"
        r = self.check(self.request("POST", api_path(repo, "blobs", "uploads/"), scope=scope,
                                    headers={"Content-Length": "0"}, what=f"start upload to {repo}"),
                       (202,), scope, f"start upload to {repo}")
        location = self._location(r)
        sep = "&" if "?" in location else "?"
        self.check(self.request("PUT", f"{location}{sep}digest={digest}", scope=scope, body=lambda: data,
                                headers={"Content-Type": "application/octet-stream"}, what="config upload"),
                   (201,), scope, "config upload")

    def download_blob(self, repo: str, digest: str, size: int, out: BinaryIO,
                      on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream a blob into `out`, hashing as it goes; IntegrityError unless digest and size match."""
        scope = f"repository:{repo}:pull"
        r = self.check(self.request("GET", api_path(repo, "blobs", digest), scope=scope, stream=True,
                                    what=f"blob {digest[:19]}"), (200,), scope, f"blob {digest}")
        h = hashlib.sha256()
        n = 0
        try:
            for block in r.iter_bytes(READ_BLOCK):
                n += len(block)
                if n > size:
                    raise IntegrityError(f"{self.host}: blob {digest} is larger than its {size} bytes: refused")
                h.update(block)
                out.write(block)
                if on_bytes:
                    on_bytes(len(block))
        except httpx.HTTPError as e:
            raise RegistryError(f"{self.host}: download of blob {digest} broke off: {type(e).__name__}") from None
        finally:
            r.close()
        got = "sha256:" + h.hexdigest()
        if got != digest or n != size:
            raise IntegrityError(f"{self.host}: blob {digest} arrived as {got} ({n} of {size} bytes): refused, "
                                 "nothing written. The registry's copy is corrupt or was tampered with")


    # -- manifests -----------------------------------------------------------------------------------
    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        scope = f"repository:{repo}:pull,push"
        self.check(self.request("PUT", api_path(repo, "manifests", ref), scope=scope, body=lambda: body,
                                headers={"Content-Type": media_type}, what=f"manifest {repo}:{ref}"),
                   (201,), scope, f"manifest {repo}:{ref}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def manifest_digest(self, repo: str, ref: str) -> str | None:
        """The digest of repo:ref, or None when it does not exist (HEAD: no body transferred)."""
        scope = f"repository:{repo}:pull"
        r = self.request("HEAD", api_path(repo, "manifests", ref), scope=scope, headers={"Accept": MANIFEST_ACCEPT},
                         what=f"manifest {repo}:{ref}")
        if r.status_code == 404:
            return None
        self.check(r, (200,), scope, f"manifest {repo}:{ref}")
        return r.headers.get("docker-content-digest")

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The manifest's exact bytes and their digest; a pinned digest is checked against them."""
        scope = f"repository:{repo}:pull"
        r = self.check(self.request("GET", api_path(repo, "manifests", ref), scope=scope,
                                    headers={"Accept": MANIFEST_ACCEPT}, what=f"manifest {repo}:{ref}"),
                       (200,), scope, f"manifest {repo}:{ref}")
        body = r.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise IntegrityError(f"{self.host}: manifest {ref} arrived as {digest}: refused")
        return body, digest


def _error_detail(resp: httpx.Response) -> str:
    """The registry's own error code and message (distribution spec error JSON); never request headers."""
    try:
        errors = resp.json().get("errors") or []
    except (json.JSONDecodeError, ValueError, AttributeError):
        return ""
    if not errors:
        return ""
    e = errors[0]
    return f": {e.get('code', '')} {e.get('message', '')}".rstrip()
