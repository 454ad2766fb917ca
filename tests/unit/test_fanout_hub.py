"""The hub alone: subscribers by request id and the broadcast to them, with no source, history or ownership."""

from __future__ import annotations

from gateway.fanout.hub import Hub
from gateway.fanout.subscription import Out, Subscription, make_out
from schemas.view import EventName, ViewEvent

RID, OTHER = "01890a5d-ac96-774b-bcce-b302099a8057", "01890a5d-ac96-774b-bcce-b302099a8058"


def _out(offset: int) -> Out:
    return make_out(0, RID, ViewEvent(offset, EventName.TOKEN, {"seq": offset, "text": "x"}, "r", offset, 0))


def test_publish_reaches_the_requests_subscribers_only() -> None:
    hub = Hub()
    mine, also, other = Subscription(RID, -1, 8), Subscription(RID, -1, 8), Subscription(OTHER, -1, 8)
    for sub in (mine, also, other):
        hub.attach(sub)
    out = _out(1)
    hub.publish(RID, out)
    assert mine.queue.get_nowait() is out and also.queue.get_nowait() is out and other.queue.empty()
    assert hub.count(RID) == 2 and hub.watched(OTHER)
    hub.detach(also)
    hub.detach(also)  # twice: no effect
    assert hub.count(RID) == 1
    assert hub.metrics.registry.get_sample_value("tokenrelay_gateway_subscribers") == 2


def test_a_subscriber_that_cannot_take_an_event_is_dropped_as_slow() -> None:
    hub = Hub()
    slow, fast = Subscription(RID, -1, 1), Subscription(RID, -1, 8)
    aborted = []
    slow.on_slow = lambda: aborted.append(True)
    hub.attach(slow)
    hub.attach(fast)
    for offset in (1, 2):
        hub.publish(RID, _out(offset))
    assert slow.closed == "slow" and aborted == [True] and fast.queue.qsize() == 2
    assert hub.subscribers(RID) == [fast]
    assert hub.metrics.registry.get_sample_value("tokenrelay_gateway_slow_subscriber_disconnects_total") == 1


def test_end_closes_all_or_only_other_gateways_upstreams() -> None:
    hub = Hub()
    client, upstream = Subscription(RID, -1, 8), Subscription(RID, -1, 8, forwarded=True)
    hub.attach(client)
    hub.attach(upstream)
    hub.end(RID, "moved", forwarded_only=True)
    assert upstream.closed == "moved" and client.closed is None and hub.subscribers(RID) == [client]
    hub.end(RID, "moved")
    assert client.closed == "moved" and not hub.watched(RID)
