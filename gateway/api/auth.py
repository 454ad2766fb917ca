"""API keys and signed stream tokens: scoped (watch, or watch and cancel) and bound to the key that minted them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import tempfile
import time
from pathlib import Path

from services.settings import Settings

log = logging.getLogger(__name__)

WATCH = 1  # events and status
CANCEL = 2  # cancel as well
TOKEN_VERSION = 2
SECRET_FILE = "stream-token-secret"
_FINGERPRINT_BYTES = 6
# version, scope, fingerprint of the minting key, expiry (unix seconds), truncated HMAC-SHA256
_BODY_BYTES = 2 + _FINGERPRINT_BYTES + 8
_TOKEN_BYTES = _BODY_BYTES + 16


def key_id(key: str) -> str:
    """Short, non-reversible id of an API key: what is recorded as the tenant and may be logged."""
    return "k_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[: 2 * _FINGERPRINT_BYTES]


def stream_token_secret(settings: Settings) -> bytes:
    """TOKENRELAY_STREAM_TOKEN_SECRET when set, else a random secret kept in the cache dir (made once, mode 0600).

    Never derived from the key list, so adding or removing a key leaves every other key's tokens valid. The file
    lets restarted gateways, and every gateway sharing the cache dir, accept each other's tokens; gateways on
    several machines must be given the same TOKENRELAY_STREAM_TOKEN_SECRET.
    """
    if settings.stream_token_secret:
        return hashlib.sha256(b"tokenrelay-stream-token\0" + settings.stream_token_secret.encode("utf-8")).digest()
    path = settings.cache_dir / SECRET_FILE
    try:
        return _read_or_create(path)
    except OSError as exc:
        log.warning("cannot keep a stream-token secret in %s (%s): tokens die with this process", path, exc)
        return os.urandom(32)


def _read_or_create(path: Path) -> bytes:
    with contextlib.suppress(FileNotFoundError):
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic: a gateway starting at the same time either wins or reads the winner's
    finally:
        os.unlink(tmp)
    return path.read_bytes()


class Auth:
    """Bearer keys (compared in constant time) and HMAC-SHA256 stream tokens.

    A token names the request, its scope, its expiry and the fingerprint of the key that minted it; it is refused
    once that key is no longer configured.
    """

    def __init__(self, settings: Settings, secret: bytes | None = None):
        self.keys = tuple(k for k in settings.api_keys if k)
        self.enabled = bool(self.keys)
        self._fingerprints = {bytes.fromhex(key_id(k)[2:]) for k in self.keys}
        if secret is None:
            secret = stream_token_secret(settings) if self.enabled else os.urandom(32)
        self._secret = secret
        self.ttl_s = settings.stream_token_ttl_s

    def tenant_of(self, authorization: str | None) -> str | None:
        """Key id of a valid `Bearer` header; None when missing or wrong."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = token.strip().encode("utf-8", "replace")
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.encode("utf-8"), presented):
                found = key
        return key_id(found) if found is not None else None

    def sign(self, request_id: str, tenant: str, scope: int = WATCH, now: float | None = None) -> str:
        """A token for ``request_id`` minted by the key whose id is ``tenant``."""
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        body = bytes([TOKEN_VERSION, scope]) + bytes.fromhex(tenant[2:]) + expiry.to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._mac(request_id, body)).rstrip(b"=").decode("ascii")

    def verify(self, request_id: str, token: str, scope: int = WATCH, now: float | None = None) -> bool:
        """True when the token is genuine, unexpired, of a key still configured, and allows ``scope``."""
        allowed = self.scope_of(request_id, token, now)
        return allowed != 0 and allowed & scope == scope

    def scope_of(self, request_id: str, token: str, now: float | None = None) -> int:
        """What a genuine, unexpired token of a key still configured allows for ``request_id``; 0 for any other."""
        if not token or len(token) > 64:
            return 0
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return 0
        if len(raw) != _TOKEN_BYTES or raw[0] != TOKEN_VERSION:
            return 0
        body, mac = raw[:_BODY_BYTES], raw[_BODY_BYTES:]
        if not hmac.compare_digest(mac, self._mac(request_id, body)):
            return 0
        if raw[2 : 2 + _FINGERPRINT_BYTES] not in self._fingerprints:
            return 0  # its key was removed
        if int.from_bytes(body[-8:], "big") < (time.time() if now is None else now):
            return 0
        return raw[1]

    def _mac(self, request_id: str, body: bytes) -> bytes:
        return hmac.new(self._secret, body + request_id.encode("utf-8"), hashlib.sha256).digest()[:16]
