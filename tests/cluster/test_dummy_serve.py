"""A model with dummy weights and no tokenizer, served end to end: a second application ("kvfleet-dummy")
on the session cluster's Ray, Serve and Redis, serving a config-only directory of the tiny Llama's
shape (cluster/bench/shapes.py's `write_shape_dir`, as `kvfleet bench serve --shape ... --load-format
dummy` builds) with `load_format="dummy"` and `skip_tokenizer_init`. Token-id prompts are served and
answered in token ids (empty text); what needs a tokenizer is refused INVALID_ARGUMENT (gRPC) or 400
(OpenAI HTTP), naming the field."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from cluster.bench.shapes import write_shape_dir
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

APP = "kvfleet-dummy"
METADATA = (("application", APP),)
PAGE = 4


@pytest.fixture(scope="module")
def dummy_app(serve_cluster, model_dirs, tmp_path_factory):
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ClusterConfig, IngressConfig, TargetConfig
    from router.policy import RoutingConfig
    from workers.config import EngineConfig

    shape = json.loads((model_dirs["llama"] / "config.json").read_text())
    model = write_shape_dir(tmp_path_factory.mktemp("shape") / "tiny-llama-shape", shape)
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]  # no weights, no tokenizer
    engine = EngineConfig(
        model=str(model), device="cpu", page_size=PAGE, num_pages=128, max_model_len=256,
        load_format="dummy", skip_tokenizer_init=True,
    )  # fmt: skip
    config = ClusterConfig(
        engine=engine,
        target=TargetConfig(replicas=1, num_cpus=0, metrics_period_s=0.2),
        ingress=IngressConfig(replicas=1, num_cpus=0),
        index=serve_cluster.config.index.model_copy(update={"namespace": "dummy"}),
        # one replica needs no prefix-aware router (and adds no series to the routing-decision metric)
        routing=RoutingConfig(policy="power_of_two"),
        app_name=APP,
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield config
    serve.delete(APP)


@pytest.fixture(scope="module")
def stub(dummy_app, serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def client(dummy_app, serve_cluster):
    url = serve_cluster.http_url.replace("/v1", f"/{APP}/v1")
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def generate(stub, **kwargs) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**kwargs), timeout=120, metadata=METADATA))


def refusal(stub, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(request, timeout=60, metadata=METADATA)
        list(result) if method == "Generate" else result
    return err.value


def test_token_id_prompts_are_served_in_token_ids_with_empty_text(stub, dummy_app):
    ids = list(range(40, 40 + 4 * PAGE + 1))
    greedy = pb.SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[5])
    first = generate(stub, token_ids=pb.TokenIds(ids=ids), sampling=greedy)
    tokens = [t for r in first for t in r.token_ids]
    assert 1 <= len(tokens) <= 6 and all(0 <= t < 512 for t in tokens)
    assert all(r.text == "" for r in first)
    last = first[-1]
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(tokens)
    # the same prompt again: greedy gives the same ids, and the prompt's full pages come from the cache
    again = generate(stub, token_ids=pb.TokenIds(ids=ids), sampling=greedy)
    assert [t for r in again for t in r.token_ids] == tokens
    assert again[-1].usage.cached_prompt_tokens == 4 * PAGE
    models = stub.ListModels(pb.ListModelsRequest(), timeout=60, metadata=METADATA).models
    assert models[0].id == dummy_app.model_id and not models[0].has_chat_template


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        (dict(text="def fibonacci(n):"), "text"),
        (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])), "chat"),
        (dict(token_ids=pb.TokenIds(ids=[40, 41, 42]), sampling=pb.SamplingParams(stop=["\n"])), "sampling.stop"),
    ],
)
def test_what_needs_a_tokenizer_is_refused_naming_the_field(stub, request_kwargs, field):
    err = refusal(stub, "Generate", pb.GenerateRequest(**request_kwargs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field} needs a tokenizer") and "token_ids" in err.details()


def test_tokenize_is_refused(stub):
    err = refusal(stub, "Tokenize", pb.TokenizeRequest(text="hello"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("text needs a tokenizer")


def test_openai_completions_with_token_ids_and_logprobs(client, dummy_app):
    ids = list(range(60, 80))
    out = client.completions.create(
        model=dummy_app.model_id,
        prompt=ids,
        max_tokens=4,
        logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = out.choices[0]
    assert choice.text == "" and out.usage.prompt_tokens == 20
    token_ids = choice.model_extra["token_ids"]
    assert len(token_ids) == 4
    # without a tokenizer a logprob's token is named by its id (vLLM's `token_id:<id>`)
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in token_ids]
    assert all(k.startswith("token_id:") for top in choice.logprobs.top_logprobs for k in top)


def test_openai_text_prompts_and_chat_answer_400_naming_the_parameter(client, dummy_app):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=dummy_app.model_id, prompt="def f():", max_tokens=2)
    assert err.value.body["param"] == "prompt" and "needs a tokenizer" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=dummy_app.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert err.value.body["param"] == "messages"
