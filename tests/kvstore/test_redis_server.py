"""The private Redis-protocol server of tests and local mode: under supervision it comes back on
its port after a crash, with its dead process reaped, and only a deliberate stop keeps it down."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from kvstore.index import ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind
from kvstore.redis_server import LocalRedisServer
from tests.conftest import scaled


def wait_until(cond, timeout_s: float) -> float:
    """Seconds until cond() held; fails the test past timeout_s (scaled for a loaded machine)."""
    start = time.monotonic()
    deadline = start + scaled(timeout_s)
    while not cond():
        assert time.monotonic() < deadline, f"not within {scaled(timeout_s):.1f}s"
        time.sleep(0.01)
    return time.monotonic() - start


def answers(server: LocalRedisServer) -> bool:
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return client.ping()
    except redis.RedisError:
        return False
    finally:
        client.close()


def is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def supervised():
    with LocalRedisServer() as server:
        yield server.supervise(check_interval_s=0.05)


@pytest.mark.parametrize("how", ["kill", "sigterm-from-outside", "sigkill-from-outside"])
def test_a_supervised_server_that_dies_is_back_on_the_same_port_and_the_dead_one_is_reaped(supervised, make_index, how):
    port, pid = supervised.port, supervised.pid
    index = make_index(server=supervised, retry_after_s=0.05)
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])
    if how == "kill":
        supervised.kill()
    else:
        os.kill(pid, signal.SIGTERM if how == "sigterm-from-outside" else signal.SIGKILL)
    took = wait_until(lambda: supervised.restarts == 1 and answers(supervised), timeout_s=5)
    print(f"back after {took:.2f}s")
    assert supervised.port == port and supervised.pid != pid
    assert is_zombie_or_gone(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: not our child any more
    # The index works again on the same URL (empty: Redis keeps nothing on disk).
    wait_until(lambda: index.lookup([1, 2], ["a"]) == {"a": 0}, timeout_s=2)
    index.heartbeat("a", ReplicaLoad())
    index.publish([KVEvent(KVEventKind.STORED, (1, 2), "a")])
    assert index.lookup([1, 2], ["a"]) == {"a": 2}


def test_a_stopped_server_stays_down_until_started_again(supervised):
    supervised.stop()
    time.sleep(0.3)
    assert not supervised.is_running() and supervised.restarts == 0
    supervised.start()
    pid = supervised.pid
    supervised.kill()
    wait_until(lambda: supervised.restarts == 1 and answers(supervised), timeout_s=5)
    assert supervised.pid != pid


def test_an_unsupervised_server_stays_dead_after_a_crash():
    with LocalRedisServer() as server:
        server.kill()
        time.sleep(0.3)
        assert not server.is_running() and not answers(server)
