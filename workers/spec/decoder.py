"""The engine's side of speculative decoding: which decodes speculate and with what k (adaptive,
from the measured acceptance rate and the draft's cost; off for large batches), the counters, and
the fallback: a proposer that fails is left alone for a while and the target decodes alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from workers.config import SpeculativeConfig
from workers.runner.config import RunnerConfig
from workers.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from workers.spec.proposers import NgramProposer, Proposals, Proposer

logger = logging.getLogger(__name__)


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
    num_verify_steps: int = 0  # target steps that verified proposals
    verify_time_s: float = 0.0  # their time

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step (accepted drafts + the target's own)."""
        return self.num_emitted / self.num_steps if self.num_steps else 0.0

    def engine_stats(self) -> dict[str, int | float]:
        """These counters as `EngineStats`' spec_* fields."""
        return dict(
            spec_steps=self.num_steps,
            spec_proposed_tokens=self.num_proposed,
            spec_accepted_tokens=self.num_accepted,
            spec_emitted_tokens=self.num_emitted,
            spec_draft_calls=self.num_draft_calls,
            spec_draft_time_s=self.draft_time_s,
            spec_verify_steps=self.num_verify_steps,
            spec_verify_time_s=self.verify_time_s,
            spec_failures=self.num_failures,
        )


@dataclass
class SpecPlan:
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

    def plan(self, out: SchedulerOutput, scheduler: Scheduler) -> SpecPlan:
        plan = SpecPlan()
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
    def propose(self, plan: SpecPlan) -> Proposals | None:
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

    def _check(self, proposals: Proposals, plan: SpecPlan) -> None:
        """A proposer (a remote one especially) must not be able to break the target's step."""
        if len(proposals.token_ids) != len(plan.entries) or len(proposals.probs) != len(plan.entries):
            raise ValueError(f"{len(proposals.token_ids)} proposals for {len(plan.entries)} sequences")
        for tokens, probs in zip(proposals.token_ids, proposals.probs, strict=True):
            if any(not 0 <= t < self.vocab_size for t in tokens):
                raise ValueError(f"a proposed token is outside the vocabulary [0, {self.vocab_size})")
            if probs is not None and (probs.shape[0] < len(tokens) or probs.shape[1] != self.vocab_size):
                raise ValueError(f"draft probabilities of shape {tuple(probs.shape)} for {len(tokens)} tokens")

    def attach(self, out: SchedulerOutput, scheduler: Scheduler, plan: SpecPlan, proposals: Proposals) -> None:
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
        self.stats.num_verify_steps += 1
        self.stats.verify_time_s += step_time
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


def build_speculative_decoder(
    spec: SpeculativeConfig,
    target: RunnerConfig,
    target_num_pages: int,
    vocab_size: int,
    proposer: Proposer | None = None,
) -> SpeculativeDecoder:
    """The decoder for `spec` beside a target run as `target` (its runner's settings, pool size and
    vocabulary). `proposer`: the draft replicas' client, for method 'replicas'."""
    if spec.method == "ngram":
        proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
    elif spec.method == "replicas":
        if proposer is None:
            raise ValueError("speculative.method 'replicas' needs a proposer (the worker deployment passes one)")
    else:
        from workers.spec.draft_model import DraftModel  # loads a model: only when asked for

        proposer = DraftModel.beside(target, target_num_pages, vocab_size, spec)
    return SpeculativeDecoder(
        proposer,
        spec.num_speculative_tokens,
        spec.adaptive,
        spec.max_batch_size,
        spec.retry_after_s,
        vocab_size=vocab_size,
    )
