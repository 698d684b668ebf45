"""`GenerationIngress`: the `kvfleet.v1.Generation` servicer, a Ray Serve deployment behind Serve's
gRPC proxy.

For each `Generate` it decodes the request from the client's bytes (router/services.py,
router/wire.py), checks the model, the limits (router/limits.py) and the sampling parameters,
tokenizes the prompt (text, token ids, or chat messages through the model's chat template), hashes
its full pages (for the request router) and streams the chosen TargetWorker's deltas back as
`GenerateResponse`s. Every refusal happens here, before a worker sees the request, with the gRPC
code of DESIGN.md and a sentence that names the field:

    InvalidRequestError    -> INVALID_ARGUMENT     ModelNotFoundError       -> NOT_FOUND
    ResourceExhaustedError -> RESOURCE_EXHAUSTED   a worker died or is gone -> UNAVAILABLE

A model served with `skip_tokenizer_init` (dummy weights: no tokenizer) takes token-id prompts
only: a text prompt, chat messages, stop strings and `Tokenize` are refused INVALID_ARGUMENT naming
the field, and responses carry token ids with empty text.

The checks run cheapest first: bytes before decoding, characters before tokenizing, tokens
before hashing. A prompt above `_INLINE_TOKENIZE_CHARS` is tokenized in a thread, so a long
prompt never stalls the other streams of this ingress.

The last message names the serving replica and the cached prompt tokens; so does the call's
trailing metadata (`kvfleet-replica`, `kvfleet-cached-prompt-tokens`, and `kvfleet-ingress`, the
ingress replica that routed it).

When the client cancels (or its deadline passes) Serve cancels this generator; the `finally`
cancels the worker's stream, whose engine aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from kvstore.hashing import page_hashes
from kvstore.index import IndexConfig, PageIndex
from protos.kvfleet.v1 import generation_pb2 as pb
from router.api import (
    ModelInfo,
    ModelNotFoundError,
    chat_messages,
    check_model,
    delta_to_proto,
    prompt_chars,
    sampling_from_proto,
)
from router.limits import (
    Limits,
    LimitsConfig,
    check_max_tokens,
    check_prompt_chars,
    check_prompt_tokens,
    check_request_bytes,
    check_request_id,
)
from router.services import GRPC_SERVICER_FUNCTIONS
from router.wire import decode
from workers.config import EngineConfig
from workers.models.config import ModelConfig
from workers.models.tokenizer import load_tokenizer
from workers.request import EngineDeadError, GenerateRequest, InvalidRequestError, ResourceExhaustedError

logger = logging.getLogger(__name__)

__all__ = ["GRPC_SERVICER_FUNCTIONS", "GenerationIngress", "RequestError"]

# Prompts up to this many characters are tokenized, and requests up to this many bytes decoded,
# on the event loop (a thread hop costs more than the work); larger ones in a thread.
_INLINE_TOKENIZE_CHARS = 4096
_INLINE_DECODE_BYTES = 256 * 1024


class RequestError(Exception):
    """A request refused with a gRPC status code (set on the context before raising)."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str):
        super().__init__(message)
        self.code = code
        self.outcome = outcome

    def __reduce__(self):  # Serve pickles it to the proxy, which rebuilds it from these
        return type(self), (self.code, str(self), self.outcome)


def _deadline(grpc_context, arrival: float) -> float | None:
    """The client's deadline on this process's perf_counter clock, from `kvfleet-timeout-ms`
    metadata (kvfleet's clients send their gRPC deadline there too). Serve's gRPC proxy cancels a
    request whose deadline passes, but in our stress runs it missed about 1 in 12 (Ray 2.60), and
    the request then ran to its end; enforcing the deadline here makes it certain."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key == "kvfleet-timeout-ms":
            try:
                return arrival + max(0.0, float(value)) / 1000
            except ValueError:
                return None
    return None


async def _until(stream, deadline: float | None):
    """The stream's items, raising DEADLINE_EXCEEDED once `deadline` passes."""
    if deadline is None:
        async for item in stream:
            yield item
        return
    it = stream.__aiter__()
    while True:
        remaining = deadline - time.perf_counter()
        try:
            if remaining <= 0:
                raise TimeoutError
            item = await asyncio.wait_for(it.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed", "deadline_exceeded"
            ) from None
        yield item


def _status_of(exc: BaseException) -> RequestError:
    """The gRPC status a client sees for an exception raised while serving its request."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError

    cause = exc.cause if isinstance(exc, rex.RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, InvalidRequestError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(cause), "invalid_argument")
    if isinstance(cause, ModelNotFoundError):
        return RequestError(grpc.StatusCode.NOT_FOUND, str(cause), "not_found")
    if isinstance(cause, ResourceExhaustedError | BackPressureError):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{cause} (retryable)", "resource_exhausted")
    if isinstance(cause, rex.RayActorError | rex.ActorUnavailableError | EngineDeadError):
        return RequestError(
            grpc.StatusCode.UNAVAILABLE, f"the worker serving this request failed: {cause}", "unavailable"
        )
    logger.exception("request failed", exc_info=exc)
    return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {cause!r}", "internal")


class GenerationIngress:
    def __init__(
        self,
        target,
        engine_config: EngineConfig,
        index_config: IndexConfig | None,
        auth_token_file: str | None = None,
        limits: LimitsConfig | None = None,
    ):
        """`auth_token_file`: every call but the health check must carry `authorization: Bearer
        <the file's token>` metadata, else it fails UNAUTHENTICATED."""
        from ray import serve

        from router.metrics import IngressMetrics

        self.target = target  # DeploymentHandle of the TargetWorker deployment
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        model_config = ModelConfig.from_dir(engine_config.model)
        model_id = engine_config.served_model_id
        self.info = ModelInfo(
            model_id=model_id,
            max_model_len=engine_config.max_model_len or model_config.max_position_embeddings,
            page_size=engine_config.page_size,
            vocab_size=model_config.vocab_size,
        )
        self.limits = Limits.resolve(limits or LimitsConfig(), self.info.max_model_len)
        # None: the model has no tokenizer (dummy weights); prompts and outputs are token ids
        self.tokenizer = (
            None
            if engine_config.skip_tokenizer_init
            else load_tokenizer(engine_config.tokenizer or engine_config.model)
        )
        self.index = PageIndex(index_config, model_id) if index_config is not None else None
        self.metrics = IngressMetrics(model_id)
        self._authorization = None
        if auth_token_file is not None:
            token = Path(auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"grpc.auth_token_file {auth_token_file!r} is empty")
            self._authorization = f"Bearer {token}"

    # ------------------------------------------------------------------ Generation
    async def Generate(
        self, request: bytes | pb.GenerateRequest, grpc_context=None
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.perf_counter()
        first = None
        completion_tokens = 0
        prompt_tokens = cached_tokens = 0
        outcome = "cancelled"
        stream = None
        finished = False
        try:
            self._authorize(grpc_context)
            deadline = _deadline(grpc_context, arrival)
            engine_request, hashes = await self._engine_request(await self._decode(request, pb.GenerateRequest))
            stream = self.target.options(stream=True).generate.remote(engine_request, page_hashes=hashes)
            async for delta in _until(stream, deadline):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                completion_tokens += len(delta.token_ids)
                finished = delta.finish_reason is not None
                if finished:
                    prompt_tokens, cached_tokens = delta.num_prompt_tokens, delta.num_cached_prompt_tokens
                if finished and grpc_context is not None:
                    grpc_context.set_trailing_metadata(
                        [
                            ("kvfleet-replica", delta.replica_id),
                            ("kvfleet-cached-prompt-tokens", str(delta.num_cached_prompt_tokens)),
                            ("kvfleet-ingress", self.replica_id),
                        ]
                    )
                yield delta_to_proto(delta)
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            status = _status_of(e)
            outcome = status.outcome
            self._refuse(grpc_context, status)
            raise status from e
        finally:
            if stream is not None and not finished:
                stream.cancel()  # the worker's engine aborts the request and frees its pages
            self.metrics.finished(
                outcome, arrival, first, time.perf_counter(), completion_tokens, prompt_tokens, cached_tokens
            )

    async def Tokenize(self, request: bytes | pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        try:
            self._authorize(grpc_context)
            request = await self._decode(request, pb.TokenizeRequest)
            check_model(request.model, self.info)
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            self._need_tokenizer("chat" if request.WhichOneof("input") == "chat" else "text")
            if request.WhichOneof("input") == "chat":
                ids = await self._tokenize_chat(request.chat)
            else:
                ids = await self._tokenize_text(request.text, add_special, "text")
            return pb.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))
        except Exception as e:
            status = _status_of(e)
            self._refuse(grpc_context, status)
            raise status from e

    async def ListModels(self, request: bytes | pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        try:
            self._authorize(grpc_context)
            await self._decode(request, pb.ListModelsRequest)
        except Exception as e:
            status = _status_of(e)
            self._refuse(grpc_context, status)
            raise status from e
        info = self.info
        model = pb.ModelInfo(
            id=info.model_id,
            max_model_len=info.max_model_len,
            page_size=info.page_size,
            vocab_size=info.vocab_size,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )
        return pb.ListModelsResponse(models=[model])

    async def GetStatus(self, request: bytes | pb.GetStatusRequest, grpc_context=None) -> pb.GetStatusResponse:
        try:
            self._authorize(grpc_context)
            request = await self._decode(request, pb.GetStatusRequest)
            check_model(request.model, self.info)
        except Exception as e:
            status = _status_of(e)
            self._refuse(grpc_context, status)
            raise status from e
        out = pb.GetStatusResponse(model=self.info.model_id)
        if self.index is None:
            return out
        try:
            replicas = await asyncio.to_thread(self.index.live_replicas)
        except Exception as e:  # Redis down: say so rather than fail the status page
            logger.warning("page index unreachable for status: %r", e)
            return out
        out.index_reachable = True
        for name, load in replicas.items():
            out.replicas.add(replica=name, **dataclasses.asdict(load))
        return out

    # ------------------------------------------------------------------ grpc.health.v1
    async def Check(
        self, request: bytes | health_pb2.HealthCheckRequest, grpc_context=None
    ) -> health_pb2.HealthCheckResponse:
        """SERVING once this ingress is up (Serve only routes to replicas that passed their checks)."""
        try:
            request = await self._decode(request, health_pb2.HealthCheckRequest)
        except InvalidRequestError as e:
            status = _status_of(e)
            self._refuse(grpc_context, status)
            raise status from e
        if request.service not in ("", "kvfleet.v1.Generation"):
            status = RequestError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}", "not_found")
            self._refuse(grpc_context, status)
            raise status
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request):
        """Serve's HTTP proxy routes every path here (the app's route prefix is "/"): `/health`
        answers 200, anything else a clean 404 that points to the gRPC API. (The deployment
        cluster/app.py builds, router/openai_api.py's OpenAIIngress, serves OpenAI's API here.)"""
        from starlette.responses import JSONResponse

        if request.url.path.rstrip("/") == "/health":
            return JSONResponse({"status": "ok", "model": self.info.model_id})
        return JSONResponse(
            {"error": f"no HTTP route {request.url.path!r}: kvfleet serves the kvfleet.v1.Generation gRPC API"},
            status_code=404,
        )

    # ------------------------------------------------------------------ internals
    async def _decode(self, request, message_type):
        if not isinstance(request, bytes | bytearray | memoryview):
            return decode(request, message_type)
        check_request_bytes(len(request), self.limits)
        if len(request) <= _INLINE_DECODE_BYTES:
            return decode(request, message_type)
        return await asyncio.to_thread(decode, request, message_type)

    async def _engine_request(self, request: pb.GenerateRequest) -> tuple[GenerateRequest, list[int]]:
        check_model(request.model, self.info)
        check_request_id(request.request_id, self.limits)
        sampling = sampling_from_proto(request.sampling, self.info, self.limits)
        kind = request.WhichOneof("prompt")
        if kind == "chat" or (kind == "text" and request.text):
            self._need_tokenizer(kind)
        if sampling.stop:
            self._need_tokenizer("sampling.stop")
        if kind == "token_ids":
            ids, field = list(request.token_ids.ids), "token_ids"
        elif kind == "chat":
            ids, field = await self._tokenize_chat(request.chat), "chat"
        else:
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await self._tokenize_text(request.text, add_special, "text") if request.text else []
            field = "text"
        check_prompt_tokens(ids, field, self.info.vocab_size, self.limits)
        check_max_tokens(
            request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None, len(ids), self.limits
        )
        hashes = page_hashes(ids, self.info.page_size, self.info.model_id)
        return GenerateRequest(ids, sampling, request_id=request.request_id or uuid.uuid4().hex), hashes

    async def _tokenize_text(self, text: str, add_special: bool, field: str) -> list[int]:
        check_prompt_chars(len(text), field, self.limits)
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special)

    async def _tokenize_chat(self, chat: pb.Chat) -> list[int]:
        num_chars = prompt_chars(chat)
        check_prompt_chars(num_chars, "chat", self.limits)
        if num_chars <= _INLINE_TOKENIZE_CHARS:
            return self._render_chat(chat)
        return await asyncio.to_thread(self._render_chat, chat)

    def _render_chat(self, chat: pb.Chat) -> list[int]:
        messages = chat_messages(chat)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("chat", f"model {self.info.model_id!r} has no chat template: send text instead")
        add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        # Render to text, then encode: `apply_chat_template(tokenize=True)` returns a list in some
        # transformers versions and a BatchEncoding (a UserDict, no dict) in others. The template
        # writes its own special tokens, so the encoding adds none.
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _need_tokenizer(self, field: str) -> None:
        if self.tokenizer is None:
            raise InvalidRequestError(
                field,
                f"{field} needs a tokenizer, and model {self.info.model_id!r} is served without one "
                "(skip_tokenizer_init): send the prompt as token_ids, stop with stop_token_ids",
            )

    def _authorize(self, grpc_context) -> None:
        if self._authorization is None:
            return
        sent = [v for k, v in grpc_context.invocation_metadata() if k == "authorization"] if grpc_context else []
        if len(sent) > 1:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{len(sent)} authorization headers: send one bearer token (`authorization: Bearer <token>`)",
                "unauthenticated",
            )
        token = sent[0] if sent else ""
        if isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        if not hmac.compare_digest(token.encode(), self._authorization.encode()):
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send `authorization: Bearer <token>` metadata",
                "unauthenticated",
            )

    @staticmethod
    def _refuse(grpc_context, status: RequestError) -> None:
        if grpc_context is not None:
            grpc_context.set_code(status.code)
            grpc_context.set_details(str(status))
