"""OpenAI's wire format to kvfleet's and back (router/openai_wire.py): pure, no server."""

from __future__ import annotations

import grpc
import pytest

from protos.kvfleet.v1 import generation_pb2 as pb
from router.openai_wire import Answer, Formatter, OpenAIError, chat_request, completion_request, error_from_status


def test_a_completion_becomes_the_grpc_request_a_client_would_send():
    api = completion_request(
        {
            "model": "m",
            "prompt": "def f(",
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "\n\n",
            "seed": 3,
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "presence_penalty": 0,
            "user": "someone",
            "top_k": 5,
            "ignore_eos": True,
        }
    )
    req, s = api.request, api.request.sampling
    assert (req.model, req.text, req.request_id[:5]) == ("m", "def f(", "cmpl-")
    assert (s.max_tokens, s.top_k, s.seed, s.logprobs, list(s.stop), s.ignore_eos) == (7, 5, 3, 2, ["\n\n"], True)
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert api.stream and api.include_usage and api.logprobs and not api.fill_context


def test_token_ids_a_batch_of_one_and_null_parameters():
    api = completion_request({"model": "m", "prompt": [[1, 2, 3]], "max_tokens": None, "stop": None})
    assert list(api.request.token_ids.ids) == [1, 2, 3]
    assert not api.request.sampling.HasField("max_tokens") and api.fill_context  # null is the default


def test_chat_messages_text_parts_and_logprobs():
    api = chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    chat = api.request.chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert api.request.sampling.max_tokens == 9 and api.request.sampling.logprobs == 4
    assert api.params["max_tokens"] == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "n": 3}, "n"),
        ({"prompt": "x", "presence_penalty": 0.1}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": 2}, "frequency_penalty"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2**31}, "max_tokens"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_refused_completion_parameters_are_named(body, param):
    with pytest.raises(OpenAIError) as err:
        completion_request(body)
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
    ],
)
def test_refused_chat_parameters_are_named(body, param):
    with pytest.raises(OpenAIError) as err:
        chat_request(body)
    assert (err.value.status, err.value.param) == (400, param)


def test_the_shared_paths_refusals_speak_of_the_parameter_the_client_sent():
    chat = chat_request({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0})
    err = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens must be >= 1", "sampling.max_tokens", chat.params
    )
    assert (err.status, err.param, str(err)) == (400, "max_completion_tokens", "max_completion_tokens must be >= 1")
    completion = completion_request({"prompt": "x"})
    err = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[0] has 9 characters, more than ...", "sampling.stop[0]", {}
    )
    assert err.param == "stop" and str(err).startswith("stop[0] has")
    assert error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "empty", "text", completion.params).param == "prompt"
    assert error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "empty", "chat", chat.params).param == "messages"


@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401, False),
        (grpc.StatusCode.NOT_FOUND, 404, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, True),
        (grpc.StatusCode.UNAVAILABLE, 503, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, False),
        (grpc.StatusCode.INTERNAL, 500, False),
    ],
)
def test_grpc_codes_become_http_statuses(code, status, retry_after):
    err = error_from_status(code, "why", None, {})
    assert err.status == status and ("Retry-After" in err.headers) == retry_after
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def _final(text: str, cached: int = 0) -> pb.GenerateResponse:
    r = pb.GenerateResponse(text=text, finish_reason=pb.FINISH_REASON_STOP)
    r.usage.prompt_tokens, r.usage.cached_prompt_tokens, r.usage.completion_tokens = 10, cached, 3
    return r


def test_a_whole_chat_answer_and_its_usage():
    api = chat_request({"messages": [{"role": "user", "content": "x"}], "logprobs": True})
    answer = Answer()
    first = pb.GenerateResponse(text="Hel")
    first.logprobs.add(chosen=pb.TokenLogprob(token_id=1, logprob=-0.5))
    answer.add(first)
    answer.add(_final("lo", cached=8))
    out = Formatter(api, "m", lambda t: f"<{t}>").answer(answer)
    assert out["object"] == "chat.completion" and out["id"] == api.id
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["logprobs"]["content"][0]["token"] == "<1>"
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
    }


def test_streamed_completion_chunks():
    api = completion_request({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    fmt = Formatter(api, "m", str)
    assert fmt.first_chunk() is None  # only chat opens with a role
    assert fmt.chunk(pb.GenerateResponse(text="")) is None  # nothing a client would see
    chunk = fmt.chunk(pb.GenerateResponse(text="ab"))
    assert chunk["choices"][0] == {"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}
    assert chunk["usage"] is None
    assert fmt.chunk(_final(""))["choices"][0]["finish_reason"] == "stop"
    assert fmt.usage_chunk(_final(""))["choices"] == []


def test_return_token_ids_adds_each_chunks_ids():
    api = completion_request({"prompt": "x", "stream": True, "return_token_ids": True})
    fmt = Formatter(api, "m", str)
    chunk = fmt.chunk(pb.GenerateResponse(token_ids=[5, 6]))  # text may lag the ids: still sent
    assert chunk["choices"][0]["token_ids"] == [5, 6] and chunk["choices"][0]["text"] == ""
    answer = Answer()
    answer.add(pb.GenerateResponse(token_ids=[5], text="a"))
    answer.add(pb.GenerateResponse(token_ids=[6], text="b", finish_reason=pb.FINISH_REASON_LENGTH))
    assert fmt.answer(answer)["choices"][0]["token_ids"] == [5, 6]
