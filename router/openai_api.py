"""`OpenAIIngress`: the ingress deployment with OpenAI's HTTP API beside the gRPC servicer.

One Ray Serve deployment answers both proxies: Serve's gRPC proxy calls the `kvfleet.v1.Generation`
methods it inherits from `GenerationIngress`, and Serve's HTTP proxy calls its `__call__`:

    POST /v1/completions        POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models             GET  /v1/models/{model}     GET /health   (open, for probes)

An HTTP request is translated into the `kvfleet.v1.GenerateRequest` a gRPC client would send
(router/openai_wire.py) and served by the same `GenerationIngress.Generate`: the bearer token,
validation, limits, tokenization, page hashes, metrics, the handle to the TargetWorkers and their
prefix-aware router are one code path; only the wire format differs. The HTTP headers stand in for
gRPC metadata (`authorization`, `kvfleet-timeout-ms`).

Errors are OpenAI's error object with the status a client expects (400 naming the parameter, 401,
404, 429 with Retry-After, 503, 504). A stream waits for its first response before it answers, so
every refusal before the first token is a status code; one after it (the serving replica died) is
an SSE `data: {"error": ...}` event. A client that disconnects makes Serve cancel this call; closing
`Generate` cancels the worker's stream, whose engine aborts the request and frees its pages.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from protos.kvfleet.v1 import generation_pb2 as pb
from router.ingress import GenerationIngress, RequestError
from router.limits import check_request_bytes
from router.openai_wire import (
    Answer,
    ApiRequest,
    Formatter,
    OpenAIError,
    chat_request,
    completion_request,
    error_from_status,
    invalid,
)
from workers.request import InvalidRequestError

# Set while `Generate` builds the engine request of an OpenAI call without max_tokens.
_fill_context: contextvars.ContextVar[bool] = contextvars.ContextVar("kvfleet_openai_fill_context", default=False)


class _HttpContext:
    """What `GenerationIngress` reads of a gRPC call's context, taken from an HTTP request: the
    headers as invocation metadata. What it sets (code, details, trailers) is kept, unused."""

    def __init__(self, request: Request):
        self._metadata = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code) -> None:
        pass

    def set_details(self, details) -> None:
        pass

    def set_trailing_metadata(self, metadata) -> None:
        pass


def _field(exc: BaseException) -> str | None:
    """The kvfleet field an `InvalidRequestError` behind a refusal named (in-process or from a replica)."""
    cause = exc.__cause__
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the worker's exception
    return cause.field if isinstance(cause, InvalidRequestError) else None


def _route_path(request: Request) -> str:
    """The path inside this application (Serve's route prefix is the ASGI root_path)."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class OpenAIIngress(GenerationIngress):
    """`GenerationIngress` (same constructor) with OpenAI's HTTP API on Serve's HTTP proxy."""

    async def __call__(self, request: Request) -> Response:
        """Serve's HTTP proxy hands every request of this application here (a Starlette request;
        Serve streams a `StreamingResponse` and cancels this call when the client goes away)."""
        path = _route_path(request)
        handler = self._routes.get((request.method, path))
        if handler is not None:
            return await handler(request)
        if request.method == "GET" and path.startswith("/v1/models/"):
            return await self._model(request, path.removeprefix("/v1/models/"))
        if any(path == p for _, p in self._routes):
            error = OpenAIError(405, f"{request.method} {path} is not allowed", "invalid_request_error")
            return _error_response(error)
        message = (
            f"no route {request.method} {path}: this server answers OpenAI's API under /v1 (completions, "
            "chat/completions, models), /health, and the kvfleet.v1.Generation gRPC API on its gRPC port"
        )
        return _error_response(OpenAIError(404, message, "invalid_request_error"))

    @functools.cached_property
    def _routes(self):
        return {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._started = int(time.time())  # the model card's `created`
        # a logprob's token as text; without a tokenizer, vLLM's `token_id:<id>` (a key per token)
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: f"token_id:{t}")
        self._token_text = functools.lru_cache(maxsize=1 << 16)(decode)

    # ------------------------------------------------------------------ the shared path, adapted
    async def _engine_request(self, request):
        """Without max_tokens an OpenAI request runs until the context is full (OpenAI's and
        vLLM's default), not the gRPC default of 16 tokens."""
        engine_request, hashes = await super()._engine_request(request)
        if _fill_context.get():
            room = self.limits.max_model_len - len(engine_request.prompt_token_ids)
            engine_request.sampling.max_tokens = max(1, room)
        return engine_request, hashes

    # ------------------------------------------------------------------ endpoints
    async def _completions(self, request: Request) -> Response:
        return await self._serve(request, completion_request)

    async def _chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat_request)

    async def _models(self, request: Request) -> Response:
        if (error := self._check_token(request)) is not None:
            return error
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: Request, name: str) -> Response:
        if (error := self._check_token(request)) is not None:
            return error
        if name != self.info.model_id:
            message = f"model {name!r} is not served here; this cluster serves {self.info.model_id!r}"
            return _error_response(OpenAIError(404, message, "invalid_request_error", "model", "model_not_found"))
        return JSONResponse(self._model_card())

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.info.model_id})

    # ------------------------------------------------------------------ internals
    async def _serve(self, request: Request, parse) -> Response:
        context = _HttpContext(request)
        try:
            api: ApiRequest = parse(await self._json(request))
        except OpenAIError as e:
            if (error := self._check_token(request)) is not None:
                return error  # a caller without the token learns nothing about the API
            return _error_response(e)
        responses = self._responses(api, context)
        fill = _fill_context.set(api.fill_context)
        try:
            first = await anext(responses)  # validation, admission, the first token
        except OpenAIError as e:
            return _error_response(e)
        finally:
            _fill_context.reset(fill)
        formatter = Formatter(api, self.info.model_id, self._token_text)
        if api.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                self._events(formatter, first, responses), media_type="text/event-stream", headers=headers
            )
        answer = Answer()
        answer.add(first)
        try:
            async for response in responses:
                answer.add(response)
        except OpenAIError as e:
            return _error_response(e)
        return JSONResponse(formatter.answer(answer))

    async def _responses(self, api: ApiRequest, context: _HttpContext) -> AsyncIterator[pb.GenerateResponse]:
        """`Generate`'s responses; its refusals as `OpenAIError`s. Closing this closes `Generate`
        (which cancels the worker's stream) at once, not when the garbage collector gets to it."""
        try:
            async with contextlib.aclosing(self.Generate(api.request, context)) as stream:
                async for response in stream:
                    yield response
        except RequestError as e:
            raise error_from_status(e.code, str(e), _field(e), api.params) from e

    async def _events(self, formatter: Formatter, first: pb.GenerateResponse, responses) -> AsyncIterator[bytes]:
        last = None
        async with contextlib.aclosing(responses):
            opening = formatter.first_chunk()
            if opening is not None:
                yield _sse(opening)
            try:
                response = first
                while True:
                    if response.finish_reason:
                        last = response
                    chunk = formatter.chunk(response)
                    if chunk is not None:
                        yield _sse(chunk)
                    response = await anext(responses)
            except StopAsyncIteration:
                pass
            except OpenAIError as e:  # the stream had started: the error is an event
                yield _sse(e.body())
        if last is not None and formatter.api.include_usage:
            yield _sse(formatter.usage_chunk(last))
        yield b"data: [DONE]\n\n"

    async def _json(self, request: Request):
        """The body, refused past `limits.max_request_bytes` before it is read whole."""
        try:
            declared = request.headers.get("content-length", "")
            if declared.isdigit():
                check_request_bytes(int(declared), self.limits)
            body = bytearray()
            async for part in request.stream():
                body += part
                check_request_bytes(len(body), self.limits)
        except InvalidRequestError as e:
            raise invalid(None, str(e)) from None
        try:
            return json.loads(body)
        except ValueError as e:
            raise invalid(None, f"the request body is not valid JSON: {e}") from None

    def _check_token(self, request: Request) -> Response | None:
        try:
            self._authorize(_HttpContext(request))
        except RequestError as e:
            return _error_response(error_from_status(e.code, str(e), None, {}))
        return None

    def _model_card(self) -> dict:
        return {
            "id": self.info.model_id,
            "object": "model",
            "created": self._started,
            "owned_by": "kvfleet",
            "max_model_len": self.info.max_model_len,
            "vocab_size": self.info.vocab_size,  # kvfleet's: what token-id prompts may hold
        }
