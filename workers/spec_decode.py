"""Speculative decoding: proposers guess the next k tokens, the target verifies them exactly.

    proposer.propose(seqs, k)  ->  k tokens per sequence (+ their draft distribution q)
    scheduler.add_draft_tokens  ->  the decode becomes a verification of k + 1 tokens
    ModelRunner.execute         ->  one target pass; `verify` picks the tokens to keep

`verify` is exact (Leviathan et al. 2023; Chen et al. 2023): proposed token x is accepted with
probability min(1, p(x) / q(x)); at the first rejection a token is drawn from normalise(max(0,
p - q)); if all k are accepted a bonus token is drawn from p. p is what the sampler would draw
from at that position (`Sampler.process`: penalty over the history including the accepted
drafts, temperature, top-k/p, min-p); a proposer without a distribution (n-gram, a greedy draft)
counts as q = one-hot. A greedy row's p is one-hot on the argmax, so greedy verification keeps
the drafts while they equal the target's argmax: output identical to non-speculative greedy.
A seeded request draws all its randomness from its own generator, so it repeats exactly for the
same speculation decisions (k per step); its tokens differ from the non-speculative run's, being
other draws from the same distribution.

`SpeculativeDecoder` is the engine's side: which decodes speculate and with what k (adaptive,
from the measured acceptance rate and the draft's cost; off for large batches), the counters,
and the fallback: a proposer that fails is left alone for a while and the target decodes alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from workers.request import SamplingParams
from workers.sampling import Sampler, upload
from workers.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from workers.sequence import Sequence

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- proposers
@dataclass
class Proposals:
    token_ids: list[list[int]]  # per sequence: up to k tokens (fewer, or none, when it has no guess)
    probs: list[torch.Tensor | None]  # per sequence: q, [len(tokens), vocab] float32; None: deterministic


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals: ...

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


# ---------------------------------------------------------------------- the verifier
def verify(
    sampler: Sampler, logits: torch.Tensor, entries: list[ScheduledSeq], entry_rows: list[list[int]]
) -> list[list[int]]:
    """The tokens each verification emits: its accepted drafts, then one token of the target's
    (the correction at the first rejection, or the bonus after k acceptances).

    One device-to-host transfer for the whole batch (the chosen tokens, with the sampled rows'
    accept flags); greedy rows compare their drafts with the argmax on the host."""
    device = logits.device
    rows = [r for rs in entry_rows for r in rs]
    x = logits if rows == list(range(logits.shape[0])) else logits[upload(rows, torch.int64, device)]
    starts, drafts = [], []  # per row: the draft it checks (0 on the bonus row)
    for s in entries:
        starts.append(len(drafts))
        drafts += s.draft_token_ids
        drafts.append(0)
    sampled = [i for i, s in enumerate(entries) if not s.seq.sampling.greedy]
    penalty = any(s.seq.sampling.repetition_penalty != 1.0 for s in entries)
    if not sampled and not penalty:
        choice_l = x.argmax(dim=-1).tolist()  # exact in any float dtype: no float32 copy
        return _emitted(entries, starts, choice_l, None, {})
    params, history = [], [] if penalty else None
    for s in entries:
        k = len(s.draft_token_ids)
        params += [s.seq.sampling] * (k + 1)
        if penalty:
            history += [s.seq.token_ids + s.draft_token_ids[:j] for j in range(k + 1)]
    scores = sampler.process(x, params, history)
    if not sampled:
        return _emitted(entries, starts, scores.argmax(dim=-1).tolist(), None, {})
    srows, dp_rows, dp, oh_rows, gens = [], [], [], [], []
    for i in sampled:
        s = entries[i]
        k = len(s.draft_token_ids)
        first = len(srows)
        srows += range(starts[i], starts[i] + k + 1)
        if s.draft_probs is not None:
            dp_rows += range(first, first + k)
            dp.append(s.draft_probs)
        else:  # a deterministic proposal: q is one-hot on the draft
            oh_rows += range(first, first + k)
        gens.append((k + 1, s.seq.generator))
    idx = upload(srows, torch.int64, device)
    d = upload([drafts[r] for r in srows], torch.int64, device)
    p = (scores if len(srows) == scores.shape[0] else scores[idx]).softmax(dim=-1)
    q = torch.zeros_like(p)  # the bonus rows draw from p itself: no draft, q = 0 there
    if dp:
        q[upload(dp_rows, torch.int64, device)] = torch.cat(dp).to(q.dtype)
    if oh_rows:
        oh = upload(oh_rows, torch.int64, device)
        q[oh, d[oh]] = 1.0
    noise = torch.empty_like(p)
    uniform = torch.empty(len(srows), device=device)
    if all(g is None for _, g in gens):
        uniform.uniform_(generator=sampler.generator)
        noise.exponential_(generator=sampler.generator)
    else:
        offset = 0
        for n, gen in gens:
            gen = gen or sampler.generator
            uniform[offset : offset + n].uniform_(generator=gen)
            noise[offset : offset + n].exponential_(generator=gen)
            offset += n
    p_x = p.gather(1, d[:, None]).squeeze(1)
    q_x = q.gather(1, d[:, None]).squeeze(1)
    ok = uniform * q_x < p_x
    residual = (p - q).clamp_(min=0)
    # p == q leaves nothing (and then rejection had probability 0): fall back to p.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p, residual)
    token = residual.div_(noise).argmax(dim=-1)
    choice = token if len(srows) == scores.shape[0] else scores.argmax(dim=-1).index_copy(0, idx, token)
    both = torch.cat([choice, ok.to(choice.dtype)]).tolist()
    n = choice.shape[0]
    return _emitted(entries, starts, both[:n], both[n:], {r: j for j, r in enumerate(srows)})


def _emitted(entries, starts, choice: list[int], ok: list[int] | None, ok_row: dict[int, int]) -> list[list[int]]:
    """Per entry: its drafts while accepted, then the target's token at the first rejection
    (or the bonus). A greedy row accepts its draft when it is the argmax; a sampled row as the
    rejection test said (`ok[ok_row[r]]`)."""
    out = []
    for s, start in zip(entries, starts, strict=True):
        emitted = []
        for j, t in enumerate(s.draft_token_ids):
            r = start + j
            if ok[ok_row[r]] if r in ok_row else choice[r] == t:
                emitted.append(t)
                continue
            emitted.append(choice[r])
            break
        else:
            emitted.append(choice[start + len(s.draft_token_ids)])
        out.append(emitted)
    return out


# ---------------------------------------------------------------------- the engine's side
@dataclass
class SpecStats:
    """Counters since start (the engine's `stats()` carries them)."""

    num_steps: int = 0  # verifications (one per speculating sequence per step)
    num_proposed: int = 0  # draft tokens verified
    num_accepted: int = 0  # of those, accepted
    num_emitted: int = 0  # tokens the verifications emitted (accepted + one per step)
    num_failures: int = 0  # proposer calls that failed (the target carried on alone)
    draft_time_s: float = 0.0  # time spent proposing (a draft replica's round trips included)
    num_draft_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step (accepted drafts + the target's own)."""
        return self.num_emitted / self.num_steps if self.num_steps else 0.0


@dataclass
class _Plan:
    entries: list[ScheduledSeq] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per verification when each draft is accepted with probability alpha: (1 - a^(k+1)) / (1 - a)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class SpeculativeDecoder:
    """Decides, per step, which decodes speculate with how many tokens; runs the proposer and
    attaches its guesses; learns from the verifier's outcome. `k_max` is the configured number
    of speculative tokens; with `adaptive`, k is the one that maximises expected tokens per unit
    of time, (1 - a^(k+1)) / (1 - a) / (1 + k * c), from the measured acceptance rate a and the
    draft's cost per token relative to a target step, c; below 1.0 (speculation would slow the
    step) it is off, probing again now and then."""

    def __init__(
        self,
        proposer: Proposer,
        k_max: int,
        adaptive: bool = True,
        max_batch_size: int = 32,
        retry_after_s: float = 5.0,
        probe_every: int = 16,
        vocab_size: int = 2**31,
    ):
        self.proposer = proposer
        self.vocab_size = vocab_size
        self.k_max = k_max
        self.adaptive = adaptive
        self.max_batch_size = max_batch_size
        self.retry_after_s = retry_after_s
        self.probe_every = probe_every
        self.stats = SpecStats()
        self._alpha = 0.7  # prior, until measured
        self._cost = 0.1  # draft time per proposed token / target step time, until measured
        self._step_time: float | None = None
        self._paused_until = 0.0
        self._steps_off = 0

    # ------------------------------------------------------------------ choosing k
    def choose_k(self) -> int:
        if not self.adaptive:
            return self.k_max
        best_k, best = 0, 1.0
        for k in range(1, self.k_max + 1):
            gain = expected_tokens(self._alpha, k) / (1.0 + k * self._cost)
            if gain > best:
                best_k, best = k, gain
        if best_k == 0:
            self._steps_off += 1
            if self._steps_off >= self.probe_every:  # measure again: the text may have changed
                self._steps_off = 0
                return 1
        return best_k

    def plan(self, out: SchedulerOutput, scheduler: Scheduler) -> _Plan:
        plan = _Plan()
        if time.monotonic() < self._paused_until:
            return plan
        # Decodes only: a prompt whose pages all but its last token were cached also computes one
        # token, but speculating there would make a seeded request's draws depend on the cache.
        decodes = [
            s
            for s in out.scheduled
            if s.num_tokens == 1 and s.sample and s.seq.num_output_tokens > 0 and not s.seq.is_finished
        ]
        if not decodes or len(decodes) > self.max_batch_size:
            # Large batches are compute-bound already: speculation costs throughput there.
            return plan
        k = self.choose_k()
        if k == 0:
            return plan
        for s in decodes:
            if s.seq.sampling.logprobs is not None:  # logprobs describe one position per step
                continue
            n = min(k, scheduler.max_draft_tokens(s.seq))
            if n > 0:
                plan.entries.append(s)
                plan.num_tokens.append(n)
        return plan

    # ------------------------------------------------------------------ proposing
    def propose(self, plan: _Plan) -> Proposals | None:
        """Run the proposer (on the step thread). A failure is logged, counted and answered by
        decoding without speculation for `retry_after_s`: never an error for the request."""
        t0 = time.perf_counter()
        try:
            proposals = self.proposer.propose([s.seq for s in plan.entries], plan.num_tokens)
            self._check(proposals, plan)
        except Exception as exc:  # the proposer is an optimisation: its failure must not fail requests
            self.stats.num_failures += 1
            self._paused_until = time.monotonic() + self.retry_after_s
            logger.warning("speculation paused for %.1f s: the proposer failed: %r", self.retry_after_s, exc)
            return None
        elapsed = time.perf_counter() - t0
        self.stats.draft_time_s += elapsed
        self.stats.num_draft_calls += 1
        proposed = max(plan.num_tokens)
        if self._step_time:
            self._cost = 0.8 * self._cost + 0.2 * (elapsed / proposed / self._step_time)
        return proposals

    def _check(self, proposals: Proposals, plan: _Plan) -> None:
        """A proposer (a remote one especially) must not be able to break the target's step."""
        if len(proposals.token_ids) != len(plan.entries) or len(proposals.probs) != len(plan.entries):
            raise ValueError(f"{len(proposals.token_ids)} proposals for {len(plan.entries)} sequences")
        for tokens, probs in zip(proposals.token_ids, proposals.probs, strict=True):
            if any(not 0 <= t < self.vocab_size for t in tokens):
                raise ValueError(f"a proposed token is outside the vocabulary [0, {self.vocab_size})")
            if probs is not None and (probs.shape[0] < len(tokens) or probs.shape[1] != self.vocab_size):
                raise ValueError(f"draft probabilities of shape {tuple(probs.shape)} for {len(tokens)} tokens")

    def attach(self, out: SchedulerOutput, scheduler: Scheduler, plan: _Plan, proposals: Proposals) -> None:
        guesses = zip(plan.entries, plan.num_tokens, proposals.token_ids, proposals.probs, strict=True)
        for s, n, tokens, probs in guesses:
            tokens = tokens[:n]
            if probs is not None:
                probs = probs[: len(tokens)]
            scheduler.add_draft_tokens(out, s, tokens, probs)

    # ------------------------------------------------------------------ learning
    def record(self, out: SchedulerOutput, sampled: list, step_time: float) -> None:
        """After the target step: acceptance counters and the estimates behind k."""
        proposed = accepted = steps = rejections = 0
        for s, tokens in zip(out.scheduled, sampled, strict=True):
            if not s.draft_token_ids or tokens is None:
                continue
            steps += 1
            proposed += len(s.draft_token_ids)
            accepted += len(tokens) - 1
            rejections += len(tokens) - 1 < len(s.draft_token_ids)
            self.stats.num_emitted += len(tokens)
        if not steps:
            # a plain decode step: what one target step costs
            self._step_time = step_time if self._step_time is None else 0.9 * self._step_time + 0.1 * step_time
            return
        self.stats.num_steps += steps
        self.stats.num_proposed += proposed
        self.stats.num_accepted += accepted
        if self._step_time is None:
            self._step_time = step_time
        # A run of m accepted drafts ended by a rejection is m successes and one failure of a
        # per-token acceptance alpha; a fully accepted run is k successes.
        rate = accepted / (accepted + rejections) if accepted + rejections else self._alpha
        self._alpha = 0.9 * self._alpha + 0.1 * min(rate, 0.99)

    def release(self, request_id: str) -> None:
        self.proposer.release(request_id)
