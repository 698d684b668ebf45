"""The API edge under hostile input, through real gRPC on loopback (the session's `serve_cluster`:
Ray Serve's gRPC proxy, 2 ingress replicas, 3 TargetWorker replicas, a private Redis).

Every bad request gets its code and a sentence naming the field (and the limit it broke), fast;
afterwards the cluster still serves and every replica's pages are free. Bounds on time are
generous: the CI machine is a loaded 2-core box."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc
from tests.cluster.test_serve import wait_for_idle_replicas

BIG = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
GOOD = pb.GenerateRequest(text="def f(x):", sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))


@pytest.fixture(scope="module")
def channel(serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target, options=BIG) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


def raw_call(channel, method: str, data: bytes, timeout: float = 30):
    """Send `data` as the request of `method`, bytes as they are: what a broken client sends."""
    if method == "Generate":
        call = channel.unary_stream("/kvfleet.v1.Generation/Generate", request_serializer=None)
        return list(call(data, timeout=timeout))
    if method == "Check":
        return channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None)(data, timeout=timeout)
    return channel.unary_unary(f"/kvfleet.v1.Generation/{method}", request_serializer=None)(data, timeout=timeout)


def refused(call, within_s: float) -> grpc.RpcError:
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < within_s, f"refused after {elapsed:.1f} s"
    return err.value


def assert_still_serves(stub):
    last = list(stub.Generate(GOOD, timeout=60))[-1]
    assert last.usage.completion_tokens == 4
    wait_for_idle_replicas(stub)  # and every page is back in its pool


def test_a_10_mb_prompt_is_refused_before_tokenizing(stub):
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(text="x" * 10_000_000), timeout=60)), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text has 10000000 characters" in err.details() and "limits.max_prompt_chars" in err.details()
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="y" * 5_000_000)] * 2)
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(chat=chat), timeout=60)), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat has" in err.details()
    assert_still_serves(stub)


def test_a_1_mb_stop_string_is_refused_naming_the_limit(stub):
    request = pb.GenerateRequest(text="def f(", sampling=pb.SamplingParams(stop=["y" * 1_000_000]))
    err = refused(lambda: list(stub.Generate(request, timeout=60)), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.stop[0] has 1000000 characters" in err.details()
    assert "limits.max_stop_string_chars (512)" in err.details()
    assert_still_serves(stub)


def test_a_message_over_max_request_bytes_is_refused_by_the_proxy(stub, serve_cluster):
    limit = serve_cluster.config.limits.max_request_bytes
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(text="x" * (limit + 1)), timeout=60)), within_s=10)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own code for an oversized message
    assert str(limit) in err.details()
    assert_still_serves(stub)


@pytest.mark.parametrize(
    ("request_kwargs", "field", "limit"),
    [
        (dict(text="hi", request_id="r" * 100_000), "request_id", "limits.max_request_id_chars (256)"),
        (dict(text="hi", sampling=pb.SamplingParams(stop=["a"] * 17)), "sampling.stop", "limits.max_stop_strings"),
        (dict(text="hi", sampling=pb.SamplingParams(stop_token_ids=[10**9])), "sampling.stop_token_ids", "vocabulary"),
        (dict(text="hi", sampling=pb.SamplingParams(logprobs=21)), "sampling.logprobs", "limits.max_logprobs (20)"),
        (dict(text="hi", sampling=pb.SamplingParams(max_tokens=2**31 - 1)), "sampling.max_tokens", "max_model_len"),
        (dict(token_ids=pb.TokenIds(ids=[5] * 600)), "token_ids", "max_model_len (512)"),
    ],
    ids=["request-id", "stop-count", "stop-token-id", "logprobs", "max-tokens", "prompt-tokens"],
)
def test_requests_over_a_limit_are_invalid_argument_naming_field_and_limit(stub, request_kwargs, field, limit):
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=60)), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and limit in err.details(), err.details()
    assert_still_serves(stub)


HI = pb.GenerateRequest(text="hi").SerializeToString()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"\x12\x03a\xffb", "text is not valid UTF-8"),
        (b"\xff\xff\xff\xff\xff", "not a valid protobuf message"),
        (HI[:-1], "not a valid protobuf message"),
        (HI + b"\x28\x05", "sampling was sent as a varint field"),
        (HI + b"\x2a\x06\x08\x80\x80\x80\x80\x10", "sampling.max_tokens is 4294967296, outside int32"),
    ],
    ids=["bad-utf8", "garbage", "truncated", "sampling-wire-type", "max-tokens-overflow"],
)
def test_undecodable_requests_are_invalid_argument_with_a_sentence(channel, stub, data, field):
    err = refused(lambda: raw_call(channel, "Generate", data), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details(), err.details()
    assert_still_serves(stub)


@pytest.mark.parametrize("method", ["Tokenize", "ListModels", "GetStatus", "Check"])
def test_every_method_decodes_its_own_request(channel, method):
    err = refused(lambda: raw_call(channel, method, b"\xff\xff\xff"), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in err.details()
    reply = health_pb2.HealthCheckResponse.FromString(
        raw_call(channel, "Check", health_pb2.HealthCheckRequest().SerializeToString())
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokenize_applies_the_prompt_limit(stub):
    err = refused(lambda: stub.Tokenize(pb.TokenizeRequest(text="x" * 1_000_000), timeout=60), within_s=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_prompt_chars" in err.details()
    assert stub.Tokenize(pb.TokenizeRequest(text="def f("), timeout=30).token_ids


def _listening(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port` (Linux /proc/net)."""
    out = []
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.append(address)
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from Linux's /proc/net")
def test_the_grpc_and_http_proxies_listen_on_loopback_only(serve_cluster):
    assert serve_cluster.config.grpc.host == "127.0.0.1"
    for port in (serve_cluster.grpc_port, serve_cluster.http_port):
        addresses = _listening(port)
        assert addresses, f"nothing listens on {port}"
        assert set(addresses) <= LOOPBACK, f"port {port} listens on {addresses}"


def test_the_http_proxy_answers_health_and_a_clean_404(serve_cluster):
    base = f"http://127.0.0.1:{serve_cluster.http_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=30) as reply:
        assert reply.status == 200 and json.load(reply)["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/v1/no/such/path", timeout=30)
    assert err.value.code == 404
    body = json.load(err.value)
    assert "gRPC" in body["error"]["message"] and "Traceback" not in json.dumps(body)  # OpenAI's error object


def test_reflection_is_off_when_calls_need_a_token(serve_cluster, tmp_path):
    from cluster.app import grpc_options

    assert grpc_options(serve_cluster.config)["enable_reflection"]
    locked = serve_cluster.config.model_copy(
        update={"grpc": serve_cluster.config.grpc.model_copy(update={"auth_token_file": str(tmp_path / "t")})}
    )
    assert not grpc_options(locked)["enable_reflection"]


def test_200_concurrent_streams_with_bad_requests_mixed_in(serve_cluster, stub):
    """Every good stream completes, every bad one gets INVALID_ARGUMENT, no replica restarts."""
    from ray import serve

    def replicas() -> set[str]:
        return {r.replica for r in stub.GetStatus(pb.GetStatusRequest()).replicas}

    def running() -> dict[str, int]:
        app = serve.status().applications[serve_cluster.config.app_name]
        return {
            name: sum(n for s, n in d.replica_states.items() if str(s).endswith("RUNNING"))
            for name, d in app.deployments.items()
        }

    before, running_before = replicas(), running()
    bad = [
        pb.GenerateRequest(text="x" * 1_000_000),
        pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=["y" * 100_000])),
        pb.GenerateRequest(text="hi", request_id="r" * 10_000),
        b"\x12\x03a\xffb",
        b"\xff\xff\xff",
    ]

    async def one(channel, i):
        if i % 4 == 3:
            request = bad[(i // 4) % len(bad)]
            call = channel.unary_stream("/kvfleet.v1.Generation/Generate", request_serializer=None)
            data = request if isinstance(request, bytes) else request.SerializeToString()
            try:
                async for _ in call(data, timeout=300):
                    pass
            except grpc.aio.AioRpcError as e:
                return "bad", e.code()
            return "bad", grpc.StatusCode.OK
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(text=f"def f{i}(", sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
        last, start, first = None, time.perf_counter(), None
        async for r in stub.Generate(request, timeout=300):
            first = first or time.perf_counter()
            last = r
        return "good", (last.finish_reason, last.usage.completion_tokens, first - start)

    async def main():
        async with grpc.aio.insecure_channel(serve_cluster.grpc_target, options=BIG) as channel:
            return await asyncio.gather(*(one(channel, i) for i in range(200)))

    results = asyncio.run(main())
    good = [r for kind, r in results if kind == "good"]
    codes = [r for kind, r in results if kind == "bad"]
    assert len(good) == 150 and len(codes) == 50
    assert all(reason == pb.FINISH_REASON_LENGTH and n == 4 for reason, n, _ in good)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert replicas() == before and running() == running_before, "a replica restarted"
    wait_for_idle_replicas(stub)
