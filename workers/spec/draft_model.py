"""`DraftModel`: a small model that proposes tokens for the target, in the target's process.

It is an engine of the draft model without a loop: its own `ModelRunner` (weights, paged KV
cache, CUDA graphs), its own `PagePool` with prefix caching, and one session per request. The
proposal API is stateless (the target's token ids and k), the work incremental: a session
remembers which tokens its KV holds, and each call computes only what changed since its last
call: the tokens the target accepted or corrected (1-2 per step, as decode rows) or, the first
time, the prompt past its cached pages (a prefill chunk); then k - 1 more decodes.

Invariants:
- a session's pages hold the KV of its first `num_computed_tokens` tokens; the ones the target
  has verified (its token ids) are committed to the prefix cache page by page, the speculative
  ones never are, so a cached page never holds a guess;
- every page a session holds goes back to the pool when the request ends (`release`), or when
  the pool runs short and the session is the least recently used.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from kvstore.page_pool import PagePool
from workers.config import EngineConfig, SpeculativeConfig, dir_model_id
from workers.kv_cache_manager import KVCacheManager
from workers.models.config import ModelConfig
from workers.models.gguf_file import find_gguf
from workers.runner.config import RunnerConfig, apply_cpu_threads, resolve_device, runner_config
from workers.runner.draft_decode import DeviceFedDecoder
from workers.runner.memory import kv_page_bytes
from workers.runner.model_runner import ModelRunner
from workers.sampling import make_generator, upload
from workers.scheduler import ScheduledSeq, SchedulerOutput
from workers.sequence import Sequence
from workers.spec.proposers import Proposals
from workers.spec.wire import DraftBatch, DraftReply

# Catch-ups up to this many tokens run as decode rows (a graph replay); longer ones as prefill.
_MAX_DECODE_ROWS = 8


class DraftModel:
    def __init__(self, runner_config: RunnerConfig, model_config: ModelConfig, model_id: str):
        self.runner = ModelRunner(runner_config, model_config)
        self.decoder = DeviceFedDecoder(self.runner)
        self.model_id = model_id
        self.page_size = runner_config.page_size
        self.max_num_batched_tokens = runner_config.max_num_batched_tokens
        self.pool = PagePool(self.runner.num_pages, self.page_size, True, f"draft:{model_id}")
        self.kv_cache = KVCacheManager(self.pool, model_id)
        self.sessions: OrderedDict[str, Sequence] = OrderedDict()  # least recently used first
        self.device = runner_config.device
        self.vocab_size = model_config.vocab_size
        self.kv_event_sink = None  # see publish_kv_events
        self.num_sessions_started = 0
        self.num_cached_prompt_tokens = 0  # tokens new sessions found in the prefix cache

    @classmethod
    def standalone(cls, config: EngineConfig, num_speculative_tokens: int) -> DraftModel:
        """A draft replica's model from an `EngineConfig` of the draft (cluster/config.py's draft section)."""
        apply_cpu_threads(config.cpu_threads)
        mc = ModelConfig.from_dir(config.model)
        rc = runner_config(
            config,
            mc,
            resolve_device(config.device),
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs * _MAX_DECODE_ROWS),
            num_speculative_tokens=max(num_speculative_tokens, _MAX_DECODE_ROWS) - 1,
        )
        return cls(rc, mc, config.served_model_id)

    def serve(self, batch: DraftBatch) -> list[DraftReply]:
        """A draft replica's answer to one batched call. A seeded request draws from a generator
        seeded by (seed, its length), so its proposals repeat whichever replica answers."""
        for request_id in batch.released:
            self.release(request_id)
        seqs = []
        for r in batch.requests:
            seq = Sequence(r.request_id, r.token_ids, r.sampling)
            if r.sampling.seed is not None:
                seed = (r.sampling.seed * 1_000_003 + len(r.token_ids)) & 0x7FFFFFFFFFFF
                seq.generator = make_generator(seed, self.device)
            seqs.append(seq)
        proposals = self.propose(seqs, [r.num_tokens for r in batch.requests])
        return [
            DraftReply(t, None if q is None else q.float().cpu().numpy())
            for t, q in zip(proposals.token_ids, proposals.probs, strict=True)
        ]

    def publish_kv_events(self, sink, replica_id: str) -> None:
        """Hand this pool's KV events to `sink` after each proposal, under `replica_id`: a draft
        replica indexes its pages so that proposal calls route to the replica that holds a sequence."""
        self.pool.replica_id = replica_id
        self.kv_event_sink = sink

    @classmethod
    def beside(
        cls, target: RunnerConfig, target_num_pages: int, vocab_size: int, spec: SpeculativeConfig
    ) -> DraftModel:
        """A draft beside a target run as `target` (its runner's settings): same device, dtype,
        page size and limits; `target_num_pages` and `vocab_size` are the target's pool and vocabulary."""
        mc = ModelConfig.from_dir(spec.draft_model)
        if mc.vocab_size != vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({mc.vocab_size}) differs from the target's "
                f"({vocab_size}): a draft must share the target's tokenizer"
            )
        rows = target.max_num_seqs * (1 + spec.num_speculative_tokens)
        rc = dataclasses.replace(
            target,
            model_dir=spec.draft_model,
            # a draft that is no GGUF file cannot keep GGUF blocks: it loads in float
            quantization="none"
            if target.quantization == "gguf" and find_gguf(spec.draft_model) is None
            else target.quantization,
            max_num_batched_tokens=max(target.max_num_batched_tokens, rows),
            # a catch-up after a fully accepted proposal computes two rows per sequence
            max_graph_batch_size=min(target.max_graph_batch_size, 2 * target.max_num_seqs),
            num_speculative_tokens=_MAX_DECODE_ROWS - 1,  # rows of a catch-up
            num_pages=spec.draft_num_pages or _default_num_pages(target, target_num_pages, mc),
        )
        return cls(rc, mc, dir_model_id(spec.draft_model))

    # ------------------------------------------------------------------ the API
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> Proposals:
        """Up to num_tokens[i] tokens after seqs[i].token_ids, drawn as the target's sampler
        would draw from the draft's distribution (greedy: its argmax); with their
        distributions for sampled requests.

        The drawn tokens stay on the device and feed the next step's input (`DeviceFedDecoder`: the
        positions, slots and block tables of all k - 1 steps are known before the first), so the
        host waits on the device once per call, not once per token. A repetition penalty needs
        each step's tokens on the host (the history it penalises): such a batch syncs per step."""
        tokens: list[list[int]] = [[] for _ in seqs]
        live = []  # (index, session, k) of the sequences that got their pages
        keep = {s.request_id for s in seqs}
        for i, (seq, k) in enumerate(zip(seqs, num_tokens, strict=True)):
            session = self._sync(seq, k, keep)
            if session is not None:
                live.append((i, session, k))
        if not live:
            return Proposals(tokens, [None] * len(seqs))
        sessions = [s for _, s, _ in live]
        params = [seqs[i].sampling for i, _, _ in live]
        ks = [k for _, _, k in live]
        for i, _, _ in live:
            seq = seqs[i]
            if seq.sampling.seed is not None and seq.generator is None:
                seq.generator = make_generator(seq.sampling.seed, self.device)
        generators = [seqs[i].generator for i, _, _ in live]
        # Step 0: catch up with the target's tokens; the last one's logits give the first draft.
        logits = self._catch_up(sessions)
        drafted, q = self._draw_all(sessions, ks, params, generators, logits)
        events = self.pool.take_events()  # an in-process draft's pages are nobody's business: dropped
        if events and self.kv_event_sink is not None:
            self.kv_event_sink(events)
        result: list[torch.Tensor | None] = [None] * len(seqs)
        sampled = 0
        for r, (i, _, k) in enumerate(live):
            tokens[i] = drafted[r][:k]
            if not params[r].greedy:
                result[i] = q[sampled, :k]
                sampled += 1
        return Proposals(tokens, result)

    def release(self, request_id: str) -> None:
        session = self.sessions.pop(request_id, None)
        if session is not None:
            self.kv_cache.free(session)

    # ------------------------------------------------------------------ internals
    def _sync(self, seq: Sequence, k: int, keep: set[str]) -> Sequence | None:
        """The request's session, its tokens set to the target's and its KV rolled back to their
        longest common prefix, with pages for k more; None if the pool cannot hold it."""
        target = seq.token_ids
        n = len(target)
        session = self.sessions.get(seq.request_id)
        hit = None
        if session is None:
            session = Sequence(seq.request_id, target, seq.sampling)
            hit = self.kv_cache.lookup(session, (n - 1) // self.page_size)
        else:
            self.sessions.move_to_end(seq.request_id)
            mine = session.token_ids
            # The target only appends: its tokens before our last sync are ours too.
            m = min(session.num_computed_tokens, n)
            start = min(session.num_prompt_tokens, m)
            for j in range(start, m):
                if mine[j] != target[j]:
                    m = j
                    break
            session.num_computed_tokens = min(m, n - 1)
            session.token_ids = list(target)
        session.num_prompt_tokens = n  # here: how many tokens the target has verified
        while not self.kv_cache.allocate(session, n + k - 1, hit):
            victim = next((r for r in self.sessions if r not in keep), None)
            if victim is None:
                return None
            self.release(victim)
        if hit is not None:  # a new session: its cached prefix is computed
            session.num_computed_tokens = len(hit.gpu_pages) * self.page_size
            self.sessions[seq.request_id] = session
            self.num_sessions_started += 1
            self.num_cached_prompt_tokens += session.num_computed_tokens
        return session

    def _catch_up(self, sessions: list[Sequence]) -> torch.Tensor:
        """Compute each session's uncomputed tokens; returns the last token's logits per session."""
        pieces: list[torch.Tensor] = []
        order: list[int] = []  # the session of each row of cat(pieces)
        pending = list(range(len(sessions)))
        while pending:
            out = SchedulerOutput()
            budget = self.max_num_batched_tokens
            which = []
            for j in pending:
                s = sessions[j]
                left = s.num_tokens - s.num_computed_tokens
                if left <= _MAX_DECODE_ROWS and left <= budget:
                    # decode rows: the tokens past the first count as "drafts" so that every
                    # row is computed as a decode (the runner returns all their logits)
                    head = s.token_ids[: s.num_computed_tokens + 1]
                    tail = s.token_ids[s.num_computed_tokens + 1 :]
                    s.token_ids = head
                    entry = ScheduledSeq(s, s.num_computed_tokens, left, True, draft_token_ids=tail)
                    out.scheduled.append(entry)
                    which.append((j, entry, left))
                    budget -= left
                elif budget > 0:
                    n = min(left, budget)
                    entry = ScheduledSeq(s, s.num_computed_tokens, n, n == left)
                    out.scheduled.append(entry)
                    which.append((j, entry, n))
                    budget -= n
            if not which:
                raise RuntimeError("the draft's token budget holds no catch-up")
            logits, entry_rows = self.runner.forward(out)
            rows = []
            for (j, entry, n), entry_rows_j in zip(which, entry_rows, strict=True):
                s = sessions[j]
                if entry.draft_token_ids:
                    s.token_ids = s.token_ids + entry.draft_token_ids
                s.num_computed_tokens += n
                if s.num_computed_tokens == s.num_tokens:
                    rows.append(entry_rows_j[-1])
                    order.append(j)
            if rows:
                # A graph's logits are its output buffer, which the next replay overwrites: a
                # view may be kept only when no other forward follows.
                done = set(order)
                pending = [j for j in pending if j not in done]
                whole = rows == list(range(logits.shape[0])) and not pending and not pieces
                pieces.append(logits if whole else logits[upload(rows, torch.int64, self.device)])
        for s in sessions:
            self._commit(s)
        last = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if order != sorted(order):
            last = last[upload(sorted(range(len(order)), key=order.__getitem__), torch.int64, self.device)]
        return last

    def _commit(self, s: Sequence) -> None:
        """Cache the full pages of the target-verified tokens (`num_prompt_tokens` of them here)."""
        self.kv_cache.commit(s, min(s.num_prompt_tokens, s.num_computed_tokens))

    def _draw(
        self, logits: torch.Tensor, params: list, generators: list, sampled: torch.Tensor | None, history=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's next draft token, on the device, as the target's sampler would pick it
        (same params; `history` for a repetition penalty): greedy rows their argmax, sampled rows
        a draw from q = softmax of the processed scores (returned for those rows, in order).
        `sampled` indexes the sampled rows (None: every row is greedy)."""
        if sampled is None and history is None:
            return logits.argmax(dim=-1), None  # exact in any float dtype: no float32 copy
        sampler = self.runner.sampler
        scores = sampler.process(logits, params, history)
        if sampled is None:
            return scores.argmax(dim=-1), None
        rows = [r for r, p in enumerate(params) if not p.greedy]
        every = len(rows) == len(params)
        q = (scores if every else scores[sampled]).softmax(dim=-1)
        noise = torch.empty_like(q)
        if all(generators[r] is None for r in rows):
            noise.exponential_(generator=sampler.generator)
        else:
            for j, r in enumerate(rows):
                noise[j].exponential_(generator=generators[r] or sampler.generator)
        drawn = (q / noise).argmax(dim=-1)
        return (drawn if every else scores.argmax(dim=-1).index_copy(0, sampled, drawn)), q

    def _draw_all(self, sessions, ks, params, generators, logits) -> tuple[list[list[int]], torch.Tensor | None]:
        """All k tokens of every session from the catch-up's `logits`: step j's tokens are step
        j + 1's input on the device, so the host waits once, at the end. Appends each session's
        tokens (the last one not yet computed). Returns them and, if some rows sample, q
        [sampled rows, k_max, vocab] (in row order). A repetition penalty needs each step's
        tokens on the host (the history it penalises): such a batch syncs once per step."""
        steps = max(ks)
        rows = [r for r, p in enumerate(params) if not p.greedy]
        sampled = upload(rows, torch.int64, self.device) if rows else None
        history = None
        if any(p.repetition_penalty != 1.0 for p in params):
            history = [list(s.token_ids) for s in sessions]
        plan = None
        if steps > 1:
            # plan step j computes draft j (position n + j) of the rows that want draft j + 1
            starts = [s.num_tokens for s in sessions]
            plan = self.decoder.plan(starts, [k - 1 for k in ks], steps - 1, [s.block_table for s in sessions])
        choices, qs = [], []
        for j in range(steps):
            if j:
                if sampled is None and history is None:  # greedy: all the steps in one graph
                    looped = self.decoder.loop(plan, choices[0])
                    if looped is not None:
                        choices += looped.unbind(0)
                        break
                logits = self.decoder.step(plan, j - 1, choices[-1])
            choice, q = self._draw(logits, params, generators, sampled, history)
            choices.append(choice)
            qs.append(q)
            if history is not None:
                for h, t in zip(history, choice.tolist(), strict=True):
                    h.append(t)
        out = torch.stack(choices, dim=1).tolist()
        for s, k, row in zip(sessions, ks, out, strict=True):
            s.token_ids.extend(row[:k])
            s.num_computed_tokens = s.num_tokens - 1
        q_all = None
        if rows:  # [sampled rows, k_max, vocab]
            q_all = torch.stack(qs, dim=1)
        return out, q_all


def _default_num_pages(target: RunnerConfig, target_num_pages: int, mc: ModelConfig) -> int:
    """As many pages as the target's pool (the same tokens), or on GPU what half the free memory
    holds if less: the target's pool has taken its share of gpu_memory_utilization already."""
    pages = target_num_pages
    if target.device.type == "cuda":
        page_bytes = kv_page_bytes(mc, target.page_size, mc.num_kv_heads, target.kv_dtype)
        free, _ = torch.cuda.mem_get_info(target.device)
        pages = min(pages, int(free * 0.5 // page_bytes))
    return max(1, pages)
