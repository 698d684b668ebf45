"""The OpenAI-compatible HTTP API end to end, through the official `openai` client: real Ray Serve
(its HTTP proxy on loopback), Redis and the session's cluster (`serve_cluster`, a tiny Llama whose
tokenizer has no chat template).

A second application on the same Serve (`edge`, route prefix /edge) serves a copy of the model
with a chat template, a bearer token, one sequence at a time and a queue of one: it answers the
chat tests and the codes that need a token, a full queue or a dead replica, without touching the
session's application. Its replica is killed last.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import openai
import pytest

from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc
from tests.cluster.test_serve import idle_and_aborted

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
GREEDY = {"ignore_eos": True}  # extra_body: a random tiny model may emit EOS at once
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci(n):"}]


@pytest.fixture(scope="module")
def stub(serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def client(serve_cluster):
    # No retries: the client would retry 429 and 5xx by itself and hide the codes under test.
    with openai.OpenAI(base_url=serve_cluster.http_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@dataclass
class Edge:
    url: str
    token: str
    app: str
    model: str
    grpc_target: str

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=token or self.token, max_retries=0, timeout=120)

    def grpc_metadata(self):
        return [("application", self.app), ("authorization", f"Bearer {self.token}")]


@pytest.fixture(scope="module")
def edge(serve_cluster, model_dirs, tmp_path_factory):
    from ray import serve

    from cluster.app import build_app
    from cluster.config import IngressConfig, TargetConfig
    from router.policy import RoutingConfig

    root = tmp_path_factory.mktemp("edge")
    model = root / "llama-chat"
    shutil.copytree(model_dirs["llama"], model)
    tokenizer_config = model / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**data, "chat_template": CHAT_TEMPLATE}))
    (root / "token").write_text("sesame\n")
    base = serve_cluster.config
    config = base.model_copy(
        update={
            "engine": base.engine.model_copy(update={"model": str(model), "max_num_seqs": 1, "max_queue_len": 1}),
            "target": TargetConfig(replicas=1, num_cpus=0.25, health_check_period_s=1.0, metrics_period_s=0.2),
            "ingress": IngressConfig(replicas=1, num_cpus=0.1),
            "grpc": base.grpc.model_copy(update={"auth_token_file": str(root / "token")}),
            "index": base.index.model_copy(update={"namespace": "openai-edge"}),
            "app_name": "kvfleet-openai-edge",
            # One replica needs no prefix-aware router; without one, the routing-decision series that
            # test_serve's metrics test sums (over every application) stay the session app's alone.
            "routing": RoutingConfig(policy="power_of_two"),
        }
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/edge")
    url = serve_cluster.http_url.replace("/v1", "/edge/v1")
    yield Edge(url, "sesame", config.app_name, config.model_id, serve_cluster.grpc_target)
    serve.delete(config.app_name)  # gRPC calls without `application` metadata need one application


def call(method: str, url: str, body: bytes | dict | None = None, headers=None) -> tuple[int, dict]:
    """A raw HTTP call (what the openai client does not let a test send); the JSON answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, parts.path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def grpc_text(stub, metadata=None, **kwargs) -> str:
    return "".join(r.text for r in stub.Generate(pb.GenerateRequest(**kwargs), timeout=60, metadata=metadata))


# ---------------------------------------------------------------------- completions (session cluster)
def test_completion_greedy_text_equals_the_grpc_apis(client, stub):
    want = grpc_text(stub, text=PROMPT, sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True))
    out = client.completions.create(model="llama", prompt=PROMPT, max_tokens=24, temperature=0, extra_body=GREEDY)
    assert out.object == "text_completion" and out.model == "llama"
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24 and out.usage.total_tokens == out.usage.prompt_tokens + 24


def test_streamed_completion_equals_the_non_streamed_one(client):
    kwargs = dict(model="llama", prompt=PROMPT, max_tokens=24, extra_body=GREEDY)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1, "the output arrived in one event, not streamed"
    assert "".join(texts) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompts_and_logprobs(client, stub):
    ids = list(range(300, 320))  # tokens no other test of the session starts a prompt with
    want = grpc_text(stub, token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True))
    out = client.completions.create(model="llama", prompt=ids, max_tokens=8, logprobs=3, extra_body=GREEDY)
    choice = out.choices[0]
    assert choice.text == want and out.usage.prompt_tokens == 20
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 8
    positions = list(zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True))
    assert all(len(top) <= 3 and lp <= 0 for top, lp in positions)
    assert all(lp >= max(top.values()) - 1e-5 for top, lp in positions)  # greedy: the most likely token


def test_a_repeated_prompt_reports_cached_tokens(client):
    ids = list(range(400, 400 + 41))  # 10 full pages of 4 tokens, and one more; a prefix no other test sends
    cached = []
    for _ in range(3):
        out = client.completions.create(model="llama", prompt=ids, max_tokens=2, extra_body=GREEDY)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        time.sleep(0.3)  # the replica's publisher writes its pages to the index
    # A repeat that reaches the holder reuses its 10 full pages; routing may still balance one repeat
    # elsewhere under load (test_serve checks where repeats go), but not both.
    assert cached[0] == 0 and set(cached[1:]) <= {0, 40} and 40 in cached[1:], cached


def test_a_stop_string_ends_the_text_before_it(client):
    kwargs = dict(model="llama", prompt=PROMPT, max_tokens=24, extra_body=GREEDY)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[8:11]
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def test_without_max_tokens_a_completion_runs_to_the_end_of_the_context(client):
    out = client.completions.create(model="llama", prompt=[5] * 500, extra_body=GREEDY)
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=600), "max_tokens"),
        (dict(n=2), "n"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=-1), "frequency_penalty"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(logprobs=21), "logprobs"),
        (dict(echo=True), "echo"),
        (dict(extra_body={"no_such_parameter": 1}), "no_such_parameter"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)),
)
def test_bad_parameters_answer_400_naming_the_parameter(client, kwargs, param):
    request = dict(model="llama", prompt=PROMPT, max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert param.split("_")[0] in err.value.body["message"]


def test_an_unknown_model_answers_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_models_health_and_unknown_paths(client, serve_cluster):
    models = client.models.list().data
    assert [m.id for m in models] == ["llama"]
    base = serve_cluster.http_url.removesuffix("/v1")
    assert call("GET", f"{base}/health") == (200, {"status": "ok", "model": "llama"})
    status, body = call("GET", f"{base}/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, body = call("POST", f"{base}/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]


def test_a_client_that_disconnects_aborts_its_request_and_frees_its_pages(serve_cluster, stub):
    before = idle_and_aborted(stub, 0)
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    url = urlsplit(f"{serve_cluster.http_url}/completions")
    for _ in range(3):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", url.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        while not response.readline().startswith(b"data: "):
            pass
        conn.close()  # mid-stream
    # Serve passes the disconnect on to the ingress (almost always: see the gRPC cancel test)
    assert before + 1 <= idle_and_aborted(stub, before + 1) <= before + 3


def test_bench_serve_drives_a_running_deployment_over_http_and_grpc_alike(serve_cluster, capsys):
    import argparse

    from cluster.bench.serve import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    reports = {}
    for url in (serve_cluster.http_url, f"grpc://{serve_cluster.grpc_target}"):
        workload = "--users 3 --turns 2 --system-prompts 1 --system-len 24 --question-len 4 --answer-len 6"
        args = parser.parse_args(["serve", "--url", url, *workload.split(), "--rate", "50", "--think-time", "0"])
        (reports[url],) = args.func(args)["results"]
    for report in reports.values():
        assert report["errors"] == 0 and report["requests"] == 6, report["first_errors"]
        assert report["output_tokens_per_s"] > 0 and report["ttft_s"]["p50"] > 0
    # the same seeded conversations, the same greedy answers: the same prompts, token for token
    assert len({r["prompt_tokens"] for r in reports.values()}) == 1
    assert serve_cluster.http_url in capsys.readouterr().out


# ---------------------------------------------------------------------- chat, token, queue (edge app)
def test_chat_streamed_and_not_equal_the_grpc_apis_greedy_text(edge):
    with grpc.insecure_channel(edge.grpc_target) as channel:
        chat = pb.Chat(messages=[pb.ChatMessage(**m) for m in MESSAGES])
        want = grpc_text(
            pb_grpc.GenerationStub(channel),
            metadata=edge.grpc_metadata(),
            chat=chat,
            sampling=pb.SamplingParams(max_tokens=16, ignore_eos=True),
        )
    with edge.client() as client:
        kwargs = dict(model=edge.model, messages=MESSAGES, max_completion_tokens=16, extra_body=GREEDY)
        out = client.chat.completions.create(**kwargs)
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == want and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 16
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(edge):
    with edge.client() as client:
        out = client.chat.completions.create(
            model=edge.model, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, extra_body=GREEDY
        )
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and all(len(p.top_logprobs) == 2 and p.logprob <= 0 for p in content)
    assert "".join(p.token for p in content) == out.choices[0].message.content


def test_without_the_bearer_token_answers_401(edge):
    for token in ("wrong",):
        with edge.client(token) as client, pytest.raises(openai.AuthenticationError) as err:
            client.chat.completions.create(model=edge.model, messages=MESSAGES, max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        with edge.client(token) as client, pytest.raises(openai.AuthenticationError):
            client.models.list()
    status, _ = call("POST", f"{edge.url}/chat/completions", {"model": edge.model, "messages": MESSAGES})
    assert status == 401
    assert call("GET", edge.url.removesuffix("/v1") + "/health")[0] == 200  # probes need no token


def _edge_one_running_one_waiting(edge) -> bool:
    """From the replica's heartbeat. Both in one heartbeat: an older one may still show the first
    request waiting for its first step."""
    with grpc.insecure_channel(edge.grpc_target) as channel:
        status = pb_grpc.GenerationStub(channel).GetStatus(pb.GetStatusRequest(), metadata=edge.grpc_metadata())
    return any(r.num_running >= 1 and r.num_waiting >= 1 for r in status.replicas)


def test_a_full_queue_answers_429_with_retry_after(edge):
    long = dict(model=edge.model, messages=MESSAGES, max_tokens=400, stream=True, extra_body=GREEDY)
    with edge.client() as client:
        running = client.chat.completions.create(**long)  # headers come with its first token: it runs
        queued = threading.Thread(target=lambda: list(client.chat.completions.create(**long)), daemon=True)
        queued.start()
        deadline = time.monotonic() + 30
        while not _edge_one_running_one_waiting(edge):  # the second one waits behind the first
            assert time.monotonic() < deadline, "the second request never waited"
            time.sleep(0.1)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=edge.model, messages=MESSAGES, max_tokens=2)
        assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
        assert "queue is full" in err.value.body["message"]
        running.close()
        queued.join(timeout=120)
        assert not queued.is_alive()


def test_killing_the_replica_mid_stream_ends_the_stream_with_an_error_event(edge):
    import ray

    with edge.client() as client:
        stream = client.chat.completions.create(
            model=edge.model, messages=MESSAGES, max_tokens=400, stream=True, extra_body=GREEDY
        )
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        [name] = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{edge.app}#TargetWorker#")
        ]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        with pytest.raises(openai.APIError) as err:
            list(stream)
    assert err.value.body["code"] == "replica_unavailable" and err.value.body["type"] == "server_error"
