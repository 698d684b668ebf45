"""Proposers: what the engine asks of anything that guesses tokens, and the n-gram proposer.

A proposer is the n-gram lookup below, an in-process draft model (spec/draft_model.py) or the
client of draft replicas (spec/draft_client.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.sequence import Sequence


@dataclass
class Proposals:
    token_ids: list[list[int]]  # per sequence: up to k tokens (fewer, or none, when it has no guess)
    probs: list[torch.Tensor | None]  # per sequence: q, [len(tokens), vocab] float32; None: deterministic


class Proposer(Protocol):
    """Everything the engine asks of a proposer (on its step thread, off the event loop)."""

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        """Up to num_tokens[i] tokens after seqs[i].token_ids (fewer, or none, when it has no guess)."""
        ...

    def release(self, request_id: str) -> None:
        """The request ended: drop whatever the proposer keeps for it."""


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n from `max_n` down to `min_n`) and propose the tokens that followed it. No model."""

    def __init__(self, min_n: int = 1, max_n: int = 3):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        out = [self.lookup(seq.token_ids, k) for seq, k in zip(seqs, num_tokens, strict=True)]
        return Proposals(out, [None] * len(out))

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n :]
            first = suffix[0]
            # the latest match wins: recent text predicts the next tokens best
            for i in range(length - n - 1, -1, -1):
                if tokens[i] == first and tokens[i : i + n] == suffix:
                    return tokens[i + n : i + n + k]
        return []

    def release(self, request_id: str) -> None:
        pass
