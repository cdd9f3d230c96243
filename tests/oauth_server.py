"""An OAuth2 provider of the tests' own on loopback: a token endpoint (refresh-token grant) that issues,
expires and revokes access tokens and counts refreshes, an introspection endpoint (what Dovecot asks), and an
aiosmtpd handler whose AUTH XOAUTH2 accepts only live tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.smtp import AuthResult

from tests.servers import Recorder


class Provider:
    def __init__(self, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self.grants: dict[str, str] = {}  # refresh token → user
        self.live: dict[str, tuple[str, float]] = {}  # access token → (user, expires_at)
        self.refreshes = 0
        self.issued: list[str] = []  # every access token ever handed out
        self.codes: dict[str, tuple[str, str, str]] = {}  # authorization code → (challenge, redirect_uri, user)
        self.down = False  # answer 503 to every refresh
        self.answer: bytes | None = None  # answer this instead (a hostile endpoint)
        self.rotate = False  # hand out a new refresh token with each access token
        self.trickle = False  # answer one byte every 0.2 s (a stalling endpoint)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    @property
    def introspection_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/introspect"

    def start(self) -> Provider:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def grant(self, user: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.grants[token] = user
        return token

    def revoke_grant(self, refresh_token: str) -> None:
        with self.lock:
            self.grants.pop(refresh_token, None)

    def revoke_tokens(self) -> None:
        with self.lock:
            self.live.clear()

    def valid(self, token: str, user: str | None = None) -> bool:
        with self.lock:
            found = self.live.get(token)
        return found is not None and found[1] > time.time() and (user is None or found[0] == user)

    def consent(self, url: str) -> str:
        """The user signs in and agrees: where the browser is sent back to, with a code for this request."""
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["response_type"] == "code" and query["code_challenge_method"] == "S256"
        code = "code-" + secrets.token_urlsafe(16)
        self.codes[code] = (query["code_challenge"], query["redirect_uri"], query["login_hint"])
        return query["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": query["state"]})

    def _exchange(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        found = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
        if found is None or found[0] != challenge or found[1] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant", "error_description": "code, verifier or redirect_uri"}
        refresh = self.grant(found[2])
        status, answer = self._token({"grant_type": "refresh_token", "refresh_token": refresh})
        return status, {**answer, "refresh_token": refresh}

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") == "authorization_code":
            return self._exchange(form)
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        with self.lock:
            self.refreshes += 1
            user = self.grants.get(form.get("refresh_token", ""))
            if user is None:
                return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
            token = "at-" + secrets.token_urlsafe(32)
            self.live[token] = (user, time.time() + self.lifetime)
            self.issued.append(token)
            answer: dict[str, Any] = {
                "access_token": token,
                "expires_in": self.lifetime,
                "token_type": "Bearer",
                "scope": form.get("scope", ""),
            }
            if self.rotate:
                old = form["refresh_token"]
                answer["refresh_token"] = self.grant(user)
                self.grants.pop(old, None)
        return 200, answer

    def _introspect(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = form.get("token", "")
        with self.lock:
            found = self.live.get(token)
        if found is None or found[1] <= time.time():
            return 200, {"active": False}
        return 200, {"active": True, "email": found[0], "username": found[0]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if self.path.startswith("/token") and provider.down:
                    self._send(503, b"<html>Service Unavailable</html>", "text/html")
                    return
                if self.path.startswith("/token") and provider.answer is not None:
                    self._send(200, provider.answer, "application/json")
                    return
                route = provider._token if self.path.startswith("/token") else provider._introspect
                status, answer = route(form)
                self._send(status, json.dumps(answer).encode(), "application/json")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not provider.trickle:
                    self.wfile.write(body)
                    return
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    threading.Event().wait(0.2)

        return Handler


@dataclass
class OAuthRecorder(Recorder):
    """aiosmtpd's handler with AUTH XOAUTH2 as Gmail answers it: a 334 with a JSON error, then 535 (which
    repeats the refused token, as a careless server might: it must not reach our logs)."""

    provider: Provider | None = None
    logins: list[tuple[str, bool]] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        assert self.provider is not None
        if len(args) > 1:
            blob = args[1]
        else:
            answer = await server.challenge_auth("", encode_to_b64=False)
            blob = answer.decode() if isinstance(answer, bytes) else str(answer)
        try:
            text = base64.b64decode(blob).decode()
            parts = dict(p.split("=", 1) for p in text.split("\x01") if p)
            user, token = parts["user"], parts["auth"].removeprefix("Bearer ")
        except (ValueError, KeyError):
            return AuthResult(success=False, handled=False)
        ok = self.provider.valid(token, user)
        self.logins.append((user, ok))
        if ok:
            return AuthResult(success=True)
        error = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode()).decode()
        await server.challenge_auth(error, encode_to_b64=False)
        return AuthResult(success=False, handled=False, message=f"535 5.7.8 Username and token not accepted {token}")
