"""Quota maths: sliding windows, reservations and settlement, the log's verdicts, and the headers."""

from __future__ import annotations

import random

import pytest

from gateway.cluster.quotas import (
    BUCKET_MS,
    PENDING_MS,
    WINDOW_MS,
    Dimension,
    Limits,
    QuotaBook,
    Refusal,
    Reserve,
    Settle,
    Window,
    decode_record,
    duration,
    encode_record,
    estimate_tokens,
    parse_limits,
    ratelimit_headers,
    retry_after_s,
)

T0 = 1_700_000_000_000
TENANT = "k_aaaaaaaaaaaa"


def book(limits: Limits, gateway: str = "g1", lease_ms: int = 600_000) -> QuotaBook:
    return QuotaBook(gateway, lambda tenant: limits, lease_ms)


def admit_and_echo(b: QuotaBook, request_id: str, tokens: int = 1, now: int = T0) -> Reserve:
    """Admit, then read the reservation back from the log (as the gateway's own consumer does): granted."""
    out = b.admit(request_id, TENANT, tokens, now)
    assert isinstance(out, Reserve), out
    assert b.apply(out)
    return out


def test_a_window_counts_the_last_minute_only() -> None:
    w = Window()
    w.add(T0, 3)
    w.add(T0 + 30_000, 2)
    assert w.total(T0 + 30_000) == 5
    assert w.total(T0 + WINDOW_MS - 1) == 5
    assert w.total(T0 + WINDOW_MS + BUCKET_MS) == 2  # the first bucket left the window
    w.prune(T0 + WINDOW_MS + BUCKET_MS)
    assert len(w.buckets) == 1


def test_a_window_says_when_room_frees_and_when_it_is_empty() -> None:
    w = Window()
    w.add(T0, 3)
    w.add(T0 + 10_000, 2)
    now = T0 + 20_000
    assert w.until_free(now, 0) == 0
    assert w.until_free(now, 3) == T0 + WINDOW_MS - now  # the oldest bucket must leave
    assert w.until_free(now, 4) == T0 + 10_000 + WINDOW_MS - now
    assert w.until_empty(now) == T0 + 10_000 + WINDOW_MS - now
    assert Window().until_empty(now) == 0


def test_requests_per_minute_admits_up_to_the_limit_then_refuses_until_the_window_moves() -> None:
    b = book(Limits(rpm=3))
    for i in range(3):
        admit_and_echo(b, f"r{i}", now=T0 + i * 1000)
    refusal = b.admit("r3", TENANT, 1, T0 + 5000)
    assert isinstance(refusal, Refusal)
    assert refusal.dimension is Dimension.REQUESTS
    assert refusal.retry_after_ms == WINDOW_MS - 5000  # when r0 leaves the window
    later = T0 + WINDOW_MS + BUCKET_MS
    assert isinstance(b.admit("r3", TENANT, 1, later), Reserve)


def test_tokens_are_reserved_at_submit_and_settled_with_the_real_usage() -> None:
    b = book(Limits(tpm=150))
    first = admit_and_echo(b, "r0", tokens=100)
    assert isinstance(b.admit("r1", TENANT, 100, T0 + 10), Refusal)  # 100 reserved + 100 > 150
    b.apply(Settle("r0", TENANT, T0 + 500, 20))  # it used 20 in the end
    assert b.standing(TENANT, T0 + 600)[Dimension.TOKENS].remaining == 130
    assert isinstance(b.admit("r1", TENANT, 100, T0 + 600), Reserve)
    assert first.tokens == 100


def test_a_request_larger_than_the_limit_is_refused_outright() -> None:
    refusal = book(Limits(tpm=50)).admit("r0", TENANT, 51, T0)
    assert isinstance(refusal, Refusal) and "limit is 50" in refusal.message


def test_concurrent_requests_hold_a_slot_until_they_settle() -> None:
    b = book(Limits(concurrent=2))
    admit_and_echo(b, "r0")
    admit_and_echo(b, "r1")
    refusal = b.admit("r2", TENANT, 1, T0)
    assert isinstance(refusal, Refusal) and refusal.dimension is Dimension.CONCURRENT
    b.apply(Settle("r0", TENANT, T0 + 100, 5))
    assert isinstance(b.admit("r2", TENANT, 1, T0 + 100), Reserve)


def test_a_settle_read_before_its_reserve_applies_when_the_reserve_arrives() -> None:
    b = book(Limits(tpm=1000, concurrent=1))
    b.apply(Settle("r0", TENANT, T0 + 50, 7))
    b.apply(Reserve("r0", TENANT, "g2", T0, 500))
    s = b.standing(TENANT, T0 + 100)
    assert s[Dimension.TOKENS].remaining == 993
    assert s[Dimension.CONCURRENT].remaining == 1  # it already ended


def test_a_settle_of_unknown_usage_frees_the_slot_and_keeps_the_reservation() -> None:
    b = book(Limits(tpm=1000, concurrent=1))
    admit_and_echo(b, "r0", tokens=300)
    b.apply(Settle("r0", TENANT, T0 + 50, -1))
    s = b.standing(TENANT, T0 + 100)
    assert (s[Dimension.TOKENS].remaining, s[Dimension.CONCURRENT].remaining) == (700, 1)


def test_reading_a_record_twice_changes_nothing() -> None:
    b = book(Limits(rpm=10, concurrent=5))
    r = admit_and_echo(b, "r0")
    b.apply(r)
    assert b.standing(TENANT, T0)[Dimension.REQUESTS].remaining == 9
    assert b.standing(TENANT, T0)[Dimension.CONCURRENT].remaining == 4


def test_a_reservation_whose_end_is_never_seen_frees_its_slot_after_the_lease() -> None:
    b = book(Limits(concurrent=1), lease_ms=5_000)
    admit_and_echo(b, "r0")
    assert isinstance(b.admit("r1", TENANT, 1, T0 + 4_000), Refusal)
    b.expire(T0 + 5_001)
    assert isinstance(b.admit("r1", TENANT, 1, T0 + 5_001), Reserve)


def test_a_pending_reservation_never_read_back_expires_and_a_released_one_goes_at_once() -> None:
    b = book(Limits(concurrent=1))
    assert isinstance(b.admit("r0", TENANT, 1, T0), Reserve)
    assert isinstance(b.admit("r1", TENANT, 1, T0), Refusal)  # r0 is pending
    b.expire(T0 + PENDING_MS + 1)
    assert isinstance(b.admit("r1", TENANT, 1, T0 + PENDING_MS + 1), Reserve)
    b.release("r1")
    assert isinstance(b.admit("r2", TENANT, 1, T0 + PENDING_MS + 2), Reserve)


def test_own_reservations_not_read_back_count_before_writing() -> None:
    b = book(Limits(rpm=3))
    admitted = [isinstance(b.admit(f"r{i}", TENANT, 1, T0), Reserve) for i in range(5)]
    assert admitted == [True, True, True, False, False]  # nothing read back: the three pending fill the limit


def test_the_log_voids_a_reservation_that_does_not_fit_at_its_place_on_every_gateway() -> None:
    """Two gateways each admit the last free request from views that have not seen each other: the log's order
    decides, and both folds agree."""
    g1, g2 = book(Limits(rpm=2, concurrent=5), "g1"), book(Limits(rpm=2, concurrent=5), "g2")
    log = [admit_and_echo(g1, "r0")]
    g2.apply(log[0])
    a, b = g1.admit("a", TENANT, 1, T0 + 1), g2.admit("b", TENANT, 1, T0 + 2)
    assert isinstance(a, Reserve) and isinstance(b, Reserve)
    log += [b, a]  # g2's record landed first
    verdicts = [[g.apply(r) for r in log[1:]] for g in (g1, g2)]
    assert verdicts == [[True, False], [True, False]]
    for g in (g1, g2):
        s = g.standing(TENANT, T0 + 3)
        assert (s[Dimension.REQUESTS].remaining, s[Dimension.CONCURRENT].remaining) == (0, 3)  # "a" holds nothing


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("gateways", [2, 3])
def test_gateways_that_read_each_other_late_never_exceed_the_limit(seed: int, gateways: int) -> None:
    """Gateways admit in a random order and read the shared log with random lag: the log grants exactly the limit
    (all traffic being there), and every gateway's fold agrees on which reservations it granted."""
    rng = random.Random(seed)
    limit = 100
    books = [book(Limits(rpm=limit), gateway=f"g{i}") for i in range(gateways)]
    log: list[Reserve] = []
    read = [0] * gateways
    granted: list[set[str]] = [set() for _ in range(gateways)]

    def catch_up(g: int, upto: int) -> None:
        for record in log[read[g] : upto]:
            if books[g].apply(record):
                granted[g].add(record.request_id)
        read[g] = upto

    for i in range(2000):
        g = rng.randrange(gateways)
        # Each gateway reads some of the log it has not read yet (its consumer lags by a random amount).
        ahead = len(log) - read[g]
        catch_up(g, read[g] + (rng.randint(0, ahead) if ahead else 0))
        out = books[g].admit(f"r{i}", TENANT, 1, T0 + i)
        if isinstance(out, Reserve):
            log.append(out)
    for g in range(gateways):
        catch_up(g, len(log))
    assert len(granted[0]) == limit
    assert all(granted[g] == granted[0] for g in range(gateways))


def test_records_round_trip_and_garbage_is_skipped() -> None:
    for record in (Reserve("r0", TENANT, "g1", T0, 12), Settle("r0", TENANT, T0 + 1, 3)):
        assert decode_record(encode_record(record)) == record
    assert decode_record(b"not json") is None
    assert decode_record(b'{"kind": "other"}') is None


def test_limits_parse_from_settings_text() -> None:
    assert parse_limits("600/100000/8") == Limits(600, 100_000, 8)
    assert parse_limits("60//") == Limits(60, 0, 0)
    for bad in ("60/1", "a/b/c", "-1/0/0"):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_headers_as_openai_writes_them() -> None:
    b = book(Limits(rpm=10, tpm=1000, concurrent=4))
    admit_and_echo(b, "r0", tokens=300)
    headers = ratelimit_headers(b.standing(TENANT, T0 + 2_000))
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "58s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "58s",
        "x-ratelimit-limit-concurrent": "4",
        "x-ratelimit-remaining-concurrent": "3",
    }
    assert ratelimit_headers(book(Limits()).standing(TENANT, T0)) == {}


def test_durations_retry_after_and_the_token_estimate() -> None:
    assert [duration(ms) for ms in (0, 250, 1000, 1500, 60_000, 61_250)] == [
        "0ms",
        "250ms",
        "1s",
        "1.5s",
        "1m0s",
        "1m1.25s",
    ]
    assert [retry_after_s(ms) for ms in (0, 100, 1000, 1001)] == [1, 1, 1, 2]
    assert estimate_tokens(9, 16) == 3 + 16
