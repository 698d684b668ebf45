"""The cluster end to end on loopback: real Ray Serve, Redis and gRPC, 3 TargetWorker replicas of a
tiny Llama on CPU behind 2 ingress replicas (the `serve_cluster` fixture). Tests that break the cluster run last."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc
from workers.request import GenerateRequest, SamplingParams

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def stub(serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield pb_grpc.GenerationStub(channel)


def generate(stub, timeout=60, **kwargs) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**kwargs), timeout=timeout))


def wait_for_idle_replicas(stub, replicas=3, timeout_s=15.0) -> pb.GetStatusResponse:
    """Poll heartbeats until `replicas` replicas report no sequences and every page free."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = stub.GetStatus(pb.GetStatusRequest())
        idle = [
            r
            for r in status.replicas
            if r.num_running == 0 and r.num_waiting == 0 and r.num_free_pages == r.num_total_pages
        ]
        if len(idle) >= replicas and len(idle) == len(status.replicas):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas not idle after {timeout_s} s: {status}")
        time.sleep(0.1)


def test_streamed_greedy_text_equals_the_engines_output(stub, serve_cluster, make_engine, model_dirs):
    responses = generate(stub, text=PROMPT, sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True))
    assert len(responses) > 1, "the output arrived in one message, not streamed"
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    ids = [t for r in responses for t in r.token_ids]
    text = "".join(r.text for r in responses)

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    prompt_ids = tokenizer.encode(PROMPT)
    engine = make_engine("llama", page_size=4, num_pages=256, max_model_len=512)
    want = asyncio.run(engine.complete(GenerateRequest(prompt_ids, SamplingParams(max_tokens=24, ignore_eos=True))))
    assert ids == want.token_ids
    assert text == want.text
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 24)
    assert responses[0].replica and responses[-1].replica == responses[0].replica
    assert len({r.request_id for r in responses}) == 1


def test_usage_counts_cached_prompt_tokens_when_a_replica_holds_the_prefix(stub):
    ids = list(range(10, 10 + 41))  # 10 full pages of 4 tokens, and one more token
    usages, replicas = [], []
    for _ in range(3):
        responses = generate(stub, token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=4))
        usages.append(responses[-1].usage)
        replicas.append(responses[-1].replica)
        time.sleep(0.3)  # the replica's publisher writes its pages to the index
    assert all(u.prompt_tokens == 41 and u.completion_tokens == 4 for u in usages)
    for i, u in enumerate(usages):
        seen_before = replicas[i] in replicas[:i]
        # The engine recomputes at least the prompt's last token, so at most 10 pages are reused.
        assert u.cached_prompt_tokens == (40 if seen_before else 0), (replicas, usages)
    # the prefix-aware router sends the repeats to the replica that holds the prefix
    assert replicas[1] == replicas[2] == replicas[0] and usages[2].cached_prompt_tokens == 40


def test_request_id_is_echoed_and_sampling_with_a_seed_is_reproducible(stub):
    sampling = pb.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = generate(stub, text=PROMPT, sampling=sampling, request_id="req-a")
    b = generate(stub, text=PROMPT, sampling=sampling, request_id="req-b")
    assert {r.request_id for r in a} == {"req-a"}
    assert [t for r in a for t in r.token_ids] == [t for r in b for t in r.token_ids]


def test_32_concurrent_streams_all_complete(serve_cluster):
    async def one(stub, i):
        n = 0
        last = None
        async for r in stub.Generate(
            pb.GenerateRequest(text=f"{PROMPT}# {i}", sampling=pb.SamplingParams(max_tokens=16, ignore_eos=True)),
            timeout=120,
        ):
            n += len(r.token_ids)
            last = r
        return n, last

    async def main():
        async with grpc.aio.insecure_channel(serve_cluster.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for n, last in results:
        assert n == 16 and last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 16
    # They share PROMPT's pages: the holder takes streams until it runs ahead, then they spill.
    assert len({last.replica for _, last in results}) > 1, "one replica served every stream"


@pytest.mark.parametrize(
    ("request_kwargs", "code", "field"),
    [
        (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (dict(token_ids=pb.TokenIds(ids=[])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (dict(token_ids=pb.TokenIds(ids=[5] * 513)), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
        (dict(text="x", sampling=pb.SamplingParams(temperature=-0.5)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(text="x", sampling=pb.SamplingParams(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(text="x", sampling=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(text="x", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (dict(chat=pb.Chat()), grpc.StatusCode.INVALID_ARGUMENT, "chat"),
    ],
    ids=["empty-text", "empty-ids", "too-long", "temperature", "top_p", "max_tokens", "model", "empty-chat"],
)
def test_bad_requests_get_the_right_code_and_name_the_field(stub, request_kwargs, code, field):
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, **request_kwargs)
    assert err.value.code() == code
    assert field in err.value.details()
    # ... and the cluster keeps serving.
    assert generate(stub, text="x", sampling=pb.SamplingParams(max_tokens=2))[-1].usage.completion_tokens == 2


def test_tokenize_list_models_and_health(stub, serve_cluster, model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    out = stub.Tokenize(pb.TokenizeRequest(text=PROMPT))
    assert list(out.token_ids) == tokenizer.encode(PROMPT)
    assert "".join(out.tokens) == "".join(tokenizer.convert_ids_to_tokens(tokenizer.encode(PROMPT)))
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (model.id, model.max_model_len, model.page_size) == ("llama", 512, 4)
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_status_lists_every_replica_with_its_pages(stub):
    status = wait_for_idle_replicas(stub)
    assert status.index_reachable and status.model == "llama"
    assert len(status.replicas) == 3
    assert all(r.num_total_pages == 256 for r in status.replicas)
    assert sum(r.num_requests_finished for r in status.replicas) > 0


def idle_and_aborted(stub, at_least: int, timeout_s: float = 20.0) -> int:
    """Wait until every replica is idle with every page free and at least `at_least` requests
    were aborted in all (fresh heartbeats, not ones from before); return the aborted count."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = wait_for_idle_replicas(stub, timeout_s=timeout_s)
        aborted = sum(r.num_requests_aborted for r in status.replicas)
        if aborted >= at_least:
            return aborted
        assert time.monotonic() < deadline, f"fewer than {at_least} aborted: {status}"
        time.sleep(0.1)


def test_cancelled_streams_are_aborted_and_free_their_pages(stub):
    before = idle_and_aborted(stub, 0)
    calls = [
        stub.Generate(
            pb.GenerateRequest(text=f"{PROMPT}# {i}", sampling=pb.SamplingParams(max_tokens=480, ignore_eos=True)),
            timeout=60,
        )
        for i in range(5)
    ]
    for call in calls:
        assert next(call).replica
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    # Every page comes back. Ray Serve's gRPC proxy passes a client's cancel on to the replica
    # almost always (in stress runs it missed about 1 in 8, and the request then ran to its end):
    # at least one of the five must have been aborted mid-stream.
    assert before + 1 <= idle_and_aborted(stub, before + 1) <= before + 5


def test_a_deadline_that_passes_aborts_the_request_and_frees_its_pages(serve_cluster, stub):
    """kvfleet's client sends its deadline in-band too, so the ingress aborts the request itself."""
    from cluster.client import KvfleetClient, KvfleetError

    before = idle_and_aborted(stub, 0)
    with KvfleetClient(serve_cluster.grpc_target, timeout_s=0.5) as client, pytest.raises(KvfleetError) as err:
        # ~480 steps take about a second on CPU: the deadline passes mid-stream.
        client.complete(PROMPT, max_tokens=480, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert idle_and_aborted(stub, before + 1) == before + 1


def test_metrics_reach_rays_prometheus_export(stub, serve_cluster):
    """The series the dashboard's metrics view charts, scraped where Ray exports them: this test's own
    requests must move the counters (earlier tests' counts are taken as the baseline)."""
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def total(text: str, prefix: str, label: str = "") -> float:
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(prefix) and label in x)

    counters = {  # (series, label) -> what this test adds at least
        ("ray_kvfleet_requests_total{", 'outcome="ok"'): 2,
        ("ray_kvfleet_requests_total{", 'outcome="invalid_argument"'): 1,
        ("ray_kvfleet_completion_tokens_total{", ""): 8,
        ("ray_kvfleet_prompt_tokens_total{", ""): 2 * 24,
        ("ray_kvfleet_cached_prompt_tokens_total{", ""): 4,
        ("ray_kvfleet_routing_decisions_total{", ""): 3,
    }
    before_text = scrape()
    before = {key: total(before_text, *key) for key in counters}
    with pytest.raises(grpc.RpcError):  # an outcome other than ok
        generate(stub, text="x", sampling=pb.SamplingParams(temperature=-1.0))
    long_prompt = PROMPT * 6  # a few full pages: the second request finds them cached
    for _ in range(3):  # three routing decisions (the refused request never reaches the router)
        generate(stub, text=long_prompt, sampling=pb.SamplingParams(max_tokens=4))
        time.sleep(0.3)  # the replica's publisher writes its pages to the index
    wanted = [
        "ray_kvfleet_time_to_first_token_seconds_bucket{",
        "ray_kvfleet_time_per_output_token_seconds_bucket{",
        "ray_kvfleet_e2e_latency_seconds_bucket{",
        "ray_kvfleet_queue_length{",
        "ray_kvfleet_running_sequences{",
        "ray_kvfleet_kv_page_usage_ratio{",
        "ray_kvfleet_prefix_cache_hit_tokens_total{",
    ]
    deadline = time.monotonic() + 30
    while True:
        text = scrape()
        short = {key: n for key, n in counters.items() if total(text, *key) - before[key] < n}
        missing = [w for w in wanted if w not in text]
        if not short and not missing:
            break
        assert time.monotonic() < deadline, f"never exported: {missing}; counters that did not move enough: {short}"
        time.sleep(1)


# ---------------------------------------------------------------------- these break the cluster: last
def test_requests_succeed_while_redis_is_down(stub, serve_cluster):
    redis = serve_cluster.redis_server
    redis.stop()
    try:
        for _ in range(4):
            last = generate(stub, text=PROMPT, sampling=pb.SamplingParams(max_tokens=4))[-1]
            assert last.usage.completion_tokens == 4
        assert not stub.GetStatus(pb.GetStatusRequest()).index_reachable
    finally:
        redis.start()
    wait_for_idle_replicas(stub)  # the publishers found Redis again by themselves


def test_killing_a_replica_mid_stream_ends_that_stream_unavailable(stub, serve_cluster):
    import ray

    call = stub.Generate(
        pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=480, ignore_eos=True)), timeout=60
    )
    victim = next(call).replica
    ray.kill(ray.get_actor(f"SERVE_REPLICA::kvfleet#TargetWorker#{victim}", namespace="serve"), no_restart=True)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # New requests succeed on the live replica (Serve starts a replacement meanwhile).
    for _ in range(4):
        last = generate(stub, text=PROMPT, sampling=pb.SamplingParams(max_tokens=4))[-1]
        assert last.usage.completion_tokens == 4 and last.replica != victim
