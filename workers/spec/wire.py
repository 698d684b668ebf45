"""What travels between a target and its draft replicas (pickled by Ray, so plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.request import SamplingParams


@dataclass
class ProposalRequest:
    """One sequence's part of a call to a draft replica: stateless (its tokens and k), so any
    replica can answer; the one that answered before answers fastest (its KV holds the prefix)."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_tokens: int


@dataclass
class DraftBatch:
    """All sequences of one target step, in one call; `released` are requests that ended."""

    requests: list[ProposalRequest]
    released: list[str] = field(default_factory=list)


@dataclass
class DraftReply:
    token_ids: list[int]
    probs: np.ndarray | None  # [len(token_ids), vocab] float32: q exactly as drawn from; None: greedy
    replica_id: str = ""  # the draft replica that answered (its Serve replica id; "" outside Serve)
    compute_s: float = 0.0  # the replica's time on the whole call: the rest of a round trip is transport
