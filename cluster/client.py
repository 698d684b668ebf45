"""The Python client of the `kvfleet.v1.Generation` API: `KvfleetClient` (blocking) and
`AsyncKvfleetClient` (asyncio, grpc.aio), with the same methods and the same results.

    with KvfleetClient("127.0.0.1:50051", bearer_token="...") as client:
        for chunk in client.generate("Write a haiku about pages", max_tokens=32):
            print(chunk.text, end="", flush=True)

Results are small frozen dataclasses mirroring the proto (`Chunk`, `Completion`, `ClusterStatus`, ...),
so callers never touch generated code. Invariants:

- A sampling parameter left at None is left unset in the request, so the server applies the engine's
  default; 0 and 0.0 are sent as values.
- Only UNAVAILABLE is retried (exponential backoff with jitter, at most `max_retries` times, within the
  call's one deadline `timeout_s`). A `generate` stream is retried only until its first response
  arrives: after that a retry could repeat output, so the error propagates.
- Every failure surfaces as `KvfleetError`, a `grpc.RpcError` with grpc's own `code()` (a
  `grpc.StatusCode`) and `details()` (the server's sentence); `str(err)` is "CODE: details".
- Leaving a stream early cancels its gRPC call, which aborts the request on its replica and frees its
  pages: breaking out of the loop (the generator is closed when dropped) or calling `close()`
  (`aclose()` for the async iterator; use `contextlib.aclosing` where the moment matters).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
from pydantic import BaseModel, ConfigDict, Field

from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

# A prompt: text, token ids, or chat messages ({"role": ..., "content": ...}) for the chat template.
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


class ClientConfig(BaseModel):
    """Where the cluster is and how to call it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(DEFAULT_TARGET, description="host:port of the cluster's gRPC endpoint.")
    tls: bool = Field(False, description="Use TLS (implied by root_certificates).")
    root_certificates: Path | None = Field(None, description="PEM file of the CAs to trust (default: the system's).")
    bearer_token: str | None = Field(None, repr=False, description="Sent as `authorization: Bearer <token>`.")
    timeout_s: float | None = Field(None, gt=0, description="Deadline of one call, retries included.")
    max_retries: int = Field(3, ge=0, description="Retries on UNAVAILABLE (a stream: before its first response).")
    retry_backoff_s: float = Field(0.1, ge=0, description="First retry's delay; doubles each retry.")
    application: str | None = Field(None, description="Ray Serve application to call (`application` metadata).")

    @property
    def use_tls(self) -> bool:
        return self.tls or self.root_certificates is not None


class KvfleetError(grpc.RpcError):
    """A failed call, with grpc's interface: `code()` is a `grpc.StatusCode`, `details()` the server's sentence."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> KvfleetError:
        if isinstance(err, KvfleetError):
            return err
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        return cls(code, details or "")


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class PositionLogprobs:
    chosen: TokenLogprob
    top: list[TokenLogprob]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed `GenerateResponse`: what it added, and on the last one how the request ended."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[PositionLogprobs]  # one per token id when asked for, else empty
    finish_reason: str | None  # "stop", "length" or "abort" on the last chunk; None before
    usage: Usage | None  # last chunk only
    replica: str  # the replica that served the request (last chunk only; "" before)


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation: the concatenation of its chunks."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs]
    finish_reason: str | None
    usage: Usage | None
    replica: str


@dataclass(frozen=True, slots=True)
class Tokenization:
    token_ids: list[int]
    tokens: list[str]  # each id's token string


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    max_model_len: int
    page_size: int
    vocab_size: int
    has_chat_template: bool


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One worker replica as its last heartbeat reported it."""

    replica: str
    num_waiting: int
    num_running: int
    num_free_pages: int
    num_total_pages: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    num_requests_finished: int

    @property
    def page_usage(self) -> float:
        """Fraction of the KV pages in use."""
        return 1.0 - self.num_free_pages / self.num_total_pages if self.num_total_pages else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Hits over queries, None before the first lookup."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    model: str
    replicas: list[ReplicaStatus]
    index_reachable: bool  # False: the page index did not answer, so `replicas` is empty


_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


def _logprob(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob)


def _chunk(msg: pb.GenerateResponse) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=[PositionLogprobs(_logprob(p.chosen), [_logprob(t) for t in p.top]) for p in msg.logprobs],
        finish_reason=_FINISH_REASONS.get(msg.finish_reason),
        usage=Usage(msg.usage.prompt_tokens, msg.usage.cached_prompt_tokens, msg.usage.completion_tokens)
        if msg.HasField("usage")
        else None,
        replica=msg.replica,
    )


def _mirror(cls: type, msg: Any) -> Any:
    return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


def _status(msg: pb.GetStatusResponse) -> ClusterStatus:
    return ClusterStatus(msg.model, [_mirror(ReplicaStatus, r) for r in msg.replicas], msg.index_reachable)


def _tokenization(msg: pb.TokenizeResponse) -> Tokenization:
    return Tokenization(list(msg.token_ids), list(msg.tokens))


def _models(msg: pb.ListModelsResponse) -> list[ModelInfo]:
    return [_mirror(ModelInfo, m) for m in msg.models]


class _Accumulator:
    """Folds chunks into a `Completion` (shared by both clients' `complete`)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] = []
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk

    def completion(self) -> Completion:
        last = self.last
        return Completion(
            request_id=last.request_id if last else "",
            text="".join(self.text),
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            finish_reason=last.finish_reason if last else None,
            usage=last.usage if last else None,
            replica=last.replica if last else "",
        )


# --- requests ------------------------------------------------------------------------------------


def _chat(messages: Sequence[Mapping[str, str]]) -> pb.Chat:
    out = pb.Chat()
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} needs a 'role' and a 'content', got keys {sorted(m)}")
        out.messages.add(role=m["role"], content=m["content"])
    return out


def _prompt(prompt: Prompt) -> dict[str, Any]:
    """The `oneof prompt` field for a text, a token-id list or a list of chat messages."""
    if isinstance(prompt, str):
        return {"text": prompt}
    items = list(prompt)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return {"token_ids": pb.TokenIds(ids=items)}  # an empty list too: the server names the empty prompt
    if all(isinstance(m, Mapping) for m in items):
        return {"chat": _chat(items)}
    raise TypeError("prompt must be a str, a list of token ids, or a list of chat messages (dicts)")


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of `generate` and `complete`. None (or absent) leaves a field unset, so the
    server applies the engine's default (max_tokens 16, greedy, no filters)."""

    model: str  # "" (default): the cluster's only model
    max_tokens: int | None
    temperature: float | None  # 0 is greedy
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None  # stop strings, never included in the text
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None  # also return the n most likely tokens per position
    request_id: str  # "" (default): the server makes one up
    add_special_tokens: bool | None  # for a text prompt (server default: true)


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "logprobs")


def build_generate_request(prompt: Prompt, **options: Unpack[GenerateOptions]) -> pb.GenerateRequest:
    """The `GenerateRequest` for a prompt and `GenerateOptions`."""
    unknown = options.keys() - GenerateOptions.__annotations__.keys()
    if unknown:
        raise TypeError(f"unknown generate option(s): {', '.join(sorted(unknown))}")
    sampling = pb.SamplingParams(
        **{k: options[k] for k in _SAMPLING_FIELDS if options.get(k) is not None},
        ignore_eos=options.get("ignore_eos", False),
    )
    stop = options.get("stop")
    if stop is not None:
        sampling.stop.extend([stop] if isinstance(stop, str) else stop)
    if options.get("stop_token_ids") is not None:
        sampling.stop_token_ids.extend(options["stop_token_ids"])
    request = pb.GenerateRequest(
        model=options.get("model", ""), sampling=sampling, request_id=options.get("request_id", ""), **_prompt(prompt)
    )
    if options.get("add_special_tokens") is not None:
        request.add_special_tokens = options["add_special_tokens"]
    return request


def _tokenize_request(text_or_chat: str | Sequence[Mapping[str, str]], model: str) -> pb.TokenizeRequest:
    if isinstance(text_or_chat, str):
        return pb.TokenizeRequest(model=model, text=text_or_chat)
    return pb.TokenizeRequest(model=model, chat=_chat(text_or_chat))


# --- calling -------------------------------------------------------------------------------------


def _config(target: str | ClientConfig, options: dict[str, Any]) -> ClientConfig:
    if isinstance(target, ClientConfig):
        return ClientConfig(**{**target.model_dump(), **options}) if options else target
    return ClientConfig(target=target, **options)


def _metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    md = []
    if config.bearer_token:
        md.append(("authorization", f"Bearer {config.bearer_token}"))
    if config.application is not None:
        md.append(("application", config.application))
    return tuple(md)


def _credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    if not config.use_tls:
        return None
    roots = config.root_certificates.read_bytes() if config.root_certificates else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


class _Retry:
    """The retry budget of one logical call: which failures to retry, when, and the time left."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.attempt = 0
        self.deadline = time.monotonic() + config.timeout_s if config.timeout_s else None

    def timeout(self) -> float | None:
        return max(self.deadline - time.monotonic(), 1e-3) if self.deadline is not None else None

    def deadline_metadata(self) -> tuple[tuple[str, str], ...]:
        """The deadline again, in-band: the ingress enforces it itself, because Ray Serve's gRPC
        proxy does not always pass a passed deadline on to the replica (see router/ingress.py)."""
        t = self.timeout()
        return () if t is None else (("kvfleet-timeout-ms", str(max(1, int(t * 1000)))),)

    def delay(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after `err`, or None to give up."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code != grpc.StatusCode.UNAVAILABLE or self.attempt >= self.config.max_retries:
            return None
        # Jitter spreads the retries of many clients that lost the same replica.
        delay = self.config.retry_backoff_s * 2**self.attempt * random.uniform(0.5, 1.0)
        self.attempt += 1
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay


class KvfleetClient:
    """The blocking client: `KvfleetClient("host:port", bearer_token=..., tls=True)` or `KvfleetClient(config)`."""

    def __init__(self, target: str | ClientConfig = DEFAULT_TARGET, **options: Any):
        self.config = _config(target, options)
        creds = _credentials(self.config)
        self._channel = (
            grpc.secure_channel(self.config.target, creds) if creds else grpc.insecure_channel(self.config.target)
        )
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(self.config)

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[Chunk]:
        """Stream a generation (options: `GenerateOptions`). The call starts on the first `next`."""
        return self._stream(build_generate_request(prompt, **options))

    def complete(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """The whole generation at once."""
        acc = _Accumulator()
        for chunk in self.generate(prompt, **options):
            acc.add(chunk)
        return acc.completion()

    def tokenize(self, text_or_chat: str | Sequence[Mapping[str, str]], model: str = "") -> Tokenization:
        return _tokenization(self._unary(self._stub.Tokenize, _tokenize_request(text_or_chat, model)))

    def list_models(self) -> list[ModelInfo]:
        return _models(self._unary(self._stub.ListModels, pb.ListModelsRequest()))

    def status(self, model: str = "") -> ClusterStatus:
        return _status(self._unary(self._stub.GetStatus, pb.GetStatusRequest(model=model)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KvfleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self, request: pb.GenerateRequest) -> Iterator[Chunk]:
        retry = _Retry(self.config)
        while True:
            call = self._stub.Generate(
                request, timeout=retry.timeout(), metadata=self._metadata + retry.deadline_metadata()
            )
            received = False
            try:
                for msg in call:
                    received = True
                    yield _chunk(msg)
                return
            except grpc.RpcError as err:
                delay = None if received else retry.delay(err)
                if delay is None:
                    raise KvfleetError.from_rpc(err) from err
            finally:
                # Runs on normal end, error, and when the consumer closes the generator early: the
                # cancel is what tells the server to abort the request and free its pages.
                call.cancel()
            time.sleep(delay)

    def _unary(self, method: Any, request: Any) -> Any:
        retry = _Retry(self.config)
        while True:
            try:
                return method(request, timeout=retry.timeout(), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = retry.delay(err)
                if delay is None:
                    raise KvfleetError.from_rpc(err) from err
            time.sleep(delay)


class AsyncKvfleetClient:
    """The asyncio client (grpc.aio); construct it inside the event loop that will use it."""

    def __init__(self, target: str | ClientConfig = DEFAULT_TARGET, **options: Any):
        self.config = _config(target, options)
        creds = _credentials(self.config)
        self._channel = (
            grpc.aio.secure_channel(self.config.target, creds)
            if creds
            else grpc.aio.insecure_channel(self.config.target)
        )
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(self.config)

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncIterator[Chunk]:
        """Stream a generation (options: `GenerateOptions`). The call starts on the first `anext`."""
        return self._stream(build_generate_request(prompt, **options))

    async def complete(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        acc = _Accumulator()
        async for chunk in self.generate(prompt, **options):
            acc.add(chunk)
        return acc.completion()

    async def tokenize(self, text_or_chat: str | Sequence[Mapping[str, str]], model: str = "") -> Tokenization:
        return _tokenization(await self._unary(self._stub.Tokenize, _tokenize_request(text_or_chat, model)))

    async def list_models(self) -> list[ModelInfo]:
        return _models(await self._unary(self._stub.ListModels, pb.ListModelsRequest()))

    async def status(self, model: str = "") -> ClusterStatus:
        return _status(await self._unary(self._stub.GetStatus, pb.GetStatusRequest(model=model)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKvfleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _stream(self, request: pb.GenerateRequest) -> AsyncIterator[Chunk]:
        retry = _Retry(self.config)
        while True:
            call = self._stub.Generate(
                request, timeout=retry.timeout(), metadata=self._metadata + retry.deadline_metadata()
            )
            received = False
            try:
                async for msg in call:
                    received = True
                    yield _chunk(msg)
                return
            except grpc.RpcError as err:
                delay = None if received else retry.delay(err)
                if delay is None:
                    raise KvfleetError.from_rpc(err) from err
            finally:
                call.cancel()  # as in the blocking client: leaving early aborts the request server-side
            await asyncio.sleep(delay)

    async def _unary(self, method: Any, request: Any) -> Any:
        retry = _Retry(self.config)
        while True:
            try:
                return await method(request, timeout=retry.timeout(), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = retry.delay(err)
                if delay is None:
                    raise KvfleetError.from_rpc(err) from err
            await asyncio.sleep(delay)
