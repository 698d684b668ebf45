"""The target's side of draft replicas: which replica holds each sequence's draft KV, and one
batched proposal call per replica per step.

    DraftRoutes (pure)       request id -> draft replica id; a step's sequences -> `DraftCall`s
    RoutedDraftProposer      sends the calls concurrently through `submit`, within one deadline

A sequence's first call goes out unpinned, with the draft model's chained page hashes of its
tokens, so the draft deployment's request router (router/prefix_router.py, StickyPrefixRouter)
sends it to the replica holding most of its prefix (or the least loaded); the replica that
answers (`DraftReply.replica_id`) is remembered, and every later call for the sequence is pinned
to it, so its draft KV is computed once and extended by a token or two per step.

Invariants:
- per step, at most one pinned call per replica: the sequences assigned to it, in one batch;
- unassigned sequences are grouped by their first page (sequences that share it share a prefix
  and belong together); one unpinned call per group, routed by the group's first sequence's
  hashes. Several new requests of one step with different prompts thus spread over the replicas
  by load, instead of all pinning to whichever replica one batched call reached;
- a released request's id rides on the next call to the replica that holds its session;
- a call that fails or misses the deadline gives its sequences no proposal this step (the target
  verifies nothing for them, decodes as usual) and drops their assignments, so they re-route.
  Only when every call of a step fails does `propose` raise, and the `SpeculativeDecoder` pauses
  speculation as for any failing proposer: never an error for the request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvstore.hashing import PageHash, page_hashes
from workers.sequence import Sequence
from workers.spec.proposers import Proposals
from workers.spec.wire import DraftBatch, DraftReply, ProposalRequest

logger = logging.getLogger(__name__)


@dataclass
class DraftCall:
    """One call of a step: pinned to `replica_id`, or (None) routed by `page_hashes`."""

    replica_id: str | None
    indices: list[int]  # positions of its sequences in the step's list
    batch: DraftBatch
    page_hashes: list[PageHash] | None = None


@dataclass
class DraftClientStats:
    num_calls: int = 0
    num_pinned_calls: int = 0
    num_routed_calls: int = 0  # unpinned: routed by page hashes
    num_failed_calls: int = 0  # raised, timed out, or answered malformed
    num_moved: int = 0  # sequences answered by another replica than their pin (it had gone)
    num_dropped: int = 0  # assignments dropped because their replica's call failed
    num_assigned: int = 0  # live assignments now


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


class PendingCall(Protocol):
    def result(self, timeout_s: float | None = None) -> Any: ...

    def cancel(self) -> None: ...


class RoutedDraftProposer:
    """Proposals from draft replicas: each step's `DraftCall`s go out at once through
    `submit(call)` (returns a pending call: `result(timeout_s)`, `cancel()`; in a TargetWorker, a
    DeploymentHandle call with the pin and page hashes as keyword arguments) and are awaited
    against one deadline, `timeout_s` after the step's first call left.

    `blocking`: the engine runs it off its event loop (it waits on the network)."""

    blocking = True

    def __init__(
        self,
        submit: Callable[[DraftCall], PendingCall],
        device: torch.device,
        page_size: int,
        model_id: str,
        timeout_s: float = 0.5,
    ):
        self.submit = submit
        self.device = device
        self.timeout_s = timeout_s
        self.routes = DraftRoutes(page_size, model_id)
        self.stats = DraftClientStats()
        self._quiet_until = 0.0

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        calls = self.routes.plan(seqs, num_tokens)
        deadline = time.monotonic() + self.timeout_s
        pending = []
        for call in calls:
            try:
                pending.append((call, self.submit(call)))
            except Exception as exc:
                pending.append((call, exc))
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        answered = 0
        errors = []
        for call, response in pending:
            try:
                if isinstance(response, Exception):
                    raise response
                replies = self._result(response, deadline)
                if len(replies) != len(call.indices):
                    raise ValueError(f"{len(replies)} replies for {len(call.indices)} sequences")
            except Exception as exc:  # a draft replica is an optimisation: its failure only costs speculation
                errors.append(exc)
                self.stats.num_failed_calls += 1
                self.stats.num_dropped += self.routes.failed(call)
                logger.debug("draft call to %s failed: %r", call.replica_id or "a routed replica", exc)
                continue
            answered += 1
            self.stats.num_moved += self.routes.answered(call, replies)
            for i, reply in zip(call.indices, replies, strict=True):
                tokens[i] = reply.token_ids
                if reply.probs is not None:
                    probs[i] = torch.from_numpy(reply.probs).to(self.device)
        self.stats.num_calls += len(calls)
        self.stats.num_pinned_calls += sum(c.replica_id is not None for c in calls)
        self.stats.num_routed_calls += sum(c.replica_id is None for c in calls)
        self.stats.num_assigned = len(self.routes.assigned)
        if calls and not answered:
            raise RuntimeError(f"every draft call of the step failed ({len(calls)}): {errors[0]!r}") from errors[0]
        if errors and time.monotonic() >= self._quiet_until:  # a dead replica fails every step until Serve drops it
            self._quiet_until = time.monotonic() + 10.0
            logger.warning(
                "%d of %d draft calls failed this step (next warning in 10 s at the earliest): %r",
                len(errors),
                len(calls),
                errors[0],
            )
        return Proposals(tokens, probs)

    def release(self, request_id: str) -> None:
        self.routes.release(request_id)

    @staticmethod
    def _result(response: PendingCall, deadline: float) -> list[DraftReply]:
        try:
            return response.result(timeout_s=max(0.0, deadline - time.monotonic()))
        except BaseException:
            response.cancel()
            raise
