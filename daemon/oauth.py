"""OAuth2 access tokens for XOAUTH2 (SPEC §7a): the refresh-token grant, cached, shared, redacted.

One `Tokens` per process. A mailbox's SMTP and IMAP sessions ask it for a
token; it is fetched from the provider's token endpoint once, kept until
shortly before it expires, and fetched again when a server refuses it. The
endpoint's answer is untrusted: read with a size bound and parsed field by
field. A revoked grant (`invalid_grant`) is the operator's to fix
(`cadenced mailbox authorize`); an endpoint that is down or answers nonsense
is a transient failure the mailbox's probing retries.

httpx is the HTTP client: asynchronous (the daemon's event loop never blocks
on it), with connect/read/write/pool timeouts, TLS verified by default.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from daemon import redact
from daemon.model import OAuth2

if TYPE_CHECKING:
    import httpx

TIMEOUT = 15.0  # seconds per network operation
TOTAL = 30.0  # seconds for a whole exchange: an endpoint trickling its answer byte by byte does not hold a login
MAX_ANSWER = 64 * 1024  # bytes of a token endpoint's answer
MAX_TOKEN = 16 * 1024  # characters of an access token (Microsoft's JWTs are a few KiB)
MARGIN = 120.0  # a token this close to its expiry is refreshed before use
DEFAULT_LIFETIME = 3600.0  # when the answer has no expires_in
REAUTHORISE = "reauthorise"


class TokenError(Exception):
    """No access token for now: the endpoint is down or answered what cannot be used (transient)."""


class GrantRevoked(TokenError):
    """The provider will not give tokens for this grant any more: the operator must authorise again."""


@dataclass(slots=True)
class _Cached:
    token: str
    expires_at: float
    scope: str


class Tokens:
    """Access tokens by mailbox; `get` refreshes when needed, `refused` after a server turned one down."""

    def __init__(self, clock: Callable[[], float] = time.time, client: httpx.AsyncClient | None = None) -> None:
        self.clock = clock
        self._client = client
        self._cache: dict[tuple[str, OAuth2], _Cached] = {}
        self._locks: dict[tuple[str, OAuth2], anyio.Lock] = {}
        self._rotated: dict[tuple[str, OAuth2], str] = {}  # refresh tokens the provider replaced

    def expiry(self, address: str, oauth: OAuth2) -> tuple[float, str] | None:
        """(expires_at, scope) of the cached token, for reports; never the token."""
        cached = self._cache.get((address, oauth))
        return (cached.expires_at, cached.scope) if cached else None

    def fresh(self, address: str, oauth: OAuth2) -> bool:
        """A cached token that `get` would hand out without asking the endpoint."""
        cached = self._cache.get((address, oauth))
        return cached is not None and cached.expires_at - MARGIN > self.clock()

    async def get(self, address: str, oauth: OAuth2) -> str:
        """A live access token for the mailbox; raises GrantRevoked or TokenError."""
        key = (address, oauth)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:  # SMTP and IMAP asking at once share one refresh
            cached = self._cache.get(key)
            if cached is not None and cached.expires_at - MARGIN > self.clock():
                return cached.token
            cached = await self._refresh(address, oauth)
            self._cache[key] = cached
            return cached.token

    def refused(self, address: str, oauth: OAuth2, token: str) -> None:
        """A server refused `token`: the next `get` fetches a new one (once, whoever asks first)."""
        key = (address, oauth)
        cached = self._cache.get(key)
        if cached is not None and cached.token == token:
            del self._cache[key]

    def forget(self, keep: set[tuple[str, OAuth2]]) -> None:
        """Drop the tokens of mailboxes, or OAuth settings, that a reload left behind."""
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]
            self._locks.pop(key, None)
            self._rotated.pop(key, None)
            if not any(k[0] == key[0] for k in self._cache):
                redact.forget(f"oauth:{key[0]}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _refresh(self, address: str, oauth: OAuth2) -> _Cached:
        if oauth.refresh_token is None:
            raise GrantRevoked(
                f"{REAUTHORISE}: no refresh token yet ({oauth.refresh_token_source.partition(':')[2]}): "
                f"run `cadenced mailbox authorize {address}`"
            )
        key = (address, oauth)
        refresh = self._rotated.get(key) or oauth.refresh_token.reveal()
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": oauth.client_id,
        }
        if oauth.client_secret is not None:
            form["client_secret"] = oauth.client_secret.reveal()
        if oauth.scopes:
            form["scope"] = " ".join(oauth.scopes)
        status, answer = await self._post(oauth.token_url, form)
        cached, rotated = parse_answer(status, answer, address, self.clock())
        redact.register_rotating(f"oauth:{address}", address, cached.token)
        if rotated is not None and rotated != refresh:
            # The provider rotated the refresh token (Microsoft may): the new one is used from now on, and
            # written to the refresh token file when there is one (a reload or restart then keeps it).
            redact.register(address, rotated)
            self._rotated[key] = rotated
            save_refresh_token(oauth, rotated)
        return cached

    async def _post(self, url: str, form: dict[str, str]) -> tuple[int, bytes]:
        # Imported at the first token: every command and every daemon without OAuth2 starts 40-140 ms sooner.
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False)
        try:
            with anyio.fail_after(TOTAL):
                async with self._client.stream("POST", url, data=form, headers={"Accept": "application/json"}) as reply:
                    body = bytearray()
                    async for chunk in reply.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER:
                            raise TokenError(f"the token endpoint's answer is over {MAX_ANSWER // 1024} KiB")
                    return reply.status_code, bytes(body)
        except TimeoutError:
            raise TokenError(f"the token endpoint gave no whole answer within {TOTAL:.0f} s") from None
        except httpx.HTTPError as exc:
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}: {redact.clean(str(exc))}") from None


def parse_answer(status: int, answer: bytes, address: str, now: float) -> tuple[_Cached, str | None]:
    """The token endpoint's answer (RFC 6749 §5): the access token and a rotated refresh token, or why not."""
    try:
        data = json.loads(answer)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deeply nested arrays exhaust the parser's stack
        data = None
    if not isinstance(data, dict):
        raise TokenError(f"the token endpoint answered HTTP {status} without a JSON object")
    if status != 200 or "error" in data:
        error = data.get("error")
        error = error[:64] if isinstance(error, str) else "?"
        text = data.get("error_description")
        detail = redact.clean(text, 200) if isinstance(text, str) else ""
        if error == "invalid_grant":
            raise GrantRevoked(
                f"{REAUTHORISE}: the provider revoked or expired the grant (invalid_grant"
                f"{': ' + detail if detail else ''}); run `cadenced mailbox authorize {address}`, then reload"
            )
        if error in ("invalid_client", "unauthorized_client"):
            raise GrantRevoked(
                f"{REAUTHORISE}: the provider refused the OAuth client ({error}): check client_id and its secret"
            )
        raise TokenError(f"the token endpoint answered HTTP {status} ({error}{': ' + detail if detail else ''})")
    token = data.get("access_token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN or not token.isprintable() or " " in token:
        raise TokenError("the token endpoint's answer has no usable access_token")
    kind = data.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise TokenError("the token endpoint's answer is not a Bearer token")
    lifetime = data.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or not 0 < lifetime <= 366 * 86400:
        lifetime = DEFAULT_LIFETIME
    scope = data.get("scope", "")
    rotated = data.get("refresh_token")
    rotated = rotated if isinstance(rotated, str) and 0 < len(rotated) <= MAX_TOKEN and rotated.isprintable() else None
    return _Cached(token, now + float(lifetime), scope[:1000] if isinstance(scope, str) else ""), rotated


def save_refresh_token(oauth: OAuth2, token: str) -> Path | None:
    """Write a refresh token to the configured file, mode 0600, atomically; None when it is not a file."""
    if not oauth.refresh_token_file:
        return None
    path = Path(oauth.refresh_token_file)
    folder = os.stat(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".refresh-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        if os.geteuid() == 0 and folder.st_uid != 0:
            # `mailbox authorize` run as root into the service's state directory: the token is the service's.
            os.fchown(fd, folder.st_uid, folder.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- authorization (cadenced mailbox authorize) ---------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) of RFC 7636."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(settings: OAuth2, address: str, redirect_uri: str, state: str, challenge: str) -> str:
    """Where the operator signs in and consents. Google gives a refresh token only with access_type=offline
    and (again) with prompt=consent; Microsoft's comes with the offline_access scope."""
    query = {
        "response_type": "code",
        "client_id": settings.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(settings.scopes),
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": address,
        "access_type": "offline",
        "prompt": "consent",
    }
    joiner = "&" if "?" in settings.auth_url else "?"
    return settings.auth_url + joiner + urllib.parse.urlencode(query)


class AuthorizationFailed(Exception):
    """The redirect did not bring a code we can use; the message says why (never a code or a token)."""


def code_from_redirect(url: str, state: str) -> str:
    """The authorization code of the redirected URL (the listener's request target, or what was pasted)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url.strip()).query, max_num_fields=20)
    if query.get("state", [""])[0] != state:
        raise AuthorizationFailed("this is not the redirect of this authorization (its state differs)")
    if "error" in query:
        error = query["error"][0][:64]
        described = query.get("error_description", [""])[0][:200]
        raise AuthorizationFailed(f"the provider said {error}{': ' + described if described else ''}")
    code = query.get("code", [""])[0]
    if not code or len(code) > MAX_TOKEN or not code.isprintable():
        raise AuthorizationFailed("the redirect has no authorization code")
    return code


async def exchange_code(settings: OAuth2, code: str, verifier: str, redirect_uri: str) -> str:
    """The authorization code for a refresh token (the authorization-code grant with PKCE)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": redirect_uri,
        "client_id": settings.client_id,
    }
    if settings.client_secret is not None:
        form["client_secret"] = settings.client_secret.reveal()
    tokens = Tokens()
    try:
        status, answer = await tokens._post(settings.token_url, form)
    finally:
        await tokens.aclose()
    _, refresh = parse_answer(status, answer, "", time.time())
    if refresh is None:
        raise AuthorizationFailed(
            "the provider gave no refresh token (Google: remove the app's access at "
            "myaccount.google.com/permissions and authorize again; Microsoft: add the offline_access scope)"
        )
    return refresh
