"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`).
Running sequences are served first, oldest first: a decode costs one token, an unfinished prompt
a chunk of what the budget leaves (chunked prefill), so prefill chunks and decodes share a step.
Then waiting sequences are admitted in arrival order; an admitted prompt skips the leading full
pages already in the prefix cache (at least its last token is always computed, to get logits).

When a running sequence needs a page and none is free, the youngest running sequence is
preempted by recompute: its pages are freed (full ones stay in the prefix cache, so the
recompute is usually cheap) and it goes back to the head of the queue. A lone sequence always
fits, because the engine checks that the pool holds `max_model_len` tokens; so there is no
deadlock, and nothing is admitted in a step that preempted.

Pure Python: no torch, no I/O. `schedule()` plans a step; `update()` applies its results. Pages
come and go through the KV-cache manager (workers/kv_cache_manager.py) only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.kv_cache_manager import KVCacheManager
from workers.request import FinishReason
from workers.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: compute tokens [start, start + num_tokens).

    A speculative entry (`draft_token_ids` set by `Scheduler.add_draft_tokens`) computes the
    sequence's last token and the k proposed tokens after it, each as its own decode row with
    logits, for the verifier; `draft_probs` is the proposer's [k, vocab] distribution, or None
    where the proposal was deterministic (n-gram, greedy draft)."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool  # the step reaches the sequence's last token: sample the next one
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: object | None = None  # torch.Tensor [k, vocab] float32; object keeps this module torch-free

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode(self) -> bool:
        """Computed as one decode row per token (a plain decode or a verification)."""
        return self.num_tokens == 1 or bool(self.draft_token_ids)

    def token_at(self, position: int) -> int:
        n = self.seq.num_tokens
        return self.seq.token_ids[position] if position < n else self.draft_token_ids[position - n]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerCounters:
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preemptions: int = 0
    num_requests_finished: int = 0  # by any path, aborts included
    num_requests_aborted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.page_size = kv_cache.page_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()

    # ---------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now, from any state, and free its pages."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.counters.num_requests_finished += 1
        if reason is FinishReason.ABORT:
            self.counters.num_requests_aborted += 1

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- planning
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.kv_cache.pages_needed(seq, seq.num_computed_tokens + n)
            while need > self.kv_cache.num_free_pages:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.kv_cache.allocate(seq, seq.num_computed_tokens + n)
            out.scheduled.append(
                ScheduledSeq(seq, seq.num_computed_tokens, n, seq.num_computed_tokens + n == seq.num_tokens)
            )
            budget -= n
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                scheduled = self._admit(self.waiting[0], budget)
                if scheduled is None:
                    break
                self.waiting.popleft()
                self.running.append(scheduled.seq)
                out.scheduled.append(scheduled)
                budget -= scheduled.num_tokens

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        ps = self.page_size
        # Leave at least the last token to compute: its logits start the generation.
        hit = self.kv_cache.lookup(seq, (seq.num_tokens - 1) // ps)
        num_cached = hit.num_pages * ps  # GPU pages reused, host pages restored
        n = min(seq.num_tokens - num_cached, budget)
        if n < seq.num_tokens - num_cached and not self.config.enable_chunked_prefill:
            return None
        if not self.kv_cache.allocate(seq, num_cached + n, hit):
            return None
        seq.num_computed_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached_prompt_tokens = num_cached
        self.counters.prefix_cache_queries += seq.num_tokens
        self.counters.prefix_cache_hits += num_cached
        return ScheduledSeq(seq, num_cached, n, num_cached + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.counters.num_preemptions += 1

    # ---------------------------------------------------------------- speculation
    def add_draft_tokens(self, out: SchedulerOutput, s: ScheduledSeq, tokens: list[int], probs=None) -> bool:
        """Turn a planned decode into a verification of `tokens`, if the step's token budget and
        the free pages allow it (speculation never preempts). Returns whether it did."""
        k = len(tokens)
        if not k or s.num_tokens != 1 or not s.sample:
            return False
        if out.num_batched_tokens + k > self.config.max_num_batched_tokens:
            return False
        seq = s.seq
        if seq.is_finished:
            return False
        if not self.kv_cache.allocate(seq, s.end + k):
            return False
        s.num_tokens += k
        s.draft_token_ids = list(tokens)
        s.draft_probs = probs
        out.num_batched_tokens += k
        return True

    def max_draft_tokens(self, seq: Sequence) -> int:
        """The most proposed tokens worth verifying for `seq`: a step emits at most k + 1 tokens,
        and positions stay below max_model_len."""
        left = seq.sampling.max_tokens - seq.num_output_tokens - 1
        return max(0, min(left, self.config.max_model_len - seq.num_tokens - 1))

    # ---------------------------------------------------------------- results
    def update(self, out: SchedulerOutput, sampled: list[int | list[int] | None]) -> list[tuple[Sequence, list[int]]]:
        """Apply a step: advance computed tokens, cache full pages, append sampled tokens
        (per scheduled entry: a token, the tokens a verification emitted, or None where nothing
        was sampled) and finish sequences that hit a stop condition. A verification keeps the
        KV of its accepted tokens and gives back the pages past them. Returns each sequence
        that received tokens, with those tokens (a stop condition drops the ones after it)."""
        advanced = []
        for s, token in zip(out.scheduled, sampled, strict=True):
            seq = s.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            if s.draft_token_ids:
                advanced.append((seq, self._apply_verified(s, token)))
                continue
            seq.num_computed_tokens = s.end
            if s.end <= seq.num_prompt_tokens or s.num_tokens > 1:
                self.counters.num_prefill_tokens += s.num_tokens
            self.kv_cache.commit(seq, s.end)  # may swap in cached twins
            if token is None:
                continue
            seq.token_ids.append(token)
            self.counters.num_decode_tokens += 1
            advanced.append((seq, [token]))
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
        return advanced

    def _apply_verified(self, s: ScheduledSeq, tokens: list[int]) -> list[int]:
        """The verifier emitted `tokens`: accepted drafts, then its own token. The KV of the
        last token and the accepted drafts is valid; the rejected drafts' is not (later steps
        overwrite it), and the pages past the valid KV go back to the pool."""
        seq = s.seq
        emitted = []
        reason = None
        for token in tokens:
            seq.token_ids.append(token)
            emitted.append(token)
            self.counters.num_decode_tokens += 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                break
        if reason is not None:
            self.finish(seq, reason)
            return emitted
        seq.num_computed_tokens = seq.num_tokens - 1
        self.kv_cache.trim(seq, seq.num_computed_tokens)
        self.kv_cache.commit(seq, seq.num_computed_tokens)
        return emitted

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.sampling
        if (not p.ignore_eos and token in self.config.eos_token_ids) or token in p.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
