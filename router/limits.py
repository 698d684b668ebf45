"""Limits at the edge: what one request may ask for, checked before any expensive work.

`LimitsConfig` is the `limits:` section of the cluster config. The checks are pure functions over
plain values (no gRPC, no protobuf), so that every API (the gRPC servicer today, the OpenAI HTTP
API later) refuses the same requests with the same sentences. Each raises `InvalidRequestError`
naming the field and the limit it broke, e.g.

    sampling.stop[0] has 1048576 characters, more than limits.max_stop_string_chars (512)

The order matters for cost: bytes before parsing, characters before tokenizing, token counts
before hashing or routing. Defaults follow what vLLM and Ray Serve users know: no limit tighter
than the model's context, gRPC's message size raised to 16 MiB (a 128k-token prompt is under
1 MiB of text), vLLM's 20 log-probabilities, OpenAI-like bounds on stop sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from workers.request import InvalidRequestError

INT32_MAX = 2**31 - 1


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(
        16 * 2**20,
        ge=1024,
        le=INT32_MAX,
        description="Largest serialized request, in bytes: Serve's gRPC proxy refuses bigger messages "
        "(RESOURCE_EXHAUSTED) and the ingress checks it again (INVALID_ARGUMENT).",
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description="Most characters of a text prompt (or of all chat messages together), checked before "
        "tokenizing; None: 32 per token of the model's context (max_model_len).",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Most prompt tokens; None: the model's context (max_model_len)."
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
    max_stop_string_chars: int = Field(512, ge=1, description="Most characters of one stop string.")
    max_stop_token_ids: int = Field(64, ge=0, description="Most stop token ids per request.")
    max_request_id_chars: int = Field(
        256, ge=1, description="Longest request_id (it is echoed in every response of the stream)."
    )
    max_logprobs: int = Field(20, ge=0, le=20, description="Most log-probabilities per position (vLLM's default).")


@dataclass(frozen=True)
class Limits:
    """`LimitsConfig` resolved against the served model (its context length)."""

    max_request_bytes: int
    max_prompt_chars: int
    max_prompt_tokens: int
    max_model_len: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_request_id_chars: int
    max_logprobs: int

    @classmethod
    def resolve(cls, config: LimitsConfig, max_model_len: int) -> Limits:
        return cls(
            max_request_bytes=config.max_request_bytes,
            max_prompt_chars=config.max_prompt_chars or 32 * max_model_len,
            max_prompt_tokens=min(config.max_prompt_tokens or max_model_len, max_model_len),
            max_model_len=max_model_len,
            max_stop_strings=config.max_stop_strings,
            max_stop_string_chars=config.max_stop_string_chars,
            max_stop_token_ids=config.max_stop_token_ids,
            max_request_id_chars=config.max_request_id_chars,
            max_logprobs=config.max_logprobs,
        )


def _over(field: str, what: str, limit_name: str, limit: int) -> InvalidRequestError:
    return InvalidRequestError(field, f"{field} {what}, more than limits.{limit_name} ({limit})")


def check_request_bytes(size: int, limits: Limits) -> None:
    if size > limits.max_request_bytes:
        raise _over("request", f"is {size} bytes", "max_request_bytes", limits.max_request_bytes)


def check_request_id(request_id: str, limits: Limits) -> None:
    if len(request_id) > limits.max_request_id_chars:
        limit = limits.max_request_id_chars
        raise _over("request_id", f"has {len(request_id)} characters", "max_request_id_chars", limit)


def check_prompt_chars(num_chars: int, field: str, limits: Limits) -> None:
    """Before tokenizing: a prompt this long cannot fit the context anyway."""
    if num_chars > limits.max_prompt_chars:
        raise _over(field, f"has {num_chars} characters", "max_prompt_chars", limits.max_prompt_chars)


def check_prompt_tokens(ids: list[int], field: str, vocab_size: int, limits: Limits) -> None:
    if not ids:
        raise InvalidRequestError(field, f"the prompt is empty ({field}): give at least one token")
    if len(ids) > limits.max_model_len:
        raise InvalidRequestError(
            field, f"the prompt ({field}) has {len(ids)} tokens, more than max_model_len ({limits.max_model_len})"
        )
    if len(ids) > limits.max_prompt_tokens:
        raise _over(field, f"has {len(ids)} tokens", "max_prompt_tokens", limits.max_prompt_tokens)
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"{field} holds {bad}, outside the vocabulary [0, {vocab_size})")


def check_stop(stop: list[str], stop_token_ids: list[int], vocab_size: int, limits: Limits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise _over("sampling.stop", f"has {len(stop)} strings", "max_stop_strings", limits.max_stop_strings)
    for i, s in enumerate(stop):
        if len(s) > limits.max_stop_string_chars:
            raise _over(
                f"sampling.stop[{i}]", f"has {len(s)} characters", "max_stop_string_chars", limits.max_stop_string_chars
            )
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise _over(
            "sampling.stop_token_ids", f"has {len(stop_token_ids)} ids", "max_stop_token_ids", limits.max_stop_token_ids
        )
    for i, t in enumerate(stop_token_ids):
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                "sampling.stop_token_ids",
                f"sampling.stop_token_ids[{i}] is {t}, outside the vocabulary [0, {vocab_size})",
            )


def check_logprobs(logprobs: int | None, limits: Limits) -> None:
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise _over("sampling.logprobs", f"is {logprobs}", "max_logprobs", limits.max_logprobs)


def check_max_tokens(max_tokens: int | None, num_prompt_tokens: int, limits: Limits) -> None:
    """As vLLM's API does: a `max_tokens` the context cannot hold after the prompt is refused, not
    clamped (the client learns at once instead of getting a short answer). Unset: the engine's
    default, cut short by the context (finish reason LENGTH)."""
    if max_tokens is None:
        return
    room = limits.max_model_len - num_prompt_tokens
    if max_tokens > room:
        raise InvalidRequestError(
            "sampling.max_tokens",
            f"sampling.max_tokens is {max_tokens}, more than the context holds after the prompt: max_model_len "
            f"({limits.max_model_len}) - {num_prompt_tokens} prompt tokens = {room}",
        )
