"""Credentials stay with their registry and requests stay in the repository the user named.

Two loopback HTTP servers: A, a registry that wants credentials and answers uploads with a Location on B (a
second port) and blob downloads with a redirect to B; B logs every request. B must never see an Authorization
header, and A must never see a path outside /v2/<repo>/ (issue 22, items 1 and 2's registry side)."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from toolchain.errors import InputError
from toolchain.registry.auth import Credentials
from toolchain.registry.client import RegistryClient
from toolchain.registry.errors import RegistryError
from toolchain.registry.package import destination
from toolchain.registry.reference import Reference, parse_reference

REPO = "team/m"
BLOB = b"weights " * 1000
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class Server:
    """One loopback server; `answer(handler)` returns (status, headers, body). Every request is logged."""

    def __init__(self, answer):
        self.log: list[tuple[str, str, dict[str, str]]] = []
        log, outer = self.log, self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                log.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, headers, body = answer(self, outer)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

            def log_message(self, *a) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _registry(other: Server) -> Server:
    """A: Basic auth or a bearer token required; uploads and blob downloads are sent to `other`."""
    def answer(h, _me):
        if "authorization" not in {k.lower() for k in h.headers}:
            return 401, {"WWW-Authenticate": 'Basic realm="a"'}, b""
        if h.command == "HEAD" and "/blobs/" in h.path:
            return 404, {}, b""
        if h.command == "POST" and h.path.endswith("/blobs/uploads/"):
            return 202, {"Location": f"http://{other.host}/v2/{REPO}/blobs/uploads/u1"}, b""
        if h.command == "GET" and "/blobs/" in h.path:
            return 307, {"Location": f"http://{other.host}{h.path}"}, b""
        if h.command == "PUT" and "/manifests/" in h.path:
            return 201, {}, b""
        return 400, {}, b""
    return Server(answer)


def _storage(challenge: bool) -> Server:
    """B: takes uploads and serves blobs; with `challenge`, asks for credentials (it must not get them)."""
    def answer(h, _me):
        if challenge:
            return 401, {"WWW-Authenticate": 'Basic realm="b"'}, b""
        if h.command == "PATCH":
            return 202, {"Location": h.path, "Range": "0-0"}, b""
        if h.command == "PUT":
            return 201, {}, b""
        if h.command == "GET":
            return 200, {}, BLOB
        return 400, {}, b""
    return Server(answer)


CREDENTIALS = {"basic": Credentials("alice", "s3cret-pw", source="test"),
               "token": Credentials(token="tok-abc", source="test")}


@pytest.mark.parametrize("kind", sorted(CREDENTIALS))
def test_no_authorization_reaches_a_second_origin(tmp_path: Path, kind: str, monkeypatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_UPLOAD_STATE", str(tmp_path / "uploads"))
    b = _storage(challenge=False)
    a = _registry(b)
    try:
        f = tmp_path / "w.bin"
        f.write_bytes(BLOB)
        with RegistryClient(a.host, CREDENTIALS[kind], insecure=True, sleep=lambda s: None) as c:
            c.upload_blob(REPO, f, DIGEST, len(BLOB))
            c.upload_bytes(REPO, b"{}", "sha256:" + hashlib.sha256(b"{}").hexdigest())
            c.put_manifest(REPO, "v1", b"{}")
            out = tmp_path / "got.bin"
            with open(out, "wb") as fh:
                c.download_blob(REPO, DIGEST, len(BLOB), fh)
        assert out.read_bytes() == BLOB
        methods = {m for m, _p, _h in b.log}
        assert {"PATCH", "PUT", "GET"} <= methods, b.log  # B really took the upload and served the download
        assert not [(m, p) for m, p, h in b.log if "authorization" in h], "credentials reached another origin"
        assert any("authorization" in h for _m, _p, h in a.log)  # the registry itself got them
        assert all(p.startswith(f"/v2/{REPO}/") for _m, p, _h in a.log + b.log), a.log + b.log
    finally:
        a.close()
        b.close()


def test_a_challenge_from_another_origin_is_refused_not_answered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_UPLOAD_STATE", str(tmp_path / "uploads"))
    b = _storage(challenge=True)
    a = _registry(b)
    try:
        f = tmp_path / "w.bin"
        f.write_bytes(BLOB)
        with RegistryClient(a.host, CREDENTIALS["basic"], insecure=True, sleep=lambda s: None) as c:
            with pytest.raises(RegistryError, match="sent only to"):
                c.upload_blob(REPO, f, DIGEST, len(BLOB))
        assert b.log and not [h for _m, _p, h in b.log if "authorization" in h]
    finally:
        a.close()
        b.close()


def test_password_is_not_sent_to_a_plain_http_token_service() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, headers={"www-authenticate": 'Bearer realm="http://auth.example/token"'})

    c = RegistryClient("reg.example", CREDENTIALS["basic"], transport=httpx.MockTransport(handler))
    with pytest.raises(RegistryError, match="not HTTPS"):
        c.manifest_digest(REPO, "v1")
    assert [r.url.host for r in seen] == ["reg.example"]


# -- every URL stays in the named repository --------------------------------------------------------------

EVIL_TAGS = ["../../../other/repo/manifests/latest", "..", ".hidden", "v1/../../x", "a" * 129, "v1%2f..", ""]


@pytest.mark.parametrize("tag", EVIL_TAGS)
def test_client_refuses_a_reference_that_leaves_the_repository(tag: str) -> None:
    seen: list[httpx.Request] = []
    c = RegistryClient("reg.example", transport=httpx.MockTransport(
        lambda r: seen.append(r) or httpx.Response(201)))
    for call in (lambda: c.put_manifest(REPO, tag, b"{}"), lambda: c.get_manifest(REPO, tag),
                 lambda: c.manifest_digest(REPO, tag), lambda: c.blob_exists(REPO, tag)):
        with pytest.raises(InputError):
            call()
    for repo in ("team/../other", "team//m", "/team/m", "Team/M"):
        with pytest.raises(InputError):
            c.put_manifest(repo, "v1", b"{}")
    assert seen == [], "no request is sent for a reference outside the grammar"


@pytest.mark.parametrize("label", ["../../../other/repo/manifests/latest", "a/b", "x:y", "a b"])
def test_publish_destination_refuses_labels_that_would_normalize_out(label: str) -> None:
    with pytest.raises(InputError, match=re.escape(f"target {label!r}")):
        destination(f"oci://reg.example/{REPO}:v1", label, 2)
    with pytest.raises(InputError, match=re.escape(f"target {label!r}")):
        destination(f"oci://reg.example/{REPO}:{{target}}", label, 1)


@pytest.mark.parametrize("tag", EVIL_TAGS + ["-x", "v1:x"])
def test_with_tag_refuses_what_the_grammar_refuses(tag: str) -> None:
    with pytest.raises(InputError):
        parse_reference(f"oci://reg.example/{REPO}:v1").with_tag(tag)


@pytest.mark.parametrize("repo", ["team/../other", "team/./m", "team/m/", "team/m/..", ""])
def test_a_reference_cannot_hold_a_repository_that_normalizes_out(repo: str) -> None:
    with pytest.raises(InputError):
        Reference("reg.example", repo)


def test_good_destinations_still_work() -> None:
    assert destination(f"oci://reg.example/{REPO}:v1", "gguf", 2).tag == "v1-gguf"
    assert destination(f"oci://reg.example/{REPO}:{{target}}", "int4.q_4", 1).tag == "int4.q_4"


def test_a_fetched_token_is_sent_only_for_its_scope() -> None:
    seen: list[httpx.Request] = []
    tokens = iter(["tok-pull", "tok-push"])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": next(tokens)})
        if "authorization" not in request.headers:
            return httpx.Response(401, headers={"www-authenticate": 'Bearer realm="https://auth.example/t"'})
        return httpx.Response(201 if request.method == "PUT" else 404)

    c = RegistryClient("reg.example", CREDENTIALS["basic"], transport=httpx.MockTransport(handler))
    assert c.manifest_digest(REPO, "v1") is None  # pull scope
    c.put_manifest(REPO, "v1", b"{}")  # push scope: a new challenge, a new token
    sent = [(r.method, r.headers.get("authorization")) for r in seen if r.url.host == "reg.example"]
    assert sent == [("HEAD", None), ("HEAD", "Bearer tok-pull"), ("PUT", None), ("PUT", "Bearer tok-push")]
    assert [r.url.params["scope"] for r in seen if r.url.host == "auth.example"] == [
        f"repository:{REPO}:pull", f"repository:{REPO}:pull,push"]
