"""`Sequence`: one request's state as it moves through the scheduler, the pages and the model.

Invariants:
- `token_ids` is the prompt followed by the generated tokens; `num_prompt_tokens` splits them;
- `num_computed_tokens` tokens have their KV written in the pages of `block_table` (those of the
  first `num_committed_pages` pages are also registered in the prefix cache);
- `page_hashes[i]` is the chained hash of full page i of `token_ids`: the prompt's come with the
  request (the ingress hashed them), the KV-cache manager computes the rest as they are needed.
"""

from __future__ import annotations

import enum

from kvstore.hashing import PageHash
from workers.request import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "sampling",
        "status",
        "block_table",
        "num_computed_tokens",
        "num_committed_pages",
        "num_cached_prompt_tokens",
        "page_hashes",
        "finish_reason",
        "admitted",
        "generator",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        page_hashes: list[PageHash] | None = None,
    ):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_committed_pages = 0
        self.num_cached_prompt_tokens = 0
        self.page_hashes: list[PageHash] = list(page_hashes or ())
        self.finish_reason: FinishReason | None = None
        self.admitted = False  # set at the first admission; usage counts cached tokens once
        self.generator: object | None = None  # a seeded request's RNG, made by the model runner

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={len(self.block_table)})"
        )
