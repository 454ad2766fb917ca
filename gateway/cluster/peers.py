"""Gateways prove to each other that they hold the cluster's shared secret; an advertised URL alone is not trust.

A follower sends a fresh nonce with each upstream stream; the owner answers with an HMAC over that nonce, the request
id and its own advertised URL, and the follower relays nothing from an owner whose proof is missing or wrong. The URL
is in the proof so that a rogue cannot pass on a real gateway's answer as its own. The follower in turn presents a
credential (an HMAC over the request id and an expiry) that lets it read as a gateway, whatever API keys either has.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

NONCE_HEADER = "X-Tokenrelay-Nonce"
PROOF_HEADER = "X-Tokenrelay-Proof"
PEER_HEADER = "X-Tokenrelay-Peer"
CREDENTIAL_TTL_S = 300
_MAX_FIELD = 200


class Peers:
    """What this gateway proves and checks with the secret it shares with the other gateways of its cluster."""

    def __init__(self, secret: bytes, me: str):
        self._key = hmac.new(secret, b"tokenrelay-gateway-peers", hashlib.sha256).digest()
        self.me = me  # the URL this gateway advertises to the group

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "\0".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def nonce() -> str:
        return secrets.token_urlsafe(18)

    def prove(self, nonce: str, request_id: str) -> str:
        """The owner's answer to a follower's nonce."""
        return self._mac("owner", nonce[:_MAX_FIELD], request_id, self.me)

    def is_owner(self, nonce: str, request_id: str, url: str, proof: str | None) -> bool:
        """Whether ``proof`` is what the gateway advertised at ``url`` answers to ``nonce``."""
        expected = self._mac("owner", nonce, request_id, url)
        return proof is not None and hmac.compare_digest(expected, proof[:_MAX_FIELD])

    def credential(self, request_id: str, now: float | None = None) -> str:
        """What a follower presents to read ``request_id`` from its owner."""
        expiry = str(int((time.time() if now is None else now) + CREDENTIAL_TTL_S))
        return f"{expiry}.{self._mac('follower', request_id, expiry)}"

    def is_peer(self, request_id: str, credential: str | None, now: float | None = None) -> bool:
        """Whether ``credential`` comes from a gateway of this cluster, for this request, and is unexpired."""
        if not credential or len(credential) > _MAX_FIELD:
            return False
        expiry, _, mac = credential.partition(".")
        if not expiry.isdigit() or int(expiry) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._mac("follower", request_id, expiry), mac)
