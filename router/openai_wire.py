"""The OpenAI wire format, to kvfleet's and back: pure conversions, no I/O, no Ray.

The HTTP API (router/openai_api.py) serves OpenAI's `/v1/completions` and `/v1/chat/completions`
by translating each JSON body into the `kvfleet.v1.GenerateRequest` the gRPC API takes and running
it through the very same `GenerationIngress.Generate` (validation, limits, tokenization, page
hashes, the handle to the TargetWorkers), then translating the `GenerateResponse`s back. So only
this file knows OpenAI's names; every check of a value's range stays in the shared path, and its
error is renamed here to the parameter the client sent (`sampling.stop[0]` -> `stop`).

What the engine cannot do is refused with a sentence, never ignored: `n` > 1, several prompts,
`presence_penalty`/`frequency_penalty` other than 0 (the sampler has `repetition_penalty`, sent as
a kvfleet extension), `logit_bias`, `echo`, `suffix`, `best_of` > 1, tools, JSON modes, and any
parameter this server does not know. kvfleet extensions beside OpenAI's: `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `return_token_ids` (vLLM's: each choice also
carries its `token_ids`), `add_special_tokens` (completions) and `add_generation_prompt` (chat).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.kvfleet.v1 import generation_pb2 as pb

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
RETRY_AFTER_S = 1

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


class OpenAIError(Exception):
    """An answer in OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param
        self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


# ---------------------------------------------------------------------- requests


@dataclass
class ApiRequest:
    """One OpenAI request in kvfleet's terms: the gRPC request, and what shapes the answer."""

    kind: str  # "chat" or "completion"
    request: pb.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    # Without max_tokens, OpenAI's API (and vLLM's) generate until the context is full, not the
    # gRPC API's default of 16: the ingress fills in the room the prompt leaves.
    fill_context: bool = False
    return_token_ids: bool = False
    params: dict[str, str] = field(default_factory=dict)  # kvfleet's field -> the parameter the client sent

    @property
    def id(self) -> str:
        return self.request.request_id


_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "logit_bias",
    "user",
    # kvfleet (and vLLM) extensions
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "return_token_ids",
}
_CHAT = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "parallel_tool_calls",
    "add_generation_prompt",
}
_COMPLETION = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of", "add_special_tokens"}


def completion_request(body: Any) -> ApiRequest:
    """`POST /v1/completions`: `prompt` is a text or token ids (one prompt per request)."""
    args = _arguments(body, _COMPLETION)
    out = ApiRequest("completion", pb.GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}"))
    out.params = {"text": "prompt", "token_ids": "prompt", "logprobs": "logprobs"}
    prompt = args.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        out.request.text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(not 0 <= t <= INT32_MAX for t in prompt):
            raise invalid("prompt", "prompt holds a token id outside [0, 2^31 - 1]")
        out.request.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise invalid("prompt", f"prompt holds {len(prompt)} prompts: this server takes one prompt per request")
    elif prompt is None:
        raise invalid("prompt", "prompt is required: a text or a list of token ids")
    else:
        raise invalid("prompt", "prompt must be a string or a non-empty list of token ids")
    for name, refused in (("echo", False), ("suffix", None), ("best_of", 1)):
        if args.get(name, refused) not in (refused, None):
            raise invalid(name, f"{name} is not supported by this server (leave it out)")
    if "add_special_tokens" in args:
        out.request.add_special_tokens = _bool(args, "add_special_tokens")
    logprobs = args.get("logprobs")
    if logprobs is not None:
        out.request.sampling.logprobs = _int(args, "logprobs", 0, INT32_MAX)
        out.logprobs = True
    _common(args, out, max_tokens_param="max_tokens")
    return out


def chat_request(body: Any) -> ApiRequest:
    """`POST /v1/chat/completions`: `messages` rendered with the model's chat template."""
    args = _arguments(body, _CHAT)
    out = ApiRequest("chat", pb.GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}"))
    messages = args.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid("messages", f"messages[{i}] must be an object with a string role")
        out.request.chat.messages.add(role=m["role"], content=_content(m.get("content"), i))
    if "add_generation_prompt" in args:
        out.request.chat.add_generation_prompt = _bool(args, "add_generation_prompt")
    for name in ("tools", "functions"):
        if args.get(name):
            raise invalid(name, f"{name} (tool calling) is not supported by this server")
    for name in ("tool_choice", "function_call"):
        if args.get(name) not in (None, "none"):
            raise invalid(name, f"{name} is not supported by this server")
    fmt = args.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("response_format", "response_format: only {'type': 'text'} is supported by this server")
    if "logprobs" in args and _bool(args, "logprobs"):
        out.logprobs = True
        out.request.sampling.logprobs = _int(args, "top_logprobs", 0, INT32_MAX) if "top_logprobs" in args else 0
    elif "top_logprobs" in args:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    out.params = {"chat": "messages", "logprobs": "top_logprobs"}
    if "max_completion_tokens" in args and "max_tokens" in args:
        raise invalid("max_tokens", "give max_completion_tokens or max_tokens (deprecated), not both")
    name = "max_completion_tokens" if "max_completion_tokens" in args else "max_tokens"
    _common(args, out, max_tokens_param=name)
    return out


def _arguments(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(unknown[0], f"unrecognized request argument supplied: {unknown[0]}")
    return {k: v for k, v in body.items() if v is not None}  # null means "the default", as in OpenAI's API


def _common(args: dict[str, Any], out: ApiRequest, max_tokens_param: str) -> None:
    req, sampling = out.request, out.request.sampling
    out.params.update({"max_tokens": max_tokens_param, "request_id": "request_id"})
    model = args.get("model", "")
    if not isinstance(model, str):
        raise invalid("model", "model must be a string")
    req.model = model
    if max_tokens_param in args:
        sampling.max_tokens = _int(args, max_tokens_param, -(2**31), INT32_MAX)
    else:
        out.fill_context = True
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if name in args:
            setattr(sampling, name, _number(args, name))
    if "top_k" in args:
        sampling.top_k = _int(args, "top_k", -1, INT32_MAX)
    if "seed" in args:
        sampling.seed = _int(args, "seed", 0, UINT64_MAX)
    stop = args.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop", "stop must be a string or a list of strings")
    sampling.stop.extend(stop)
    ids = args.get("stop_token_ids", [])
    if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < 2**32 for t in ids):
        raise invalid("stop_token_ids", "stop_token_ids must be a list of token ids")
    sampling.stop_token_ids.extend(ids)
    if "ignore_eos" in args:
        sampling.ignore_eos = _bool(args, "ignore_eos")
    if "return_token_ids" in args:
        out.return_token_ids = _bool(args, "return_token_ids")
    if "n" in args and _int(args, "n", 1, INT32_MAX) != 1:
        raise invalid("n", "n must be 1: this server returns one choice per request (send n requests)")
    for name in ("presence_penalty", "frequency_penalty"):
        if name in args and _number(args, name) != 0:
            raise invalid(
                name,
                f"{name} is not supported by this server's sampler; use repetition_penalty "
                "(a kvfleet extension: > 1 discourages repeats) or leave it at 0",
            )
    if args.get("logit_bias"):
        raise invalid("logit_bias", "logit_bias is not supported by this server")
    out.stream = _bool(args, "stream") if "stream" in args else False
    options = args.get("stream_options")
    if options is not None:
        if not out.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise invalid("stream_options", "stream_options takes only include_usage")
        out.include_usage = _bool(options, "include_usage", "stream_options.include_usage")


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise invalid("messages", f"messages[{i}].content: only text parts are supported by this server")
        return "".join(p["text"] for p in content)
    raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(args: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = args[name]
    if not _is_int(v):
        raise invalid(name, f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise invalid(name, f"{name} is {v}, outside [{lo}, {hi}]")
    return v


def _number(args: dict[str, Any], name: str) -> float:
    v = args[name]
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise invalid(name, f"{name} must be a number, got {v!r}")
    return float(v)


def _bool(args: dict[str, Any], name: str, param: str | None = None) -> bool:
    v = args[name]
    if not isinstance(v, bool):
        raise invalid(param or name, f"{param or name} must be true or false, got {v!r}")
    return v


# ---------------------------------------------------------------------- errors

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "replica_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
}


def error_from_status(
    code: grpc.StatusCode, message: str, field_name: str | None, params: dict[str, str]
) -> OpenAIError:
    """The OpenAI error for a refusal of the shared path (its gRPC code and the kvfleet field it
    named), in the words of the parameter the client sent."""
    status, type_, err_code = _STATUS.get(code, (500, "server_error", None))
    param = None
    if field_name:
        base = field_name.removeprefix("sampling.").split("[", 1)[0].split(".", 1)[0]
        param = params.get(base, base)
        message = message.replace("sampling.", "").replace("chat.messages", "messages")
        if base in ("max_tokens", "logprobs") and param != base:
            message = message.replace(base, param, 1)
    if code == grpc.StatusCode.NOT_FOUND:
        param = "model"
    return OpenAIError(status, message, type_, param, err_code)


# ---------------------------------------------------------------------- responses


@dataclass
class Answer:
    """The responses of one request, gathered for a non-streamed answer."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.PositionLogprobs] = field(default_factory=list)
    last: pb.GenerateResponse | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        self.text.append(response.text)
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        if response.finish_reason:
            self.last = response


def usage(response: pb.GenerateResponse) -> dict[str, Any]:
    u = response.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


class Formatter:
    """Builds one request's response bodies; `token_text(id)` is a token's text (for logprobs)."""

    def __init__(self, api: ApiRequest, model: str, token_text: Callable[[int], str]):
        self.api = api
        self.model = model
        self.token_text = token_text
        self.created = int(time.time())
        self._offset = 0  # completions' text_offset

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.api.id, "object": obj, "created": self.created, "model": self.model}

    def answer(self, answer: Answer) -> dict[str, Any]:
        last = answer.last or pb.GenerateResponse()
        text = "".join(answer.text)
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(answer.logprobs)}
        if self.api.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            out = self._envelope("chat.completion")
        else:
            choice["text"] = text
            out = self._envelope("text_completion")
        choice["finish_reason"] = _FINISH.get(last.finish_reason)
        if self.api.return_token_ids:
            choice["token_ids"] = answer.token_ids
        out.update(choices=[choice], usage=usage(last), system_fingerprint=None)
        return out

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if self.api.kind != "chat":
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None})

    def chunk(self, response: pb.GenerateResponse) -> dict[str, Any] | None:
        """The chunk for one streamed response (None when it adds nothing a client sees)."""
        finish = _FINISH.get(response.finish_reason)
        ids = self.api.return_token_ids and response.token_ids
        if not response.text and not response.logprobs and finish is None and not ids:
            return None
        choice: dict[str, Any] = {"index": 0}
        if self.api.kind == "chat":
            choice["delta"] = {"content": response.text} if response.text or finish is None else {}
        else:
            choice["text"] = response.text
        choice["logprobs"] = self._logprobs(response.logprobs)
        choice["finish_reason"] = finish
        if self.api.return_token_ids:
            choice["token_ids"] = list(response.token_ids)
        return self._chunk(choice)

    def usage_chunk(self, last: pb.GenerateResponse) -> dict[str, Any]:
        out = self._envelope("chat.completion.chunk" if self.api.kind == "chat" else "text_completion")
        out.update(choices=[], usage=usage(last))
        return out

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = self._envelope("chat.completion.chunk" if self.api.kind == "chat" else "text_completion")
        out["choices"] = [choice]
        if self.api.include_usage:
            out["usage"] = None
        return out

    def _logprobs(self, positions) -> dict[str, Any] | None:
        if not self.api.logprobs:
            return None
        if self.api.kind == "chat":
            return {"content": [self._chat_position(p) for p in positions], "refusal": None}
        tokens, chosen, top, offsets = [], [], [], []
        for p in positions:
            text = self.token_text(p.chosen.token_id)
            tokens.append(text)
            chosen.append(p.chosen.logprob)
            top.append({self.token_text(t.token_id): t.logprob for t in p.top})
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}

    def _chat_position(self, p: pb.PositionLogprobs) -> dict[str, Any]:
        def entry(t: pb.TokenLogprob) -> dict[str, Any]:
            text = self.token_text(t.token_id)
            return {"token": text, "logprob": t.logprob, "bytes": list(text.encode())}

        return {**entry(p.chosen), "top_logprobs": [entry(t) for t in p.top]}
