"""The Python client and the `generate`/`status` commands against a real in-process gRPC server.

`FakeGeneration` streams canned responses and can be told to fail: UNAVAILABLE (or another code) for
the first N calls, UNAVAILABLE after the first message, or UNAUTHENTICATED without the right bearer
token. It records every request and its metadata, and how many messages it sent before the call ended,
so cancellation is visible from the server's side.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.client import AsyncKvfleetClient, ClientConfig, KvfleetClient, KvfleetError
from cluster.client_cli import add_client_commands
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

PIECES = ["Hello", ",", " world"]


class FakeGeneration(pb_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list = []
        self.metadata: list[dict[str, str]] = []
        self.fail_first = 0  # the first N calls (any method) fail with fail_code
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.fail_after_first = False  # Generate: UNAVAILABLE after the first message
        self.token: str | None = None  # require `authorization: Bearer <token>`
        self.pieces = PIECES
        self.delay_s = 0.0  # between messages
        self.sent = 0  # messages the last Generate sent
        self.ended = threading.Event()  # the last Generate ended (any way, cancel included)
        self.index_reachable = True

    def _enter(self, request, context) -> None:
        self.requests.append(request)
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if self.token is not None and md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if len(self.requests) <= self.fail_first:
            context.abort(self.fail_code, f"call {len(self.requests)} refused")

    def Generate(self, request, context):
        self._enter(request, context)
        self.sent = 0
        self.ended.clear()
        context.add_callback(self.ended.set)
        for i, piece in enumerate(self.pieces):
            if i == 1 and self.fail_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica died mid-stream")
            msg = pb.GenerateResponse(request_id=request.request_id or "req-1", token_ids=[10 + i], text=piece)
            if i == len(self.pieces) - 1:
                msg.finish_reason = pb.FINISH_REASON_LENGTH
                msg.usage.CopyFrom(
                    pb.Usage(prompt_tokens=5, cached_prompt_tokens=2, completion_tokens=len(self.pieces))
                )
                msg.replica = "replica-a"
            yield msg
            self.sent += 1
            time.sleep(self.delay_s)

    def Tokenize(self, request, context):
        self._enter(request, context)
        text = request.text if request.HasField("text") else "".join(m.content for m in request.chat.messages)
        return pb.TokenizeResponse(token_ids=[ord(c) for c in text], tokens=list(text))

    def ListModels(self, request, context):
        self._enter(request, context)
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(id="demo", max_model_len=2048, page_size=16, vocab_size=2048, has_chat_template=True)]
        )

    def GetStatus(self, request, context):
        self._enter(request, context)
        out = pb.GetStatusResponse(model=request.model or "demo", index_reachable=self.index_reachable)
        if self.index_reachable:
            out.replicas.add(
                replica="replica-a",
                num_waiting=1,
                num_running=3,
                num_free_pages=96,
                num_total_pages=128,
                prefix_cache_queries=200,
                prefix_cache_hits=90,
                num_requests_finished=7,
            )
            out.replicas.add(replica="replica-b", num_free_pages=128, num_total_pages=128)
        return out


def _start(servicer: FakeGeneration, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = (
        server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    )
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake():
    servicer = FakeGeneration()
    server, servicer.target = _start(servicer)
    yield servicer
    server.stop(grace=None)


@pytest.fixture
def client(fake):
    with KvfleetClient(fake.target, timeout_s=5, retry_backoff_s=0.01) as c:
        yield c


# --- the blocking client -------------------------------------------------------------------------


def test_generate_streams_one_chunk_per_response(client):
    chunks = list(client.generate("hi"))
    assert [c.text for c in chunks] == PIECES
    assert [c.token_ids for c in chunks] == [[10], [11], [12]]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[0].usage is None and chunks[0].replica == ""
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.cached_prompt_tokens == 2
    assert chunks[-1].replica == "replica-a" and chunks[-1].request_id == "req-1"


def test_complete_concatenates_the_stream(client):
    out = client.complete("hi", request_id="r-7")
    assert out.text == "Hello, world" and out.token_ids == [10, 11, 12]
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3
    assert out.replica == "replica-a" and out.request_id == "r-7"


def test_unset_sampling_params_stay_unset_on_the_wire(client, fake):
    client.complete("hi")
    sampling = fake.requests[-1].sampling
    for field in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "logprobs"):
        assert not sampling.HasField(field), field
    assert not fake.requests[-1].HasField("add_special_tokens")
    assert list(sampling.stop) == [] and not sampling.ignore_eos


def test_set_sampling_params_arrive_including_zeros(client, fake):
    client.complete(
        "hi", model="demo", max_tokens=8, temperature=0.0, top_k=0, seed=3, stop="\n", stop_token_ids=[2], logprobs=1
    )
    request = fake.requests[-1]
    assert request.model == "demo" and request.text == "hi"
    s = request.sampling
    assert s.HasField("temperature") and s.temperature == 0.0
    assert s.HasField("top_k") and s.top_k == 0
    assert (s.max_tokens, s.seed, s.logprobs) == (8, 3, 1)
    assert list(s.stop) == ["\n"] and list(s.stop_token_ids) == [2]
    assert not s.HasField("top_p")


def test_prompt_kinds_fill_the_right_oneof(client, fake):
    client.complete([1, 2, 3])
    assert fake.requests[-1].WhichOneof("prompt") == "token_ids"
    assert list(fake.requests[-1].token_ids.ids) == [1, 2, 3]
    client.complete([{"role": "user", "content": "hi"}])
    assert fake.requests[-1].WhichOneof("prompt") == "chat"
    assert fake.requests[-1].chat.messages[0].content == "hi"
    with pytest.raises(ValueError, match="role"):
        client.generate([{"content": "no role"}])
    with pytest.raises(TypeError, match="unknown generate option"):
        client.generate("hi", max_token=3)


def test_generate_retries_unavailable_before_the_first_response(client, fake):
    fake.fail_first = 2
    assert client.complete("hi").text == "Hello, world"
    assert len(fake.requests) == 3


def test_generate_gives_up_after_max_retries(fake):
    fake.fail_first = 10
    with KvfleetClient(fake.target, max_retries=2, retry_backoff_s=0.01) as c, pytest.raises(KvfleetError) as err:
        c.complete("hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.requests) == 3


def test_generate_never_retries_after_the_first_response(client, fake):
    fake.fail_after_first = True
    seen = []
    with pytest.raises(KvfleetError) as err:
        for chunk in client.generate("hi"):
            seen.append(chunk.text)
    assert seen == ["Hello"]  # no duplicated output
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "mid-stream" in err.value.details()
    assert len(fake.requests) == 1


def test_other_codes_are_not_retried(client, fake):
    fake.fail_first, fake.fail_code = 1, grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(KvfleetError) as err:
        client.complete("hi")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "call 1 refused"
    assert isinstance(err.value, grpc.RpcError) and str(err.value) == "INVALID_ARGUMENT: call 1 refused"
    assert len(fake.requests) == 1


def test_unary_calls_retry_unavailable(client, fake):
    fake.fail_first = 2
    out = client.tokenize("ab")
    assert out.token_ids == [97, 98] and out.tokens == ["a", "b"]
    assert len(fake.requests) == 3


def test_unary_results_mirror_the_proto(client):
    (model,) = client.list_models()
    assert (model.id, model.page_size, model.has_chat_template) == ("demo", 16, True)
    assert client.tokenize([{"role": "user", "content": "x"}]).token_ids == [120]
    status = client.status()
    assert status.index_reachable and [r.replica for r in status.replicas] == ["replica-a", "replica-b"]
    a = status.replicas[0]
    assert a.page_usage == pytest.approx(0.25) and a.prefix_cache_hit_rate == pytest.approx(0.45)
    assert status.replicas[1].prefix_cache_hit_rate is None


def test_bearer_token_and_application_arrive_as_metadata(fake):
    fake.token = "s3cret"
    with KvfleetClient(fake.target, bearer_token="s3cret", application="kvfleet") as c:
        assert c.complete("hi").text == "Hello, world"
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"
    assert fake.metadata[-1]["application"] == "kvfleet"
    with KvfleetClient(fake.target) as c, pytest.raises(KvfleetError) as err:
        c.list_models()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "application" not in fake.metadata[-1]
    assert "s3cret" not in repr(ClientConfig(bearer_token="s3cret"))


def test_breaking_out_of_the_stream_cancels_the_call(client, fake):
    fake.pieces, fake.delay_s = ["x"] * 200, 0.01  # 2 s if nobody cancels
    for _ in client.generate("hi"):
        break
    assert fake.ended.wait(1.0)
    assert fake.sent < 200


def test_deadline_surfaces_as_deadline_exceeded(fake):
    fake.pieces, fake.delay_s = ["x"] * 200, 0.01
    with KvfleetClient(fake.target, timeout_s=0.2) as c, pytest.raises(KvfleetError) as err:
        list(c.generate("hi"))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture
def tls_files(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ca.pem").write_bytes(cert_pem)
    return key_pem, cert_pem, tmp_path / "ca.pem"


def test_tls_with_root_certificates_and_token(tls_files):
    key_pem, cert_pem, ca_path = tls_files
    fake = FakeGeneration()
    fake.token = "t"
    server, target = _start(fake, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        with KvfleetClient(target, root_certificates=ca_path, bearer_token="t") as c:
            assert c.complete("hi").text == "Hello, world"
    finally:
        server.stop(grace=None)


# --- the asyncio client --------------------------------------------------------------------------


async def test_async_generate_and_complete(fake):
    async with AsyncKvfleetClient(fake.target, timeout_s=5) as c:
        chunks = [chunk async for chunk in c.generate("hi", max_tokens=4)]
        assert [x.text for x in chunks] == PIECES and chunks[-1].finish_reason == "length"
        assert not fake.requests[-1].sampling.HasField("temperature")
        out = await c.complete("hi")
        assert out.text == "Hello, world" and out.usage.prompt_tokens == 5
        assert (await c.status()).replicas[0].num_running == 3
        assert (await c.list_models())[0].id == "demo"


async def test_async_retries_before_the_first_response_only(fake):
    fake.fail_first = 2
    async with AsyncKvfleetClient(fake.target, retry_backoff_s=0.01) as c:
        assert (await c.complete("hi")).text == "Hello, world"
        assert len(fake.requests) == 3
        assert (await c.tokenize("a")).token_ids == [97]
        fake.fail_after_first = True
        seen = []
        with pytest.raises(KvfleetError) as err:
            async for chunk in c.generate("hi"):
                seen.append(chunk.text)
        assert seen == ["Hello"] and err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) == 5


async def test_async_other_codes_are_not_retried(fake):
    fake.fail_first, fake.fail_code = 1, grpc.StatusCode.INVALID_ARGUMENT
    async with AsyncKvfleetClient(fake.target, retry_backoff_s=0.01) as c:
        with pytest.raises(KvfleetError) as err:
            await c.complete("hi")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(fake.requests) == 1


async def test_async_breaking_out_of_the_stream_cancels_the_call(fake):
    fake.pieces, fake.delay_s = ["x"] * 200, 0.01
    async with AsyncKvfleetClient(fake.target) as c:
        async for _ in c.generate("hi"):
            break  # the dropped generator is closed by asyncio's finalizer, whose `finally` cancels
        assert await asyncio.to_thread(fake.ended.wait, 1.0)
    assert fake.sent < 200


async def test_async_bearer_token_arrives(fake):
    fake.token = "s3cret"
    async with AsyncKvfleetClient(fake.target, bearer_token="s3cret") as c:
        assert (await c.complete("hi")).text == "Hello, world"
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"


# --- the CLI -------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="kvfleet")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_generate_prints_text_then_usage(fake, capsys):
    run_cli(["generate", "--target", fake.target, "--max-tokens", "3", "--temperature", "0.5", "hi"])
    out, err = capsys.readouterr()
    assert out == "Hello, world\n"
    assert "[length] prompt 5 tokens (2 cached), completion 3 tokens, replica replica-a, ttft " in err
    assert " ms, total " in err
    s = fake.requests[-1].sampling
    assert (s.max_tokens, s.temperature) == (3, 0.5) and not s.HasField("seed")


def test_cli_generate_streams_and_sends_chat(fake, capsys, monkeypatch):
    monkeypatch.setenv("KVFLEET_TARGET", fake.target)
    monkeypatch.setenv("KVFLEET_TOKEN", "envtoken")
    run_cli(["generate", "--stream", "--chat", "hi"])
    out, _ = capsys.readouterr()
    assert out == "Hello, world\n"
    assert fake.requests[-1].chat.messages[0].role == "user"
    assert fake.metadata[-1]["authorization"] == "Bearer envtoken"


def test_cli_generate_error_prints_code_and_exits_1(fake, capsys):
    fake.fail_first, fake.fail_code = 1, grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(SystemExit) as exit_:
        run_cli(["generate", "--target", fake.target, "hi"])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert err == "error: INVALID_ARGUMENT: call 1 refused\n" and out == ""


def test_cli_status_prints_one_line_per_replica(fake, capsys):
    run_cli(["status", "--target", fake.target])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model demo: 2 replicas, page index reachable"
    assert lines[1].split()[:2] == ["REPLICA", "WAITING"]
    assert lines[2].split() == ["replica-a", "1", "3", "96/128", "25.0%", "45.0%", "(90/200)", "7"]
    assert lines[3].split() == ["replica-b", "0", "0", "128/128", "0.0%", "-", "0"]


def test_cli_status_json_and_unreachable_index(fake, capsys):
    run_cli(["status", "--target", fake.target, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["index_reachable"] and data["replicas"][0]["prefix_cache_hit_rate"] == pytest.approx(0.45)
    assert data["replicas"][0]["page_usage"] == pytest.approx(0.25)
    fake.index_reachable = False
    run_cli(["status", "--target", fake.target])
    assert "page index UNREACHABLE" in capsys.readouterr().out


def test_cli_status_unreachable_server_exits_1(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(["status", "--target", "127.0.0.1:1", "--timeout", "0.5"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
