"""The API's messages in the engine's words, and back: pure conversions and checks, no I/O.

`ModelInfo` is what the ingress knows of the model it serves (read from its directory once);
`sampling_from_proto` turns a `kvfleet.v1.SamplingParams` into the engine's `SamplingParams`,
raising `InvalidRequestError` (naming the field) for anything the engine would refuse or the
limits (router/limits.py) forbid, so a bad request never leaves the ingress. `prompt_chars`
measures a prompt before it is tokenized. `delta_to_proto` builds the streamed
`GenerateResponse`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.kvfleet.v1 import generation_pb2 as pb
from router.limits import Limits, check_logprobs, check_stop
from workers.request import FinishReason, InvalidRequestError, SamplingParams, TokenDelta


class ModelNotFoundError(LookupError):
    """The request names a model this cluster does not serve."""


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    max_model_len: int
    page_size: int
    vocab_size: int


_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "logprobs")


def check_model(requested: str, info: ModelInfo) -> None:
    if requested and requested != info.model_id:
        raise ModelNotFoundError(f"model {requested!r} is not served here; this cluster serves {info.model_id!r}")


def sampling_from_proto(msg: pb.SamplingParams, info: ModelInfo, limits: Limits) -> SamplingParams:
    """Unset fields keep the engine's defaults; set ones are validated (errors name the field)."""
    check_stop(msg.stop, msg.stop_token_ids, info.vocab_size, limits)
    check_logprobs(msg.logprobs if msg.HasField("logprobs") else None, limits)
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    params = SamplingParams(
        **kwargs,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )
    params.validate()
    return params


def chat_messages(chat: pb.Chat) -> list[dict[str, str]]:
    if not chat.messages:
        raise InvalidRequestError("chat", "chat.messages is empty: give at least one message")
    for i, m in enumerate(chat.messages):
        if not m.role:
            raise InvalidRequestError("chat", f"chat.messages[{i}].role is empty")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def prompt_chars(chat: pb.Chat) -> int:
    """Characters of all chat messages together: what is measured before rendering the template."""
    return sum(len(m.role) + len(m.content) for m in chat.messages)


def delta_to_proto(delta: TokenDelta) -> pb.GenerateResponse:
    out = pb.GenerateResponse(request_id=delta.request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.logprobs:
        for lp in delta.logprobs:
            pos = out.logprobs.add()
            pos.chosen.token_id, pos.chosen.logprob = lp.chosen.token_id, lp.chosen.logprob
            for t in lp.top:
                pos.top.add(token_id=t.token_id, logprob=t.logprob)
    if delta.finish_reason is not None:
        out.finish_reason = _FINISH[delta.finish_reason]
        out.usage.prompt_tokens = delta.num_prompt_tokens
        out.usage.cached_prompt_tokens = delta.num_cached_prompt_tokens
        out.usage.completion_tokens = delta.num_completion_tokens
    out.replica = delta.replica_id
    return out
