"""The engine: one model on one device serving many concurrent requests.

    engine = Engine(EngineConfig(model="path/to/model", device="cpu"))
    async for delta in engine.generate(GenerateRequest(prompt_token_ids=ids, sampling=SamplingParams())):
        ...

One asyncio task runs the loop: schedule a step, run it on the model in the step thread (so the
event loop stays free while the device, or the CPU, computes: it keeps streaming, admits new
requests, and answers other replicas' page exports at once), apply the results, push
`TokenDelta`s to each request's queue. Scheduler state is touched on the event loop's thread
only; pool state also by the step thread (a speculative step's draft pages) and by pulls
(exports and inserts, on the loop while a step runs), all under the KV-cache manager's lock. An
abort that arrives while a step runs is applied as soon as the step returns. When a request ends
by any path (finish, abort, a consumer that stops iterating) its pages go back to the pool.

If a step raises, the loop stops and logs it: every open stream gets `EngineDeadError` (with the
cause chained) and later calls fail fast. Errors are never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.hashing import PageHash
from kvstore.page_pool import KVEvent, PagePool
from kvstore.transport import PagePayload
from workers.config import EngineConfig
from workers.detokenizer import IncrementalDetokenizer
from workers.kv_cache_manager import KVCacheManager, Reservation
from workers.kv_tiers import HostTier
from workers.models.config import ModelConfig
from workers.page_io import PageIO
from workers.request import (
    Completion,
    EngineDeadError,
    EngineStats,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    ResourceExhaustedError,
    TokenDelta,
)
from workers.runner.config import apply_cpu_threads, resolve_device, resolve_max_model_len
from workers.runner.kv_pages import KVPages
from workers.runner.model_runner import StepResult, build_runner
from workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from workers.sequence import Sequence
from workers.spec.decoder import SpecPlan, build_speculative_decoder
from workers.spec.proposers import Proposals, Proposer

logger = logging.getLogger(__name__)

# How often a loop with nothing to admit but pages reserved for pulls in flight looks again
_RESERVED_WAIT_S = 0.005


@dataclass
class _Stream:
    seq: Sequence
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer | None  # None when the engine has no tokenizer


class Engine:
    """`kv_event_sink`, if given, receives the page pool's KV events after every step (on the
    event loop's thread; it must not block: the worker deployment hands them to a publisher's
    queue). Without one the events are dropped, so they never pile up."""

    def __init__(
        self,
        config: EngineConfig,
        kv_event_sink: Callable[[list[KVEvent]], None] | None = None,
        proposer: Proposer | None = None,
    ):
        self.config = config
        self._kv_event_sink = kv_event_sink
        self.model_config = ModelConfig.from_dir(config.model)
        self.model_id = config.served_model_id
        self.device = resolve_device(config.device)
        apply_cpu_threads(config.cpu_threads)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.ranks = None  # ranks 1..n-1 of a tensor-parallel group (workers/group.py)
        tp = None
        if config.tensor_parallel_size > 1:
            from workers.group import RankGroup

            self.ranks = RankGroup(config)
            tp = self.ranks.join_as_rank0(self.device)

        self.runner = None
        try:
            eos = self._load(config, tp)
        except BaseException:
            self._abandon_group()  # a failed start leaves no ranks and no process group behind
            raise
        num_pages = self.runner.num_pages
        self.pool = PagePool(num_pages, config.page_size, config.enable_prefix_caching, config.replica_id)
        self.device_kv = device_kv = KVPages.of_model(self.runner.model)
        self.host_tier = HostTier.build(device_kv, config.host_kv_cache_gib, config.page_size, config.replica_id)
        self.kv_cache = KVCacheManager(self.pool, self.model_id, self.host_tier)
        if self.host_tier is not None:
            self.kv_cache.restore_worth = self._restore_worth
        self.page_io = PageIO(self.kv_cache, device_kv, self.host_tier, self.model_id, config.replica_id)
        self._prefill_time_s = 0.0
        self._decode_time_s = 0.0  # steps that computed no prompt token: a router's per-sequence step cost
        self._decode_seq_steps = 0
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
                eos_token_ids=frozenset(eos),
            ),
            self.kv_cache,
        )
        self.spec = None
        if config.speculative:
            self.spec = build_speculative_decoder(
                config.speculative, self.runner.cfg, num_pages, self.model_config.vocab_size, proposer
            )
        self._streams: dict[str, _Stream] = {}
        self._pending_aborts: list[str] = []
        self._step_running = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfleet-step")
        self._loop_task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._dead: BaseException | None = None
        logger.info(
            "engine ready: %s on %s (%s), %d pages x %d tokens, max_model_len %d",
            self.model_id,
            self.device,
            self.runner.cfg.dtype,
            num_pages,
            config.page_size,
            self.max_model_len,
        )

    # ---------------------------------------------------------------- public API
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's output. Validation errors raise before anything is admitted;
        leaving the loop early (or cancelling the task) aborts the request."""
        stream = self._admit(request)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    async def complete(self, request: GenerateRequest) -> Completion:
        """Run a request to the end and return its whole output."""
        out = Completion(request.request_id)
        async for delta in self.generate(request):
            out.token_ids += delta.token_ids
            out.text += delta.text
            out.logprobs += delta.logprobs or []
            out.finish_reason = delta.finish_reason
            out.num_prompt_tokens = delta.num_prompt_tokens
            out.num_cached_prompt_tokens = delta.num_cached_prompt_tokens
        return out

    def abort(self, request_id: str) -> None:
        """Stop a request now (or as soon as the running step returns) and free its pages.
        Its stream, if still read, ends with finish_reason ABORT. Unknown ids are ignored."""
        if request_id not in self._streams:
            return
        if self._step_running:
            self._pending_aborts.append(request_id)
        else:
            self._finish(self._streams[request_id], FinishReason.ABORT)

    def stats(self) -> EngineStats:
        c = self.scheduler.counters
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_free_pages=self.pool.num_free_pages,
            num_total_pages=self.pool.num_pages,
            page_size=self.pool.page_size,
            prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits,
            num_prefill_tokens=c.num_prefill_tokens,
            num_decode_tokens=c.num_decode_tokens,
            num_preemptions=c.num_preemptions,
            num_requests_finished=c.num_requests_finished,
            num_requests_aborted=c.num_requests_aborted,
            num_eager_decode_steps=self.runner.num_eager_decode_steps,
            prefill_time_s=self._prefill_time_s,
            decode_time_s=self._decode_time_s,
            num_decode_seq_steps=self._decode_seq_steps,
            num_inserted_pages=self.page_io.num_inserted_pages,
            num_exported_pages=self.page_io.num_exported_pages,
            **(self.host_tier.engine_stats() if self.host_tier is not None else {}),
            **(self.spec.stats.engine_stats() if self.spec is not None else {}),
        )

    def _restore_worth(self, num_pages: int) -> bool:
        """Restoring `num_pages` host pages is predicted faster than computing them (the tier's
        measured restore rate against this engine's measured prefill rate; yes until both exist)."""
        restore_s = self.host_tier.restore_s(num_pages)
        tokens = self.scheduler.counters.num_prefill_tokens
        if restore_s is None or tokens < 64 or self._prefill_time_s <= 0:
            return True
        return restore_s < num_pages * self.pool.page_size * self._prefill_time_s / tokens

    # ---------------------------------------------------------------- pages between replicas
    async def export_pages(self, hashes: list[PageHash]) -> PagePayload:
        """The leading run of `hashes` this replica holds (device or host tier). Answered at once,
        even while a step runs: the pages are referenced while they are read (PageIO.export)."""
        return self.page_io.export(hashes)

    def reserve_pages(self, hashes: list[PageHash], start: int) -> Reservation:
        """Room for pages `hashes[start:]` (continuing `hashes[:start]`, held here) that another
        replica is sending: taken at once, while they travel; `insert_pages` fills it,
        `release_pages` gives it back unused."""
        return self.kv_cache.reserve(hashes, start)

    def release_pages(self, reservation: Reservation) -> None:
        self.kv_cache.release(reservation)

    async def insert_pages(
        self,
        payload: PagePayload,
        hashes: list[PageHash],
        start: int,
        phases: dict[str, float] | None = None,
        reservation: Reservation | None = None,
    ) -> int:
        """Cache a checked payload's pages (`hashes[start:]`, continuing `hashes[:start]`) as if
        computed here (at once, even while a step runs: into pages no step touches, `reservation`'s
        if given); a request admitted after this finds them cached."""
        return self.page_io.insert(payload, hashes, start, phases, reservation)

    async def shutdown(self) -> None:
        """Abort every request and stop the loop."""
        for request_id in list(self._streams):
            self.abort(request_id)
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=True)
        if self.host_tier is not None:
            with self.kv_cache.lock:
                self.host_tier.close()
        self.close_group()

    def _load(self, config: EngineConfig, tp) -> set[int]:
        """The tokenizer, the model and its KV memory; returns the end-of-sequence token ids."""
        self.tokenizer = None
        eos = set(self.model_config.eos_token_ids)
        if not config.skip_tokenizer_init:
            from workers.models.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.tokenizer or config.model)
            if self.tokenizer.eos_token_id is not None:
                eos.add(self.tokenizer.eos_token_id)
        self.runner = build_runner(config, self.model_config, self.device, tp)
        num_pages = self.runner.num_pages
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(
                f"the KV pool holds {num_pages} pages x {config.page_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): lower max_model_len or give the pool more memory"
            )
        return eos

    def _abandon_group(self) -> None:
        if self.ranks is None:
            return
        if self.runner is not None:
            self.close_group()
        else:  # the other ranks fail their own load, or are killed after close's timeout
            self.ranks.close()
            self.ranks = None

    def close_group(self) -> None:
        """Release the other ranks of a tensor-parallel group (no-op without one)."""
        if self.ranks is not None:
            self.runner.stop_ranks()
            self.ranks.close()
            self.ranks = None

    # ---------------------------------------------------------------- admission
    def _admit(self, request: GenerateRequest) -> _Stream:
        if self._dead is not None:
            raise EngineDeadError("the engine loop has stopped") from self._dead
        self._check(request)
        if len(self.scheduler.waiting) >= self.config.max_queue_len:
            raise ResourceExhaustedError(f"the queue is full ({self.config.max_queue_len} waiting); retry later")
        ids = request.prompt_token_ids
        seq = Sequence(request.request_id, ids, request.sampling, request.page_hashes)
        detok = IncrementalDetokenizer(self.tokenizer, ids, request.sampling.stop) if self.tokenizer else None
        stream = _Stream(seq, asyncio.Queue(), detok)
        self._streams[request.request_id] = stream
        self.scheduler.add(seq)
        self._ensure_loop()
        return stream

    def _check(self, request: GenerateRequest) -> None:
        """The engine's own invariants. The ingress validates a request for the user (router/);
        these checks keep a request that breaks them (from a direct library caller, or an edge that
        disagrees with this engine's config) from killing the loop for every stream: a token
        outside the vocabulary or a bad sampling value would fail the step, a prompt past
        max_model_len would never fit, page hashes of another page size would poison the cache."""
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "prompt_token_ids is empty: give at least one token")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"prompt_token_ids has {len(ids)} tokens, more than max_model_len ({self.max_model_len})",
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                "prompt_token_ids", f"prompt_token_ids holds {bad}, outside the vocabulary [0, {vocab})"
            )
        hashes = request.page_hashes
        if hashes is not None and len(hashes) != len(ids) // self.pool.page_size:
            raise InvalidRequestError(
                "page_hashes",
                f"page_hashes has {len(hashes)} hashes for {len(ids) // self.pool.page_size} full pages "
                f"of {self.pool.page_size} tokens",
            )
        request.sampling.validate()
        if request.sampling.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer, and this engine has none")
        if request.request_id in self._streams:
            raise InvalidRequestError("request_id", f"request_id {request.request_id!r} is already in use")

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            # A fresh context: the loop outlives the request that starts it and must not carry
            # that request's context (a Ray Serve replica would never cancel that request).
            self._loop_task = loop.create_task(self._run(), name="kvfleet-engine", context=contextvars.Context())
        self._wakeup.set()

    # ---------------------------------------------------------------- the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.scheduler.has_work:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                out = self.scheduler.schedule()
                if out.is_empty and self.kv_cache.num_reservations:
                    # pages held for pulls in flight (KVCacheManager.reserve, on the pull's own
                    # thread): the waiting request is admitted once they are inserted or given back
                    await asyncio.sleep(_RESERVED_WAIT_S)
                    continue
                if out.is_empty:
                    raise RuntimeError(f"scheduler made no progress: {self.scheduler.waiting[0]!r} cannot be admitted")
                self._step_running = True
                try:
                    plan = self.spec.plan(out, self.scheduler) if self.spec is not None else None
                    # One hop to the step thread for the proposal and the target step, on CPU too:
                    # the loop stays free for other replicas' exports (a CPU step inline made every
                    # pull wait for the holder's step). Only that thread runs steps, so torch's CPU
                    # kernels keep one OpenMP team (same step time as inline, measured on 2 cores).
                    result, step_time = await loop.run_in_executor(self._executor, self._step, out, plan)
                finally:
                    self._step_running = False
                if self.spec is not None:
                    self.spec.record(out, result.sampled, step_time)
                self._apply(out, result)
                for request_id in self._pending_aborts:
                    if request_id in self._streams:
                        self._finish(self._streams[request_id], FinishReason.ABORT)
                self._pending_aborts.clear()
                with self.kv_cache.lock:
                    events = self.pool.take_events()
                    if self.host_tier is not None:
                        events += self.host_tier.take_events()
                if events and self._kv_event_sink is not None:
                    self._kv_event_sink(events)
                await asyncio.sleep(0)  # let consumers and new requests in between steps
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("engine loop failed; failing %d open requests", len(self._streams))
            self._dead = exc
            for stream in list(self._streams.values()):
                self.scheduler.finish(stream.seq, FinishReason.ABORT)
                err = EngineDeadError(f"the engine failed: {exc!r}")
                err.__cause__ = exc
                stream.queue.put_nowait(err)
            self._streams.clear()
            # The error now reaches every open stream and every later call (`_dead`); the task
            # ends here rather than re-raising into a result nobody awaits.

    def _step(self, out: SchedulerOutput, plan: SpecPlan | None) -> tuple[StepResult, float]:
        """Propose (if `plan` has entries), attach the proposals, run the target step; returns
        its result and the target step's own time. Runs on the step thread, while the loop thread
        queues new requests, defers aborts (`_step_running`) and serves pulls; the drafts' pages
        come from the pool under the KV-cache manager's lock."""
        if plan is not None and plan.entries:
            self._attach(out, plan, self.spec.propose(plan))
        t0 = time.perf_counter()
        self.device_kv.wait_written()  # CUDA: restores and inserts queued on their stream (a GPU-side wait)
        result = self.runner.execute(out)
        dt = time.perf_counter() - t0
        if any(not s.is_decode for s in out.scheduled):
            self._prefill_time_s += dt  # the prefill rate the pull cost model and the router weigh
        else:
            self._decode_time_s += dt
            self._decode_seq_steps += len(out.scheduled)
        return result, dt

    def _attach(self, out: SchedulerOutput, plan: SpecPlan, proposals: Proposals | None) -> None:
        if proposals is not None:
            self.spec.attach(out, self.scheduler, plan, proposals)

    def _apply(self, out: SchedulerOutput, result: StepResult) -> None:
        advanced = self.scheduler.update(out, result.sampled)
        logprobs_of = {s.seq.request_id: lp for s, lp in zip(out.scheduled, result.logprobs, strict=True)}
        for seq, tokens in advanced:
            stream = self._streams.get(seq.request_id)
            if stream is None:
                continue
            text = ""
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                # A stop token (EOS or stop_token_ids) ends the output without adding its text;
                # the scheduler ends a verification's tokens at one, so only the last can be.
                if stream.detokenizer is None or (last and seq.finish_reason is FinishReason.STOP):
                    continue
                piece, stopped = stream.detokenizer.add([token])
                text += piece
                if stopped:
                    # A stop string ends the output here, even inside a verification's tokens.
                    if not last:
                        del seq.token_ids[seq.num_tokens - (len(tokens) - 1 - i) :]
                        del tokens[i + 1 :]
                        if seq.is_finished:  # by a later token, which no longer exists
                            seq.finish_reason = FinishReason.STOP
                    if not seq.is_finished:
                        self.scheduler.finish(seq, FinishReason.STOP)
                    break
                if last and seq.is_finished:
                    text += stream.detokenizer.flush()
            lp = logprobs_of[seq.request_id]
            self._push(stream, tokens, text, [lp] if lp is not None else None)

    def _finish(self, stream: _Stream, reason: FinishReason) -> None:
        self.scheduler.finish(stream.seq, reason)
        self._push(stream, [], "", None)

    def _push(self, stream: _Stream, token_ids: list[int], text: str, logprobs) -> None:
        seq = stream.seq
        delta = TokenDelta(seq.request_id, token_ids, text, logprobs)
        if seq.is_finished:
            delta.finish_reason = seq.finish_reason
            delta.num_prompt_tokens = seq.num_prompt_tokens
            delta.num_cached_prompt_tokens = seq.num_cached_prompt_tokens
            delta.num_completion_tokens = seq.num_output_tokens
            delta.replica_id = self.config.replica_id
            del self._streams[seq.request_id]
            if self.spec is not None:
                self.spec.release(seq.request_id)
        stream.queue.put_nowait(delta)
