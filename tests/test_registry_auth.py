"""The registry client's retries, error messages and credentials, on a scripted transport; and the bearer
token flow against a real distribution 2.8 configured for token auth, with a token service of our own."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from oci_registry import make_artifact, start_registry

from toolchain.registry import auth
from toolchain.registry.client import RegistryClient
from toolchain.registry.errors import RegistryError


def scripted(responses: list, seen: list) -> httpx.MockTransport:
    """A transport answering each request with the next scripted response (or raising it)."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item
    return httpx.MockTransport(handler)


def client(responses: list, seen: list, **kw) -> tuple[RegistryClient, list[float]]:
    sleeps: list[float] = []
    c = RegistryClient("reg.example", transport=scripted(responses, seen), sleep=sleeps.append, **kw)
    return c, sleeps


def test_retries_5xx_and_connection_errors_with_backoff():
    seen: list = []
    c, sleeps = client([httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(502),
                        httpx.Response(200, headers={"docker-content-digest": "sha256:" + "a" * 64})], seen)
    assert c.manifest_digest("team/m", "v1") == "sha256:" + "a" * 64
    assert len(seen) == 4 and sleeps == [0.5, 1.0, 2.0]
    seen.clear()
    c, sleeps = client([httpx.ConnectError("refused")] * 3, seen, retries=2)
    with pytest.raises(RegistryError, match="failed after 3 attempts.*--insecure"):
        c.manifest_digest("team/m", "v1")
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status,fix", [
    (404, "check the repository and tag"),
    (413, "TOOLCHAIN_REGISTRY_CHUNK_MB"),
    (403, "may not pull team/m"),
])
def test_errors_name_the_fix(status, fix):
    c, _ = client([httpx.Response(status, json={"errors": [{"code": "X", "message": "m"}]})], [])
    with pytest.raises(RegistryError, match=fix):
        c.get_manifest("team/m", "v1")


def test_bearer_challenge_fetches_a_token_with_basic_credentials():
    creds = auth.Credentials("bob", "pw-123", source="test")
    challenge = {"www-authenticate": 'Bearer realm="https://auth.example/token",service="reg",'
                                     'scope="repository:team/m:pull"'}
    seen: list = []
    c, _ = client([httpx.Response(401, headers=challenge), httpx.Response(200, json={"token": "tok-9"}),
                   httpx.Response(200, headers={"docker-content-digest": "sha256:" + "b" * 64})], seen,
                  credentials=creds)
    assert c.manifest_digest("team/m", "v1")
    token_req = seen[1]
    assert token_req.url.host == "auth.example" and token_req.url.params["scope"] == "repository:team/m:pull"
    assert token_req.headers["authorization"] == "Basic " + base64.b64encode(b"bob:pw-123").decode()
    assert seen[2].headers["authorization"] == "Bearer tok-9"
    assert "pw-123" not in repr(creds)


def test_docker_config_auths_and_credential_helper(tmp_path, monkeypatch):
    for k in ("TOOLCHAIN_REGISTRY_TOKEN", "TOOLCHAIN_REGISTRY_USERNAME", "TOOLCHAIN_REGISTRY_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\": \\"h-user\\", \\"Secret\\": \\"h-$host\\"}"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(json.dumps({
        "auths": {"a.example": {"auth": base64.b64encode(b"ann:pw1").decode()},
                  "https://b.example": {"username": "ben", "password": "pw2"}},
        "credHelpers": {"c.example": "fake"}}))
    a, b, c = auth.lookup("a.example"), auth.lookup("b.example"), auth.lookup("c.example")
    assert (a.username, a.password) == ("ann", "pw1") and "config.json" in a.source
    assert (b.username, b.password) == ("ben", "pw2")
    assert (c.username, c.password) == ("h-user", "h-c.example") and "docker-credential-fake" in c.source
    assert not auth.lookup("d.example").present
    monkeypatch.setenv("TOOLCHAIN_REGISTRY_USERNAME", "env-user")
    monkeypatch.setenv("TOOLCHAIN_REGISTRY_PASSWORD", "env-pw")
    assert auth.lookup("a.example").username == "env-user"  # the environment wins over docker's config


# -- the token flow against a real registry ---------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The distribution spec's token service, minimal: GET /token?service&scope with Basic auth -> an RS256
    JWT carrying the x5c chain of a self-signed certificate the registry trusts (its rootcertbundle)."""

    def __init__(self, tmp: Path, users: dict[str, str], issuer: str = "toolchain-test-issuer",
                 service: str = "toolchain-test"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolchain test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.bundle = tmp / "token-signer.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.users, self.issuer, self.service = users, issuer, service
        self.requests: list[dict] = []
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                header = self.headers.get("Authorization", "")
                svc.requests.append({"scope": q.get("scope", [""])[0], "basic": header.startswith("Basic ")})
                try:
                    user, _, pw = base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")
                except (IndexError, ValueError):
                    user, pw = "", ""
                if svc.users.get(user) != pw:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in q.get("scope", []):
                    kind, _, rest = scope.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": repo, "actions": actions.split(",")})
                body = json.dumps({"token": svc.sign(user, access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._padding, self._hashes = padding, hashes
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sign(self, user: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), self._padding.PKCS1v15(), self._hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def registry_auth(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.service}\n"
                f"    issuer: {self.issuer}\n    rootcertbundle: {self.bundle}\n")

    def stop(self) -> None:
        self.server.shutdown()


def test_bearer_token_flow_with_a_real_registry(tmp_path):
    pytest.importorskip("cryptography", reason="the test's token service signs JWTs with cryptography")
    tokens = TokenService(tmp_path, {"carol": "tok-pass-5"})
    reg = start_registry(tmp_path, extra_auth=tokens.registry_auth())
    try:
        key = make_artifact(tmp_path / "store", "7", {"config.json": b"{\"t\":1}", "w.safetensors": b"x" * 5000})
        ref = reg.url("team/tok", "v1")
        good = {"TOOLCHAIN_REGISTRY_USERNAME": "carol", "TOOLCHAIN_REGISTRY_PASSWORD": "tok-pass-5"}
        r = run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure", "--json", env=good)
        assert r.returncode == 0, r.stderr
        assert any("push" in q["scope"] and q["basic"] for q in tokens.requests)
        out = tmp_path / "out"
        assert run_cli("pull", ref, str(out), "--insecure", env=good).returncode == 0
        assert (out / "w.safetensors").read_bytes() == b"x" * 5000
        bad = {**good, "TOOLCHAIN_REGISTRY_PASSWORD": "nope-Secret-1"}
        r = run_cli("pull", ref, str(tmp_path / "out2"), "--insecure", env=bad)
        assert r.returncode == 1 and "authentication failed" in r.stderr and "token service" in r.stderr
        assert "nope-Secret-1" not in r.stdout + r.stderr
    finally:
        reg.stop()
        tokens.stop()


def test_https_is_verified_and_a_trusted_certificate_is_accepted(tmp_path):
    """A registry on HTTPS with a self-signed certificate: refused by default (TLS verified), accepted once
    SSL_CERT_FILE names that certificate. --insecure would mean plain HTTP, never an unverified certificate."""
    pytest.importorskip("cryptography", reason="the test makes its certificate with cryptography")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "reg.crt", tmp_path / "reg.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    reg = start_registry(tmp_path, tls=(cert_file, key_file))
    try:
        store = tmp_path / "store"
        art = make_artifact(store, "9", {"config.json": b"{\"tls\":1}"})
        ref = reg.url("team/tls", "v1")
        r = run_cli("push", art, "--store", str(store), "--to", ref, env={"SSL_CERT_FILE": ""})
        assert r.returncode == 1 and "TLS failed" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        r = run_cli("push", art, "--store", str(store), "--to", ref, "--json", env={"SSL_CERT_FILE": str(cert_file)})
        assert r.returncode == 0, r.stderr
        out = tmp_path / "out"
        assert run_cli("pull", ref, str(out), env={"SSL_CERT_FILE": str(cert_file)}).returncode == 0
        assert (out / "config.json").read_bytes() == b"{\"tls\":1}"
    finally:
        reg.stop()


def test_a_chunk_is_re_sent_whole_after_a_5xx(tmp_path, monkeypatch):
    """A retried PATCH re-reads its bytes from the file: the registry gets the full chunk again."""
    monkeypatch.setenv("TOOLCHAIN_UPLOAD_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("TOOLCHAIN_REGISTRY_CHUNK_MB", "1")
    data = os.urandom((1 << 20) + 100)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    loc = {"location": "/v2/team/m/blobs/uploads/u1?_state=s"}
    seen: list = []
    c, sleeps = client([httpx.Response(404), httpx.Response(202, headers=loc), httpx.Response(503),
                        httpx.Response(202, headers=loc), httpx.Response(202, headers=loc),
                        httpx.Response(201)], seen)
    stats = c.upload_blob("team/m", f, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    patches = [r for r in seen if r.method == "PATCH"]
    assert [r.headers["content-range"] for r in patches] == ["0-1048575", "0-1048575", "1048576-1048675"]
    assert patches[1].content == data[: 1 << 20] and patches[2].content == data[1 << 20:]
    assert sleeps == [0.5] and stats == {"skipped": False, "sent": len(data), "resumed_from": 0}
    assert seen[-1].method == "PUT" and seen[-1].url.params["digest"].startswith("sha256:")
