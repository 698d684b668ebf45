"""The pure limit checks (router/limits.py): each refusal names the field and the limit."""

from __future__ import annotations

import pytest

from router.limits import (
    Limits,
    LimitsConfig,
    check_logprobs,
    check_max_tokens,
    check_prompt_chars,
    check_prompt_tokens,
    check_request_bytes,
    check_request_id,
    check_stop,
)
from workers.request import InvalidRequestError

LIMITS = Limits.resolve(LimitsConfig(), max_model_len=512)


def refused(check, *args) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        check(*args)
    return err.value


def test_defaults_resolve_against_the_models_context():
    assert LIMITS.max_prompt_chars == 32 * 512
    assert LIMITS.max_prompt_tokens == 512
    tighter = Limits.resolve(LimitsConfig(max_prompt_chars=100, max_prompt_tokens=9999), max_model_len=512)
    assert tighter.max_prompt_chars == 100 and tighter.max_prompt_tokens == 512  # never above the context


def test_request_bytes_over_the_limit_name_the_limit():
    check_request_bytes(LIMITS.max_request_bytes, LIMITS)
    err = refused(check_request_bytes, LIMITS.max_request_bytes + 1, LIMITS)
    assert err.field == "request" and "limits.max_request_bytes (16777216)" in str(err)


def test_prompt_characters_are_checked_before_tokenizing():
    check_prompt_chars(LIMITS.max_prompt_chars, "text", LIMITS)
    err = refused(check_prompt_chars, 10_000_000, "chat", LIMITS)
    assert err.field == "chat" and "10000000 characters" in str(err) and "limits.max_prompt_chars" in str(err)


def test_prompt_tokens_empty_too_long_or_outside_the_vocabulary():
    check_prompt_tokens([1, 2, 3], "token_ids", 100, LIMITS)
    assert "empty" in str(refused(check_prompt_tokens, [], "text", 100, LIMITS))
    assert "max_model_len (512)" in str(refused(check_prompt_tokens, [1] * 513, "token_ids", 100, LIMITS))
    err = refused(check_prompt_tokens, [1, 100], "token_ids", 100, LIMITS)
    assert "outside the vocabulary [0, 100)" in str(err)
    few = Limits.resolve(LimitsConfig(max_prompt_tokens=8), max_model_len=512)
    assert "limits.max_prompt_tokens (8)" in str(refused(check_prompt_tokens, [1] * 9, "text", 100, few))


def test_stop_strings_and_stop_token_ids_are_bounded_and_in_the_vocabulary():
    check_stop(["\n\n"] * 16, list(range(64)), 100, LIMITS)
    assert "limits.max_stop_strings (16)" in str(refused(check_stop, ["a"] * 17, [], 100, LIMITS))
    err = refused(check_stop, ["ok", "y" * 1_000_000], [], 100, LIMITS)
    assert err.field == "sampling.stop[1]" and "limits.max_stop_string_chars (512)" in str(err)
    assert "limits.max_stop_token_ids (64)" in str(refused(check_stop, [], list(range(65)), 100, LIMITS))
    err = refused(check_stop, [], [3, 10**9], 100, LIMITS)
    assert err.field == "sampling.stop_token_ids" and "stop_token_ids[1] is 1000000000" in str(err)


def test_request_id_and_logprobs_limits():
    check_request_id("r" * 256, LIMITS)
    err = refused(check_request_id, "r" * 100_000, LIMITS)
    assert err.field == "request_id" and "limits.max_request_id_chars (256)" in str(err)
    check_logprobs(None, LIMITS)
    check_logprobs(20, LIMITS)
    few = Limits.resolve(LimitsConfig(max_logprobs=5), max_model_len=512)
    assert "limits.max_logprobs (5)" in str(refused(check_logprobs, 6, few))


def test_max_tokens_beyond_the_context_is_refused_as_vllm_does():
    check_max_tokens(None, 500, LIMITS)  # unset: the engine's default, cut short by the context
    check_max_tokens(12, 500, LIMITS)
    err = refused(check_max_tokens, 2**31 - 1, 10, LIMITS)
    assert err.field == "sampling.max_tokens"
    assert "2147483647" in str(err) and "max_model_len (512) - 10 prompt tokens = 502" in str(err)


def test_the_config_refuses_nonsense():
    with pytest.raises(ValueError):
        LimitsConfig(max_request_bytes=2**31)
    with pytest.raises(ValueError):
        LimitsConfig(max_logprobs=21)
    with pytest.raises(ValueError):
        LimitsConfig(max_stop_strings=-1)
