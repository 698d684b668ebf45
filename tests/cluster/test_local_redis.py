"""The session cluster's private Redis (`serve_cluster` starts it as `kvfleet serve` does), read as
untrusted and supervised: keys outside the index's schema written into it change neither GetStatus
nor routing; killed from outside, it comes back on the same port, the index answers GetStatus again
with every replica, the pages stored before the crash are written back, and requests route
prefix-aware again. Leaves the cluster serving."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import redis

from kvstore.hashing import page_hashes
from kvstore.index import IndexKeys, PageIndex
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import scaled

PAGE = 4  # the fixture's page size


@pytest.fixture(scope="module")
def stub(serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield pb_grpc.GenerationStub(channel)


def send(stub, ids: list[int]) -> str:
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=2)))
    return list(call)[-1].replica


def wait_until(cond, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    deadline = start + scaled(timeout_s)
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {scaled(timeout_s):.0f}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_malformed_index_entries_leave_get_status_and_routing_working(stub, serve_cluster):
    config = serve_cluster.config
    keys = IndexKeys(config.index.namespace, config.engine.served_model_id)
    admin = redis.Redis.from_url(serve_cluster.redis.url)

    def replicas() -> list[str]:
        status = stub.GetStatus(pb.GetStatusRequest())
        assert status.index_reachable
        return sorted(r.replica for r in status.replicas)

    wait_until(lambda: len(replicas()) == config.target.replicas, 10, "every replica heartbeats")
    real = replicas()
    forged = [keys.live("forged-numbers"), keys.live("forged-text"), keys.live("a-string")]
    admin.hset(forged[0], mapping={"num_waiting": 1, "num_running": 2, "num_free_pages": 3, "num_total_pages": 4})
    admin.hset(forged[1], mapping={"num_waiting": "lots"})
    admin.set(forged[2], "x")
    admin.set(keys.pages(real[0]), "not a sorted set")  # until that replica's next publish replaces it
    try:
        assert replicas() == real
        for i in range(4):  # routing reads the index for every prompt: it still answers
            prompt = [(i * 53 + j * 11) % 400 + 3 for j in range(3 * PAGE)]
            assert send(stub, prompt)
    finally:
        admin.delete(*forged)
        if admin.type(keys.pages(real[0])) == b"string":  # not published over meanwhile
            admin.delete(keys.pages(real[0]))
        admin.close()


def test_a_killed_private_redis_is_restarted_on_its_port_and_routing_recovers(stub, serve_cluster):
    server = serve_cluster.redis
    assert server is not None, "the session cluster runs local mode's private Redis"
    port, pid = server.port, server.pid
    config = serve_cluster.config
    index = PageIndex(config.index, config.engine.served_model_id)
    prefix = [(i * 37) % 400 + 3 for i in range(8 * PAGE)]
    hashes = page_hashes(prefix, PAGE, config.engine.served_model_id)
    try:
        holder = send(stub, [*prefix, 7])
        wait_until(lambda: index.lookup(hashes, [holder])[holder] == 8, 10, "the prefix reached the index")

        os.kill(pid, signal.SIGKILL)  # a crash from outside (the OOM killer, a stray kill -9)
        took = wait_until(lambda: server.restarts == 1 and server.is_running(), 5, "Redis restarted")
        print(f"private Redis back after {took:.2f}s")
        assert server.port == port and server.pid != pid
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # the dead server was reaped: no zombie
        assert redis.Redis.from_url(server.url).ping()

        # Heartbeats come back: GetStatus reaches the index and lists every replica.
        def status_complete() -> bool:
            status = stub.GetStatus(pb.GetStatusRequest())
            return status.index_reachable and len(status.replicas) == config.target.replicas

        wait_until(status_complete, 10, "GetStatus lists every replica again")
        # The holder wrote back the pages it held before the crash, and routing finds them.
        wait_until(lambda: index.lookup(hashes, [holder]).get(holder) == 8, 10, "the pages were republished")
        assert send(stub, [*prefix, 9]) == holder
    finally:
        index.close()
