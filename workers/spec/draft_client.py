"""The target's side of draft replicas: which replica holds each sequence's draft KV, and one
batched proposal call per replica per step.

    DraftRoutes (pure)       request id -> draft replica id; a step's sequences -> `DraftCall`s
                             (workers/spec/draft_routes.py)
    Lookahead (pure)         a proposal computed ahead, while the target verifies, and whether it fits
    AcceptanceRuns (pure)    how often a step accepts its whole proposal, after one that did or not
    RoutedDraftProposer      sends the calls concurrently through `submit`, within one deadline

Ahead of the target (`lookahead`): as soon as a step's proposals are known, and while the target
verifies them, each assigned sequence's replica is asked for k + 1 tokens after the sequence
*with its whole proposal accepted*: the first is the draft's guess of the target's bonus token,
the next k the proposal for the following step. When verification accepts everything and the
bonus token is the guess, the next step's proposal is already there and the draft's round trip
costs nothing; otherwise (a hit needs the tokens to match exactly) the guess is dropped and the
step calls as usual, so a miss costs the wasted draft work and nothing else (on an idle machine;
on a busy one, the call waits for the replica to finish it). Exactness holds either way: a
proposal's tokens were drawn from the q it carries, given exactly the tokens the sequence now has.
Acceptance comes in runs, so a step after a partial acceptance rarely accepts everything: with
`lookahead_min_rate` > 0 the lookahead is asked for only in a state (last step accepted
everything, or not) whose steps accept their whole proposal that often (`AcceptanceRuns`, learnt
from every step, asked for or not). Off by default: where the replica has a core or GPU of its
own, a lookahead unlikely to hit still costs the step nothing (measured in bench/results/README.md).

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
- a released request's id rides on the next call (lookahead calls included) to the replica that
  holds its session;
- a call that fails or misses the deadline gives its sequences no proposal this step (the target
  verifies nothing for them, decodes as usual) and drops their assignments, so they re-route.
  Only when every call of a step fails does `propose` raise, and the `SpeculativeDecoder` pauses
  speculation as for any failing proposer: never an error for the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workers.sequence import Sequence
from workers.spec.draft_routes import DraftCall, DraftRoutes
from workers.spec.proposers import Proposals
from workers.spec.wire import DraftReply

logger = logging.getLogger(__name__)


@dataclass
class DraftClientStats:
    num_calls: int = 0
    num_pinned_calls: int = 0
    num_routed_calls: int = 0  # unpinned: routed by page hashes
    num_direct_calls: int = 0  # pinned calls (lookahead ones included) sent straight to the replica (actor or channel)
    num_channel_calls: int = 0  # of those, over the replica's socket channel (workers/spec/channel.py)
    num_failed_calls: int = 0  # raised, timed out, or answered malformed
    num_moved: int = 0  # sequences answered by another replica than their pin (it had gone)
    num_dropped: int = 0  # assignments dropped because their replica's call failed
    num_assigned: int = 0  # live assignments now
    num_ahead_calls: int = 0  # lookahead calls (one per replica per step)
    num_ahead_hits: int = 0  # sequences whose proposal was ready when their step began
    num_ahead_misses: int = 0  # sequences whose lookahead guessed wrong (or failed): a normal call
    num_ahead_misses_rejected: int = 0  # of those, the target had not accepted the whole proposal
    num_ahead_skipped: int = 0  # lookaheads not asked for: after such a step, whole proposals were rarely accepted
    ahead_wait_s: float = 0.0  # time steps spent reading lookahead replies (a hit's whole cost)
    call_wait_s: float = 0.0  # time steps spent on their calls (the round trip a miss pays)
    call_compute_s: float = 0.0  # of the calls' round trips, the replicas' own time (DraftReply.compute_s)
    num_ahead_read: int = 0  # lookahead calls whose replies were read (a guess that may fit waits for its reply)
    ahead_compute_s: float = 0.0  # the replicas' time on those


class PendingCall(Protocol):
    """A call in flight (a DeploymentResponse, or a direct call on a replica's actor or channel,
    which says so with a true `direct` attribute; a channel call also with a true `channel`)."""

    def result(self, timeout_s: float | None = None) -> Any: ...

    def cancel(self) -> None: ...


class _AheadCall:
    """A lookahead call in flight; its replies are read at most once (cached), or None if it failed."""

    def __init__(self, call: DraftCall, pending: PendingCall | Exception, stats: DraftClientStats):
        self.call, self.pending, self.stats = call, pending, stats
        self.replies: list[DraftReply] | None = None
        self.done = False

    def result(self, deadline: float) -> list[DraftReply] | None:
        if not self.done:
            self.done = True
            try:
                if isinstance(self.pending, Exception):
                    raise self.pending
                replies = RoutedDraftProposer._result(self.pending, deadline)
                if len(replies) == len(self.call.indices):
                    self.replies = replies
                    self.stats.num_ahead_read += 1
                    self.stats.ahead_compute_s += replies[0].compute_s if replies else 0.0
            except Exception as exc:  # a lost guess: the step calls as usual
                logger.debug("lookahead call to %s failed: %r", self.call.replica_id, exc)
        return self.replies


@dataclass
class Lookahead:
    """One sequence's proposal computed ahead: `base` (its tokens and the proposal it was verifying)
    continued by the replica's reply (`position` in `call`; None: not asked for, and `base` only
    tells whether the step accepted its whole proposal). `after_full`: whether the step before
    accepted its own whole proposal (the state this step's outcome teaches `AcceptanceRuns` about)."""

    base: list[int]
    call: _AheadCall | None
    position: int = 0
    after_full: bool = True

    def may_fit(self, token_ids: list[int]) -> bool:
        """Whether the sequence accepted the whole proposal and one more token (the bonus guess
        decides the rest); cheap, without waiting for the reply."""
        n = len(self.base)
        return len(token_ids) == n + 1 and token_ids[:n] == self.base

    def take(self, token_ids: list[int], k: int, deadline: float) -> tuple[list[int], torch.Tensor | None] | None:
        """The proposal of up to k tokens after `token_ids`, with its q rows, if the reply continues
        exactly these tokens; else None."""
        replies = self.call.result(deadline)
        if replies is None:
            return None
        reply = replies[self.position]
        skip = len(token_ids) - len(self.base)  # tokens of the reply the target has produced itself
        if len(reply.token_ids) <= skip or reply.token_ids[:skip] != token_ids[len(self.base) :]:
            return None
        tokens = reply.token_ids[skip : skip + k]
        probs = None if reply.probs is None else torch.from_numpy(reply.probs[skip : skip + len(tokens)])
        return tokens, probs


class AcceptanceRuns:
    """How often a step accepts its whole proposal (the only case a lookahead can hit), after a step
    that did and after one that did not: runs of agreement between draft and target are long (the
    demo pair at k=4: 72% after a whole acceptance, 26% after a partial one), so a lookahead after a
    rejection is mostly wasted draft work, which on a busy machine delays the call that follows it.
    Every step teaches it, asked for or not (whether a step accepted everything needs no reply)."""

    PRIOR = 0.7  # until measured: ask
    WEIGHT = 0.1  # of each new step

    def __init__(self, min_rate: float):
        self.min_rate = min_rate
        self.rate = {True: self.PRIOR, False: self.PRIOR}  # after a whole acceptance / after a rejection

    def learn(self, after_full: bool, full: bool) -> None:
        self.rate[after_full] += self.WEIGHT * (float(full) - self.rate[after_full])

    def worth_asking(self, after_full: bool) -> bool:
        return self.rate[after_full] >= self.min_rate


class RoutedDraftProposer:
    """Proposals from draft replicas: each step's `DraftCall`s go out at once through
    `submit(call)` (returns a pending call: `result(timeout_s)`, `cancel()`; in a TargetWorker, a
    DeploymentHandle call with the pin and page hashes as keyword arguments) and are awaited
    against one deadline, `timeout_s` after the step's first call left.

    `lookahead`: ask each assigned sequence's replica for its next proposal while the target
    verifies this one (see the module docstring), when steps in the sequence's state (its last
    step accepted its whole proposal or not) accept their whole proposal at least
    `lookahead_min_rate` of the time (`AcceptanceRuns`; 0: always). The engine calls it on its step
    thread, off its event loop (it waits on the network)."""

    def __init__(
        self,
        submit: Callable[[DraftCall], PendingCall],
        device: torch.device,
        page_size: int,
        model_id: str,
        timeout_s: float = 0.5,
        lookahead: bool = True,
        lookahead_min_rate: float = 0.0,
    ):
        self.submit = submit
        self.lookahead = lookahead
        self.runs = AcceptanceRuns(lookahead_min_rate)
        self._ahead: dict[str, Lookahead] = {}  # request id -> its next proposal, computing (or only its base)
        self._after_full: dict[str, bool] = {}  # request id -> whether its last step accepted the whole proposal
        self.device = device
        self.timeout_s = timeout_s
        self.routes = DraftRoutes(page_size, model_id)
        self.stats = DraftClientStats()
        self._quiet_until = 0.0

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        deadline = time.monotonic() + self.timeout_s
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        t0 = time.perf_counter()
        rest = self._take_ahead(seqs, num_tokens, deadline, tokens, probs)
        t1 = time.perf_counter()
        self._call(seqs, num_tokens, rest, deadline, tokens, probs)
        self.stats.ahead_wait_s += t1 - t0
        self.stats.call_wait_s += time.perf_counter() - t1
        if self.lookahead:
            self._send_ahead(seqs, num_tokens, tokens)
        return Proposals(tokens, probs)

    def _take_ahead(self, seqs, num_tokens, deadline, tokens, probs) -> list[int]:
        """Fill in the proposals computed ahead that fit; returns the indices still to call for."""
        rest = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens, strict=True)):
            ahead = self._ahead.pop(seq.request_id, None)
            if ahead is not None:
                fits = ahead.may_fit(seq.token_ids)
                self.runs.learn(ahead.after_full, fits)
                self._after_full[seq.request_id] = fits
                if ahead.call is not None:
                    got = ahead.take(seq.token_ids, k, deadline) if fits else None
                    if got is not None and got[0]:
                        tokens[i] = got[0]
                        probs[i] = None if got[1] is None else got[1].to(self.device)
                        self.stats.num_ahead_hits += 1
                        continue
                    self.stats.num_ahead_misses += 1
                    self.stats.num_ahead_misses_rejected += not fits
            rest.append(i)
        return rest

    def _send_ahead(self, seqs, num_tokens, tokens) -> None:
        asked, states = [], []
        for seq, proposal in zip(seqs, tokens, strict=True):
            after_full = self._after_full.get(seq.request_id, True)
            worth = self.runs.worth_asking(after_full)
            if proposal and not worth:  # not asked for; kept to learn whether the step accepts everything
                self.stats.num_ahead_skipped += 1
                self._ahead[seq.request_id] = Lookahead([*seq.token_ids, *proposal], None, after_full=after_full)
            asked.append(proposal if worth else [])
            states.append(after_full)
        for call in self.routes.plan_ahead(seqs, asked, num_tokens):
            try:
                pending: PendingCall | Exception = self.submit(call)
                self._count(pending)
            except Exception as exc:
                pending = exc
            sent = _AheadCall(call, pending, self.stats)
            for position, (i, request) in enumerate(zip(call.indices, call.batch.requests, strict=True)):
                self._ahead[seqs[i].request_id] = Lookahead(request.token_ids, sent, position, states[i])
            self.stats.num_ahead_calls += 1

    def _call(self, seqs, num_tokens, rest, deadline, tokens, probs) -> None:
        """The step's calls for the sequences in `rest`, answered into `tokens` and `probs`."""
        if not rest:
            return
        subset = [seqs[i] for i in rest]
        calls = self.routes.plan(subset, [num_tokens[i] for i in rest])
        for call in calls:
            call.indices = [rest[j] for j in call.indices]
        pending = []
        for call in calls:
            try:
                pending.append((call, self.submit(call)))
                self._count(pending[-1][1])
            except Exception as exc:
                pending.append((call, exc))
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
            self.stats.call_compute_s += replies[0].compute_s if replies else 0.0
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

    def release(self, request_id: str) -> None:
        self._ahead.pop(request_id, None)
        self._after_full.pop(request_id, None)
        self.routes.release(request_id)

    def _count(self, pending: PendingCall) -> None:
        self.stats.num_direct_calls += getattr(pending, "direct", False) is True
        self.stats.num_channel_calls += getattr(pending, "channel", False) is True

    @staticmethod
    def _result(response: PendingCall, deadline: float) -> list[DraftReply]:
        try:
            return response.result(timeout_s=max(0.0, deadline - time.monotonic()))
        except BaseException:
            response.cancel()
            raise
