"""The API's messages in the engine's words, and back: pure conversions and checks, no I/O.

`ModelInfo` is what the ingress knows of the model it serves (read from its directory once);
`sampling_from_proto` and `check_prompt_ids` turn a `kvfleet.v1.GenerateRequest` into the engine's
`SamplingParams` and token ids, raising `InvalidRequestError` (naming the field) for anything the
engine would refuse, so a bad request never leaves the ingress. `delta_to_proto` builds the
streamed `GenerateResponse`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.kvfleet.v1 import generation_pb2 as pb
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


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep the engine's defaults; set ones are validated (errors name the field)."""
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


def check_prompt_ids(ids: list[int], info: ModelInfo, field: str) -> None:
    if not ids:
        raise InvalidRequestError(field, f"the prompt is empty ({field}): give at least one token")
    if len(ids) > info.max_model_len:
        raise InvalidRequestError(
            field, f"the prompt ({field}) has {len(ids)} tokens, more than max_model_len ({info.max_model_len})"
        )
    bad = next((t for t in ids if t >= info.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"{field} holds {bad}, outside the vocabulary [0, {info.vocab_size})")


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
