"""Speculative decoding through draft replicas, end to end on loopback: a second Serve application
("kvfleet-spec": 1 ingress, 1 TargetWorker of the shipped demo target, 2 DraftWorkers of its
draft, no CPUs reserved) beside the session cluster, on its Ray, Redis and gRPC proxy, driven
through a real gRPC channel with the application's metadata. The application also asks for a
bearer token (grpc.auth_token_file). The test that kills a draft replica runs last."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cluster.demo.model import shipped_demo_pair
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import scaled
from workers.request import GenerateRequest, SamplingParams

APP = "kvfleet-spec"
TOKEN = "spec-app-token"
METADATA = (("application", APP), ("authorization", f"Bearer {TOKEN}"))
TARGET, DRAFT = (str(p) for p in shipped_demo_pair())
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n"]
PREFIX = (
    "import json\nimport os\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
    "        self.data = {}\n\n    def load(self):\n        with open(self.path) as f:\n"
    "            self.data = json.load(f)\n        return self.data\n\n"
)


def engine_config(**kwargs):
    from workers.config import EngineConfig

    return EngineConfig(model=TARGET, device="cpu", page_size=4, num_pages=512, max_model_len=512, **kwargs)


@pytest.fixture(scope="module")
def spec_app(serve_cluster, tmp_path_factory):
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ClusterConfig, DraftConfig, GrpcConfig, IngressConfig, TargetConfig

    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    config = ClusterConfig(
        grpc=GrpcConfig(auth_token_file=str(token_file)),
        engine=engine_config(),
        target=TargetConfig(replicas=1, num_cpus=0, metrics_period_s=0.2, routing_stats_period_s=0.2),
        ingress=IngressConfig(replicas=1, num_cpus=0),
        # adaptive off: every decode speculates; a generous timeout: the 2 shared cores are slow
        draft=DraftConfig(
            model=DRAFT, replicas=2, num_cpus=0, num_speculative_tokens=4, adaptive=False, timeout_s=scaled(5)
        ),
        index=serve_cluster.config.index,
        app_name=APP,
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield config
    serve.delete(APP)


@pytest.fixture(scope="module")
def stub(spec_app, serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def plain_engine():
    """The target alone, in this process: the greedy reference."""
    from workers.engine import Engine

    engine = Engine(engine_config())
    yield engine
    asyncio.run(engine.shutdown())


def reference(engine, text: str, max_tokens: int) -> list[int]:
    request = GenerateRequest(engine.tokenizer.encode(text), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return asyncio.run(engine.complete(request)).token_ids


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def target_handle(method: str):
    from ray import serve

    return getattr(serve.get_deployment_handle("TargetWorker", app_name=APP), method)


def draft_replica_ids() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#DraftWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted(n[len(prefix) :] for n in names)


def draft_stats() -> dict:
    """Each live draft replica's counters, asked through the handle pinned to that replica.

    A pinned call reaches its replica or says which one answered instead: Serve's router tries the
    pinned replica first but moves on when it misses its queue-length probe deadline (0.1 s at
    first), as a busy replica on a loaded machine does. The draft client counts such a call as moved;
    here, ask again until the pinned replica itself answers."""
    from ray import serve

    handle = serve.get_deployment_handle("DraftWorker", app_name=APP)
    out = {}
    for rid in draft_replica_ids():
        deadline = time.monotonic() + scaled(30)
        while (st := handle.stats.remote(draft_replica=rid).result(timeout_s=scaled(30))).replica_id != rid:
            assert time.monotonic() < deadline, f"no pinned call reached replica {rid}: {st.replica_id} answered"
            time.sleep(0.1)
        out[rid] = st
    return out


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout_s)
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {scaled(timeout_s):.0f}s"
        time.sleep(0.1)


def holders(stats: dict, request_id: str) -> list[str]:
    return [rid for rid, st in stats.items() if request_id in st.calls_per_request]


@pytest.mark.parametrize(
    "sent",
    [None, "Bearer wrong", TOKEN, (f"Bearer {TOKEN}", "Bearer wrong")],
    ids=["none", "wrong", "not-bearer", "two-headers"],
)
def test_calls_without_the_bearer_token_are_unauthenticated_but_health_checks_pass(stub, serve_cluster, sent):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sent = (sent,) if isinstance(sent, str) else sent or ()
    metadata = (("application", APP), *(("authorization", value) for value in sent))
    calls = [
        lambda: list(stub.Generate(pb.GenerateRequest(text="x"), metadata=metadata, timeout=scaled(30))),
        lambda: stub.Tokenize(pb.TokenizeRequest(text="x"), metadata=metadata, timeout=scaled(30)),
        lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=scaled(30)),
        lambda: stub.GetStatus(pb.GetStatusRequest(), metadata=metadata, timeout=scaled(30)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
    assert stub.ListModels(pb.ListModelsRequest(), metadata=METADATA, timeout=scaled(30)).models
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:  # probes carry no token
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), metadata=(("application", APP),), timeout=scaled(30))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_greedy_output_through_draft_replicas_equals_the_plain_engines_and_each_request_sticks(
    stub, serve_cluster, plain_engine
):
    async def one(stub, i):
        request = pb.GenerateRequest(text=PROMPTS[i], sampling=greedy(40), request_id=f"greedy-{i}")
        return [t async for r in stub.Generate(request, metadata=METADATA, timeout=scaled(180)) for t in r.token_ids]

    async def main():
        async with grpc.aio.insecure_channel(serve_cluster.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(len(PROMPTS))))

    outputs = asyncio.run(main())
    assert outputs == [reference(plain_engine, p, 40) for p in PROMPTS]
    engine = target_handle("stats").remote().result(timeout_s=scaled(30))
    assert engine.spec_accepted_tokens > 0 and engine.spec_failures == 0
    client = target_handle("draft_stats").remote().result(timeout_s=scaled(30))
    assert client.num_failed_calls == 0
    # the steps after each request's first call are pinned: one call per replica per step
    assert client.num_pinned_calls > client.num_routed_calls > 0
    # pinned calls go straight to their replica (over its socket channel once that is up, through
    # its actor before); proposals computed ahead answer some steps
    assert client.num_direct_calls >= client.num_pinned_calls and client.num_ahead_hits > 0, client
    assert client.num_channel_calls > 0, client
    stats = draft_stats()
    assert len(stats) == 2
    for i in range(len(PROMPTS)):
        # Every call of the request went to one replica, unless a pinned call moved (see draft_stats),
        # and then the client counted it.
        served = holders(stats, f"greedy-{i}")
        assert 1 <= len(served) <= 1 + client.num_moved, (served, client)
        assert sum(stats[r].calls_per_request[f"greedy-{i}"] for r in served) > 3


def test_requests_sharing_a_long_prefix_meet_on_the_draft_replica_that_caches_it(stub, plain_engine, spec_app):
    first = list(
        stub.Generate(
            pb.GenerateRequest(text=PREFIX + "a = 1\n", sampling=greedy(8), request_id="share-1"),
            metadata=METADATA,
            timeout=scaled(120),
        )
    )
    assert first[-1].usage.completion_tokens == 8
    before = draft_stats()
    (holder,) = holders(before, "share-1")
    # the draft replicas' pages and heartbeats, in the shared index under the draft model's id
    from kvstore.hashing import page_hashes
    from kvstore.index import PageIndex

    index = PageIndex(spec_app.index, spec_app.draft_model_id)
    try:
        hashes = page_hashes(plain_engine.tokenizer.encode(PREFIX), 4, spec_app.draft_model_id)
        # the holder's publisher thread writes its pages to the index
        wait_until(lambda: index.lookup(hashes, [holder])[holder] >= len(hashes) - 1, 5, "the prefix reached the index")
        assert set(index.live_replicas()) == set(before)
        held = index.lookup(hashes, list(before))
        assert held.get(holder, 0) >= len(hashes) - 1 and not any(held.get(r, 0) for r in before if r != holder)
    finally:
        index.close()
    list(
        stub.Generate(
            pb.GenerateRequest(text=PREFIX + "b = 2\n", sampling=greedy(8), request_id="share-2"),
            metadata=METADATA,
            timeout=scaled(120),
        )
    )
    after = draft_stats()
    assert holders(after, "share-2") == [holder]
    cached = after[holder].num_cached_prompt_tokens - before[holder].num_cached_prompt_tokens
    # all its full pages but the one where the prompts part (BPE may merge across the seam)
    prefix_tokens = len(plain_engine.tokenizer.encode(PREFIX))
    assert cached >= (prefix_tokens // 4 - 1) * 4 > 40, (cached, prefix_tokens)


def test_speculation_and_draft_calls_reach_rays_prometheus_export(stub, serve_cluster):
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {  # series -> a label that must be on it
        "ray_kvfleet_spec_accepted_tokens_total{": 'model="kvfleet-pycoder"',
        "ray_kvfleet_spec_acceptance_rate{": 'model="kvfleet-pycoder"',
        "ray_kvfleet_spec_draft_time_seconds{": 'model="kvfleet-pycoder"',
        "ray_kvfleet_draft_calls_total{": 'kind="pinned"',
    }
    deadline = time.monotonic() + scaled(30)
    while True:
        lines = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode().splitlines()
        found = {w: [x for x in lines if x.startswith(w) and label in x] for w, label in wanted.items()}
        if all(found.values()):
            break
        assert time.monotonic() < deadline, f"never exported: {[w for w, v in found.items() if not v]}"
        time.sleep(1)
    assert max(float(x.rsplit(" ", 1)[1]) for x in found["ray_kvfleet_draft_calls_total{"]) > 0
    assert 0 < max(float(x.rsplit(" ", 1)[1]) for x in found["ray_kvfleet_spec_acceptance_rate{"]) <= 1


def test_killing_a_draft_replica_mid_stream_keeps_the_greedy_output(stub, plain_engine):
    import ray

    prompt, n = PROMPTS[0], 300
    want = reference(plain_engine, prompt, n)
    call = stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy(n), request_id="kill-1"), metadata=METADATA, timeout=scaled(300)
    )
    got = list(next(call).token_ids)
    deadline = time.monotonic() + scaled(60)
    while not (victims := holders(draft_stats(), "kill-1")):
        assert time.monotonic() < deadline, "no draft replica served the request"
        time.sleep(0.05)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#DraftWorker#{victims[0]}", namespace="serve"), no_restart=True)
    for r in call:
        got.extend(r.token_ids)
    assert got == want
    client = target_handle("draft_stats").remote().result(timeout_s=scaled(30))
    assert client.num_failed_calls + client.num_moved >= 1, "the kill went unnoticed: was the request finished?"
    engine = target_handle("stats").remote().result(timeout_s=scaled(30))
    assert engine.spec_accepted_tokens > 0
