"""The draft replicas' socket channel (workers/spec/channel.py): server and client in one
process, on loopback: round trips, two calls in flight to one replica, a server that goes away,
a wrong key, and a call abandoned unread."""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Client

import pytest

from tests.conftest import scaled
from workers.spec.channel import ChannelError, ChannelServer, ReplicaChannels


class Echo:
    """A handler that answers ("echo", request), after waiting for `gate` when the request says so."""

    def __init__(self):
        self.gate = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, request):
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if request == "raise":
                raise ValueError("asked to")
            if isinstance(request, tuple) and request[0] == "wait":
                assert self.gate.wait(scaled(30))
            return ("echo", request)
        finally:
            with self._lock:
                self.running -= 1


def connected(server: ChannelServer, replica_id: str = "r1", pool_size: int = 2) -> ReplicaChannels:
    channels = ReplicaChannels(lambda rid: server.address if rid == replica_id else None, pool_size)
    assert channels.call(replica_id, "first") is None  # the first call starts connecting, on a thread
    deadline = time.monotonic() + scaled(10)
    while not channels.ready(replica_id):
        assert time.monotonic() < deadline, "the channel never came up"
        time.sleep(0.01)
    return channels


@pytest.fixture
def echo():
    return Echo()


@pytest.fixture
def server(echo):
    server = ChannelServer(echo)
    yield server
    server.close()


def test_a_call_round_trips_and_says_it_took_the_channel(server):
    channels = connected(server)
    for i in range(20):
        call = channels.call("r1", {"n": i, "payload": list(range(i))})
        assert call.direct is True and call.channel is True
        assert call.result(timeout_s=scaled(10)) == ("echo", {"n": i, "payload": list(range(i))})
    assert channels.ready("r1")


def test_a_replica_without_a_channel_gets_none_and_stays_so(server):
    channels = ReplicaChannels(lambda rid: None)
    assert channels.call("r9", "x") is None
    time.sleep(0.2)
    assert channels.call("r9", "x") is None and not channels.ready("r9")


def test_two_calls_to_one_replica_are_in_flight_at_once(server, echo):
    channels = connected(server)
    slow = channels.call("r1", ("wait", 1))  # a lookahead, still computing
    deadline = time.monotonic() + scaled(10)
    while echo.running < 1:  # the server has it (on a loaded machine its thread may not run at once)
        assert time.monotonic() < deadline, "the first call never reached the handler"
        time.sleep(0.005)
    fast = channels.call("r1", "now")  # the step's own call, on the other connection
    assert slow is not None and fast is not None
    assert channels.call("r1", "third") is None  # both connections busy: the caller takes the actor path
    assert fast.result(timeout_s=scaled(10)) == ("echo", "now")
    echo.gate.set()
    assert slow.result(timeout_s=scaled(10)) == ("echo", ("wait", 1))
    assert echo.most_running == 2  # the server ran them at once (DraftWorker itself serialises with a lock)
    assert channels.call("r1", "again").result(timeout_s=scaled(10)) == ("echo", "again")


def test_a_call_abandoned_unread_leaves_its_reply_to_be_skipped(server):
    channels = connected(server, pool_size=1)
    channels.call("r1", "never read")  # dropped at once, as a lookahead its step did not use
    for i in range(3):
        assert channels.call("r1", i).result(timeout_s=scaled(10)) == ("echo", i)
    cancelled = channels.call("r1", "cancelled")
    cancelled.cancel()
    assert channels.call("r1", "after").result(timeout_s=scaled(10)) == ("echo", "after")


def test_a_handler_error_fails_the_call_but_keeps_the_channel(server):
    channels = connected(server)
    with pytest.raises(ChannelError, match="asked to"):
        channels.call("r1", "raise").result(timeout_s=scaled(10))
    assert channels.ready("r1")
    assert channels.call("r1", "ok").result(timeout_s=scaled(10)) == ("echo", "ok")


def test_a_server_that_goes_away_fails_the_call_and_drops_the_channel(server, echo):
    channels = connected(server)
    pending = channels.call("r1", ("wait", 2))
    server.close()
    with pytest.raises(ChannelError):
        pending.result(timeout_s=scaled(10))
    assert not channels.ready("r1")
    assert channels.call("r1", "x") is None  # later pinned calls take the actor path
    echo.gate.set()


def test_a_late_reply_times_out_and_drops_the_channel(server, echo):
    channels = connected(server)
    pending = channels.call("r1", ("wait", 3))
    with pytest.raises(ChannelError, match="TimeoutError"):
        pending.result(timeout_s=0.05)
    pending.cancel()  # what the client does after a failed result: nothing left to do
    assert channels.call("r1", "x") is None and not channels.ready("r1")
    echo.gate.set()


def test_a_wrong_key_is_refused(server):
    host, port, key = server.address
    with pytest.raises(Exception):  # noqa: B017 (AuthenticationError, or the socket closed on us)
        Client((host, port), family="AF_INET", authkey=b"not the key")
    deadline = time.monotonic() + scaled(10)
    while server.num_refused < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the key works, and the server still serves
    with Client((host, port), family="AF_INET", authkey=key) as conn:
        conn.send("hi")
        assert conn.recv() == ("ok", ("echo", "hi"))


def test_an_unreachable_address_means_no_channel():
    closed = ChannelServer(lambda r: r)
    address = closed.address
    closed.close()
    channels = ReplicaChannels(lambda rid: address)
    assert channels.call("r1", "x") is None
    time.sleep(0.3)
    assert channels.call("r1", "x") is None and not channels.ready("r1")
