"""Gateways prove the shared secret: an owner's proof is bound to the nonce, the request and its own URL."""

from __future__ import annotations

from gateway.cluster.peers import CREDENTIAL_TTL_S, Peers

RID = "01890000-0000-7000-8000-000000000000"


def test_an_owners_proof_names_its_nonce_request_and_url() -> None:
    owner = Peers(b"s" * 32, "http://gw-a:8080")
    follower = Peers(b"s" * 32, "http://gw-b:8080")
    nonce = follower.nonce()
    proof = owner.prove(nonce, RID)
    assert follower.is_owner(nonce, RID, "http://gw-a:8080", proof)
    # A rogue passing on a real gateway's answer as its own: the URL in the proof is not the rogue's.
    assert not follower.is_owner(nonce, RID, "http://rogue:8080", proof)
    assert not follower.is_owner(follower.nonce(), RID, "http://gw-a:8080", proof)  # an old answer, a new nonce
    assert not follower.is_owner(nonce, "01890000-0000-7000-8000-000000000001", "http://gw-a:8080", proof)
    assert not follower.is_owner(nonce, RID, "http://gw-a:8080", None)
    other_secret = Peers(b"t" * 32, "http://gw-a:8080")
    assert not follower.is_owner(nonce, RID, "http://gw-a:8080", other_secret.prove(nonce, RID))


def test_a_followers_credential_is_for_one_request_and_expires() -> None:
    peers = Peers(b"s" * 32, "http://gw-a:8080")
    credential = peers.credential(RID, now=1000.0)
    assert peers.is_peer(RID, credential, now=1000.0 + CREDENTIAL_TTL_S - 1)
    assert not peers.is_peer(RID, credential, now=1000.0 + CREDENTIAL_TTL_S + 1)
    assert not peers.is_peer("01890000-0000-7000-8000-000000000001", credential, now=1000.0)
    assert not Peers(b"t" * 32, "x").is_peer(RID, credential, now=1000.0)
    for bad in (None, "", "x", "1.", "abc.def", "9" * 300):
        assert not peers.is_peer(RID, bad, now=1000.0)
