"""API keys and signed stream tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from services.settings import Settings


def key_id(key: str) -> str:
    """Short, non-reversible id of an API key: what is recorded as the tenant and may be logged."""
    return "k_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class Auth:
    """Bearer keys (compared in constant time) and HMAC-SHA256 stream tokens over request id + expiry."""

    def __init__(self, settings: Settings):
        self.keys = tuple(k for k in settings.api_keys if k)
        self.enabled = bool(self.keys)
        secret = settings.stream_token_secret or "\n".join(sorted(self.keys))
        self._secret = hashlib.sha256(b"tokenrelay-stream-token\0" + secret.encode("utf-8")).digest()
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

    def sign(self, request_id: str, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        body = expiry.to_bytes(8, "big")
        mac = hmac.new(self._secret, request_id.encode() + body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def verify(self, request_id: str, token: str, now: float | None = None) -> bool:
        if not token or len(token) > 64:
            return False
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return False
        if len(raw) != 24:
            return False
        body, mac = raw[:8], raw[8:]
        expected = hmac.new(self._secret, request_id.encode() + body, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, expected):
            return False
        return int.from_bytes(body, "big") >= (time.time() if now is None else now)
