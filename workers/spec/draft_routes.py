"""Which draft replica holds each sequence's draft KV, and how a step's sequences become calls:
pure bookkeeping that workers/spec/draft_client.py's RoutedDraftProposer drives (its module
docstring states the invariants: one pinned call per replica per step, unassigned sequences
grouped by their first page, releases riding on the next call, a failed call's assignments dropped).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvstore.hashing import PageHash, page_hashes
from workers.sequence import Sequence
from workers.spec.wire import DraftBatch, DraftReply, ProposalRequest


@dataclass
class DraftCall:
    """One call of a step: pinned to `replica_id`, or (None) routed by `page_hashes`."""

    replica_id: str | None
    indices: list[int]  # positions of its sequences in the step's list
    batch: DraftBatch
    page_hashes: list[PageHash] | None = None


class DraftRoutes:
    """Pure bookkeeping: assignments, pending releases, and the grouping of a step into calls."""

    def __init__(self, page_size: int, model_id: str):
        self.page_size = page_size
        self.model_id = model_id
        self.assigned: dict[str, str] = {}  # request id -> draft replica id
        self.released: dict[str, list[str]] = {}  # replica id -> request ids to release there
        self._lock = threading.Lock()  # release() comes from the engine loop, plan() from the step thread

    def plan(self, seqs: list[Sequence], num_tokens: list[int]) -> list[DraftCall]:
        pinned: dict[str, DraftCall] = {}
        routed: dict[PageHash | None, DraftCall] = {}
        with self._lock:
            for i, (seq, k) in enumerate(zip(seqs, num_tokens, strict=True)):
                request = ProposalRequest(seq.request_id, list(seq.token_ids), seq.sampling, k)
                replica = self.assigned.get(seq.request_id)
                if replica is not None:
                    call = pinned.get(replica)
                    if call is None:
                        call = pinned[replica] = DraftCall(replica, [], DraftBatch([], self.released.pop(replica, [])))
                else:
                    hashes = page_hashes(request.token_ids, self.page_size, self.model_id)
                    key = hashes[0] if hashes else None
                    call = routed.get(key)
                    if call is None:
                        call = routed[key] = DraftCall(None, [], DraftBatch([]), hashes)
                call.indices.append(i)
                call.batch.requests.append(request)
        return list(pinned.values()) + list(routed.values())

    def plan_ahead(self, seqs: list[Sequence], proposals: list[list[int]], num_tokens: list[int]) -> list[DraftCall]:
        """Lookahead calls: one per replica, for its assigned sequences that got a proposal, each
        asking for k + 1 tokens after its tokens and its whole proposal."""
        pinned: dict[str, DraftCall] = {}
        with self._lock:
            for i, (seq, tokens, k) in enumerate(zip(seqs, proposals, num_tokens, strict=True)):
                replica = self.assigned.get(seq.request_id)
                if replica is None or not tokens:
                    continue
                call = pinned.get(replica)
                if call is None:
                    call = pinned[replica] = DraftCall(replica, [], DraftBatch([], self.released.pop(replica, [])))
                call.indices.append(i)
                call.batch.requests.append(
                    ProposalRequest(seq.request_id, [*seq.token_ids, *tokens], seq.sampling, k + 1)
                )
        return list(pinned.values())

    def answered(self, call: DraftCall, replies: list[DraftReply]) -> int:
        """Record who answered; returns how many sequences moved off their pinned replica."""
        moved = 0
        with self._lock:
            for request, reply in zip(call.batch.requests, replies, strict=True):
                if call.replica_id is not None and reply.replica_id != call.replica_id:
                    moved += 1
                if reply.replica_id:
                    self.assigned[request.request_id] = reply.replica_id
        return moved

    def failed(self, call: DraftCall) -> int:
        """Forget the call's assignments (and, if pinned, the replica's pending releases: a replica
        that fails has likely lost its sessions). Returns how many assignments were dropped."""
        dropped = 0
        with self._lock:
            for request in call.batch.requests:
                dropped += self.assigned.pop(request.request_id, None) is not None
            if call.replica_id is not None:
                self.released.pop(call.replica_id, None)
        return dropped

    def release(self, request_id: str) -> None:
        with self._lock:
            replica = self.assigned.pop(request_id, None)
            if replica is not None:
                self.released.setdefault(replica, []).append(request_id)
