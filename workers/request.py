"""The engine's public seam: what a caller hands in and what streams back.

`GenerateRequest` carries token ids (tokenization happens once, at the ingress), the chained
hashes of the prompt's full pages (hashed once, at the ingress; a direct library caller may leave
them out and the engine hashes them) and a `SamplingParams`; `Engine.generate` yields
`TokenDelta`s. Every invalid value raises an `InvalidRequestError` that names the field, before
anything is admitted.
"""

from __future__ import annotations

import enum
import math
import uuid
from dataclasses import dataclass, field

from kvstore.hashing import PageHash


class InvalidRequestError(ValueError):
    """A request the engine will not admit; `field` names the offending parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


class ResourceExhaustedError(RuntimeError):
    """The engine cannot take the request now (queue full); retrying later may succeed."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped because of an error; no request can be served any more."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the caller (cancel, deadline)


@dataclass
class SamplingParams:
    """How to pick each next token. Defaults give greedy decoding of up to 16 tokens.

    temperature 0 means greedy; top_k 0 (or -1) and top_p 1 and min_p 0 disable those filters.
    Processors apply in the order Hugging Face applies them: repetition penalty, temperature,
    top-k, top-p, min-p. `logprobs` = n asks for the n most likely tokens at each step (from
    the model's raw distribution) beside the chosen token's own log-probability.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(name, f"{name} {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", f"must be between 0 and 20, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative integers")


@dataclass
class GenerateRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # kvstore.hashing.page_hashes(prompt_token_ids, page_size, model id) with the engine's page
    # size and served model id; None: the engine computes them
    page_hashes: list[PageHash] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class StepLogprobs:
    """Log-probabilities at one generated position: the chosen token and the top n."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass
class TokenDelta:
    """What one engine step added to one request's output.

    `text` is the newly decodable text; it may lag `token_ids` by a few tokens while a
    multi-byte character or a possible stop string is incomplete. The last delta of a
    request has `finish_reason` set, and carries the usage counts and the replica's id.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[StepLogprobs] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    replica_id: str = ""  # the engine's `EngineConfig.replica_id`, on the last delta (and the first, in a cluster)


@dataclass
class Completion:
    """A whole request's output, for callers that do not stream (`Engine.complete`)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[StepLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """The load and cache figures a router needs, as of the last engine step."""

    num_waiting: int
    num_running: int
    num_free_pages: int
    num_total_pages: int
    page_size: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached (not recomputed)
    num_prefill_tokens: int  # tokens computed as prompt (or recompute) since start
    num_decode_tokens: int  # tokens generated since start
    num_preemptions: int
    num_requests_finished: int  # by any path, aborts included
    num_requests_aborted: int = 0  # cancelled, past their deadline, or the engine shut down
    spec_steps: int = 0  # speculative verifications (one per sequence per step)
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0  # tokens those verifications emitted (accepted + one each)
    spec_draft_calls: int = 0
    spec_draft_time_s: float = 0.0  # time spent proposing (draft forwards or round trips)
    spec_verify_steps: int = 0  # target steps that verified proposals
    spec_verify_time_s: float = 0.0  # those steps' time (the target's forward and sampling)
    spec_failures: int = 0  # proposer calls that failed; the target carried on alone
    num_eager_decode_steps: int = 0  # decode-only steps run eagerly though CUDA graphs are captured
    prefill_time_s: float = 0.0  # time of the steps that computed prompt tokens (the prefill rate's)
    decode_time_s: float = 0.0  # time of the other steps (decode only)
    num_decode_seq_steps: int = 0  # sequences those steps carried (summed over steps)
    num_host_pages: int = 0  # pages of the host-memory tier (0: off)
    num_host_cached_pages: int = 0  # of those, holding a page
    num_host_stored_pages: int = 0  # device pages copied to the host tier on eviction, since start
    num_host_restored_pages: int = 0  # host pages copied back on a prefix hit, since start
    num_host_skipped_restores: int = 0  # prefix hits on host pages computed instead (copy predicted slower)
    num_inserted_pages: int = 0  # pages pulled from other replicas and cached here, since start
    num_exported_pages: int = 0  # pages sent to other replicas, since start
