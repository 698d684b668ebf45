"""One simulated replica for `kvfleet bench simulate`: its KV page pool and its engine, timed by a cost model.

Pages are ints, not hashes: `owner << OWNER_SHIFT | page index`, where the owner is a system
prompt (for pages wholly inside it, shared by every conversation on that prompt) or a
conversation (every later page: a conversation's token stream is fixed, so its page i is the same
chained hash in every turn). Equal keys are equal chains, as `kvstore.hashing` makes them.

`HeldPages` records which pages each replica holds, from its KV events: as they happen (exact,
what the oracle sees) or as the router's lagged copy of the index (value = expiry). It answers
"how many leading pages of this prompt does replica r hold" fast, caching each (replica, system
prompt) run until that owner's pages change on that replica or an entry of the run expires.

`ReplicaPages` is a replica's page pool: the engine's own `kvstore.page_pool.PagePool`, keyed by
these ints (a `PageHash` is an int too), driven as the scheduler drives it: look up the cached
prefix, acquire it, allocate the rest, commit full pages, free. So the simulated cache pins,
shares, evicts (least recently released first, a sequence's tail before its head) and emits KV
events exactly as a replica's does. A sequence allocates pages for its whole answer at admission,
so there is no preemption.

`Replica` is continuous batching with chunked prefill: each step carries one token of every
decoding sequence and up to `max_batched_tokens` of prefill (FIFO), admits waiting requests
while the batch has room and pages suffice, and lasts
`step_overhead_s + prefill_tokens * prefill_s_per_token + decoding_seqs * decode_s_per_seq`.
Runs of decode-only steps with an unchanged batch are simulated as one event (a new arrival
interrupts them at the next step boundary), so the cost is per request, not per token.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from itertools import repeat
from operator import rshift

from kvstore.page_pool import KVEventKind, PagePool

PAGE_SIZE = 16
OWNER_SHIFT = 20  # page index < 2**20: prompts up to 16M tokens
INF = float("inf")


@dataclass(frozen=True)
class CostModel:
    step_overhead_s: float = 0.006
    prefill_s_per_token: float = 50e-6
    decode_s_per_seq: float = 150e-6
    max_batch: int = 128
    max_batched_tokens: int = 8192
    pages_per_replica: int = 8192


class Request:
    """One turn of a conversation: its prompt is the system prompt, the history and a question."""

    __slots__ = (
        "answer_len", "arrival", "cached_tokens", "conv", "conv_owner", "e2e", "first_token", "id", "num_committed",
        "pages", "passed_over", "prefill_left", "prompt_len", "prompt_pages", "reason", "replica", "router",
        "sys_id", "sys_pages", "total_pages", "turn",
    )  # fmt: skip

    def __init__(self, rid, conv, turn, arrival, sys_id, sys_pages, conv_owner, prompt_len, answer_len):
        self.id, self.conv, self.turn, self.arrival = rid, conv, turn, arrival
        self.sys_id, self.sys_pages, self.conv_owner = sys_id, sys_pages, conv_owner
        self.prompt_len, self.answer_len = prompt_len, answer_len
        self.prompt_pages = prompt_len // PAGE_SIZE  # full pages: what the router can match
        self.total_pages = -(-(prompt_len + answer_len) // PAGE_SIZE)
        self.cached_tokens = self.prefill_left = self.num_committed = 0
        self.pages: list[int] = []  # its block table: page ids in the replica's pool, the first num_committed cached
        self.first_token = self.e2e = -1.0
        self.replica = self.router = -1
        self.reason = ""
        self.passed_over = False  # routed to a replica holding fewer of its leading pages than another

    def keys(self, start: int, stop: int) -> list[int]:
        """The keys of pages start..stop-1 of this request's token stream."""
        sp, sys_base, conv_base = self.sys_pages, self.sys_id << OWNER_SHIFT, self.conv_owner << OWNER_SHIFT
        if stop <= sp:
            return [sys_base | p for p in range(start, stop)]
        return [sys_base | p for p in range(start, sp)] + [conv_base | p for p in range(max(start, sp), stop)]


class HeldPages:
    """For every replica, the pages it holds (key -> refcount, or key -> expiry when `expiring`)."""

    def __init__(self, names: list[str], expiring: bool):
        self.names = names  # replica ids, as `matched` keys its answer (the policy's way)
        self.entries: list[dict[int, float]] = [{} for _ in names]
        self.expiring = expiring
        self.holders: dict[int, set[int]] = defaultdict(set)  # owner -> replicas with any of its pages
        self._count: dict[tuple[int, int], int] = defaultdict(int)
        self._version: dict[tuple[int, int], int] = defaultdict(int)  # (replica, owner): bumped on add/remove
        self._owner_version: dict[int, int] = defaultdict(int)
        self._runs: dict[tuple[int, int], tuple[int, int, float]] = {}
        self._levels: dict[int, tuple[int, float, dict[str, int], list[tuple[int, set[int]]]]] = {}

    def put(self, r: int, keys: list[int], value: float, new: bool = False) -> None:
        """Set r's entries for `keys` to `value`, adding those it lacks (all of them if `new`)."""
        entries = self.entries[r]
        added = keys if new else [key for key in keys if key not in entries]
        entries.update(dict.fromkeys(keys, value))
        if added:
            self._changed(r, added, 1)

    def remove(self, r: int, keys: list[int]) -> None:
        deque(map(self.entries[r].pop, keys), 0)
        self._changed(r, keys, -1)

    def _changed(self, r: int, keys: list[int], sign: int) -> None:
        for owner, n in Counter(map(rshift, keys, repeat(OWNER_SHIFT))).items():
            k = (r, owner)
            before = self._count[k]
            self._count[k] = before + sign * n
            if before == 0:
                self.holders[owner].add(r)
            elif before + sign * n == 0:
                self.holders[owner].discard(r)
            self._version[k] += 1
            self._owner_version[owner] += 1

    def _run(self, r: int, owner: int, start: int, stop: int, now: float) -> int:
        """Pages start, start+1, ... of `owner` held by r, up to the first missing one (or stop)."""
        entries, base, p = self.entries[r], owner << OWNER_SHIFT, start
        if self.expiring:
            while p < stop and entries.get(base | p, 0.0) > now:
                p += 1
        else:
            while p < stop and (base | p) in entries:
                p += 1
        return p - start

    def _sys_run(self, r: int, sys_id: int, sys_pages: int, now: float) -> int:
        k = (r, sys_id)
        cached = self._runs.get(k)
        if cached is not None and cached[0] == self._version[k] and now < cached[2]:
            return cached[1]
        run = self._run(r, sys_id, 0, sys_pages, now)
        base, entries = sys_id << OWNER_SHIFT, self.entries[r]
        until = min((entries[base | p] for p in range(run)), default=INF) if self.expiring else INF
        self._runs[k] = (self._version[k], run, until)
        return run

    def leading(self, r: int, req: Request, now: float) -> int:
        """How many leading full pages of req's prompt replica r holds."""
        sp = req.sys_pages
        run = self._sys_run(r, req.sys_id, sp, now) if sp else 0
        if run < sp:
            return run
        return sp + self._run(r, req.conv_owner, sp, req.prompt_pages, now)

    def matched(self, req: Request, now: float) -> tuple[dict[str, int], list[tuple[int, set[int]]]]:
        """{replica id: leading pages held} for every holder, and the holders (indexes) grouped by that
        count, most pages first. The system prompt's part is cached until its pages change anywhere."""
        s, sp = req.sys_id, req.sys_pages
        cached = self._levels.get(s)
        if cached is None or cached[0] != self._owner_version[s] or now >= cached[1]:
            runs: dict[str, int] = {}
            by_count: dict[int, set[int]] = defaultdict(set)
            until = INF
            for r in self.holders.get(s, ()) if sp else ():
                if n := self._sys_run(r, s, sp, now):
                    runs[self.names[r]] = n
                    by_count[n].add(r)
                    until = min(until, self._runs[(r, s)][2])
            cached = (self._owner_version[s], until, runs, sorted(by_count.items(), reverse=True))
            self._levels[s] = cached
        held, levels = cached[2], cached[3]
        conv_holders = self.holders.get(req.conv_owner)
        if not conv_holders:
            return held, levels
        held = dict(held)
        extra: dict[int, set[int]] = defaultdict(set)
        for r in conv_holders:
            if held.get(self.names[r], 0) == sp and (n := self._run(r, req.conv_owner, sp, req.prompt_pages, now)):
                held[self.names[r]] = sp + n
                extra[sp + n].add(r)
        return held, sorted(extra.items(), reverse=True) + levels


class ReplicaPages:
    """One replica's KV pages: the engine's own `kvstore.page_pool.PagePool` (page ids, refcounts, the
    LRU prefix cache, KV events), driven per request as the engine's scheduler drives it. Its events go
    to `held` at once (the exact view: stored and removed pages) and to `emit(kind, replica, keys)`."""

    def __init__(self, replica: int, num_pages: int, held: HeldPages, emit=None):
        self.replica, self.num_pages, self.held, self.emit = replica, num_pages, held, emit
        self.pool = PagePool(num_pages, PAGE_SIZE)

    @property
    def num_free_pages(self) -> int:  # cached-but-unreferenced pages count as free: reusable at once
        return self.pool.num_free_pages

    @property
    def lru(self) -> list[int]:
        """Cached keys nobody holds: the pages eviction may take."""
        pool = self.pool
        return [h for p, h in enumerate(pool.page_hash) if h is not None and not pool.ref_counts[p]]

    @property
    def num_anon(self) -> int:
        """Pages held by running sequences and not (yet) cached."""
        pool = self.pool
        return sum(1 for p in range(self.num_pages) if pool.ref_counts[p] and pool.page_hash[p] is None)

    def admit(self, req: Request, now: float) -> bool:
        """Take req's cached leading pages and allocate the rest of its pages, if they fit."""
        pool = self.pool
        cached = pool.lookup_prefix(req.keys(0, req.prompt_pages))
        if len(cached) * PAGE_SIZE >= req.prompt_len:
            cached.pop()  # a fully cached prompt recomputes its last page, for the logits
        need = req.total_pages - len(cached)
        if pool.num_free_pages - pool.num_pages_to_acquire(cached) < need:
            return False
        pool.acquire(cached)
        req.pages = cached + pool.allocate(need)
        req.num_committed = len(cached)
        req.cached_tokens = len(cached) * PAGE_SIZE
        self._publish()
        return True

    def commit(self, req: Request, upto: int) -> None:
        """Cache req's full pages up to `upto`; a page cached already is shared and the copy freed."""
        done = req.num_committed
        if upto <= done:
            return
        pages = req.pages[done:upto]
        self.pool.commit(pages, req.keys(done, upto))
        req.pages[done:upto] = pages
        req.num_committed = upto
        self._publish()

    def release(self, req: Request) -> None:
        self.pool.free(req.pages)  # tail first: a sequence's head outlives its tail in the cache
        req.pages = []

    def _publish(self) -> None:
        for event in self.pool.take_events():
            keys = list(event.hashes)
            if event.kind == KVEventKind.STORED:
                self.held.put(self.replica, keys, 1, new=True)
            elif event.kind == KVEventKind.REMOVED:
                self.held.remove(self.replica, keys)
            if self.emit:
                self.emit(event.kind, self.replica, keys)


IDLE, STEP, DECODE_RUN = 0, 1, 2


class Replica:
    """An engine: `submit` a request; `sim.wake_at(t, self, version)` schedules its next step end and
    `sim.first_token(req, t)` / `sim.finished(req, t)` report progress."""

    def __init__(self, index: int, cost: CostModel, pool: ReplicaPages, sim):
        self.index, self.cost, self.pool, self.sim = index, cost, pool, sim
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[tuple[int, int, Request]] = []  # heap of (decode clock at its last token, id, req)
        self.clock = 0  # decode steps run so far
        self.state, self.version = IDLE, 0
        self.chunks: list[tuple[Request, int]] = []
        self.step_decodes = 0
        self.run_start = self.run_step = 0.0
        self.run_steps = 0

    def submit(self, req: Request, now: float) -> None:
        self.waiting.append(req)
        if self.state == IDLE:
            self._plan(now)
        elif self.state == DECODE_RUN and len(self.prefilling) + len(self.decoding) < self.cost.max_batch:
            done = math.ceil((now - self.run_start) / self.run_step - 1e-9)  # the step under way completes
            if done < self.run_steps:
                self.clock += max(done, 0)
                self.version += 1
                self.state, self.chunks, self.step_decodes = STEP, [], 0
                self.sim.wake_at(self.run_start + max(done, 0) * self.run_step, self, self.version)

    def wake(self, now: float, version: int) -> None:
        if version != self.version:
            return
        if self.state == STEP:
            if self.step_decodes:
                self.clock += 1
            for req, n in self.chunks:
                req.prefill_left -= n
                if req.prefill_left == 0:
                    self.prefilling.remove(req)
                    self.pool.commit(req, req.prompt_pages)
                    self.sim.first_token(req, now)
                    if req.answer_len <= 1:
                        self._finish(req, now)
                    else:
                        heapq.heappush(self.decoding, (self.clock + req.answer_len - 1, req.id, req))
        elif self.state == DECODE_RUN:
            self.clock += self.run_steps
        while self.decoding and self.decoding[0][0] <= self.clock:
            self._finish(heapq.heappop(self.decoding)[2], now)
        self._plan(now)

    def _finish(self, req: Request, now: float) -> None:
        self.pool.commit(req, (req.prompt_len + req.answer_len) // PAGE_SIZE)
        self.pool.release(req)
        self.sim.finished(req, now)

    def _plan(self, now: float) -> None:
        cost = self.cost
        while self.waiting and len(self.prefilling) + len(self.decoding) < cost.max_batch:
            req = self.waiting[0]
            if not self.pool.admit(req, now):
                break  # first come, first served: the head waits for pages
            self.waiting.popleft()
            req.prefill_left = req.prompt_len - req.cached_tokens
            self.prefilling.append(req)
        decodes = len(self.decoding)
        self.version += 1
        if self.prefilling:
            budget, chunks = cost.max_batched_tokens - decodes, []
            for req in self.prefilling:
                if budget <= 0:
                    break
                n = min(req.prefill_left, budget)
                chunks.append((req, n))
                budget -= n
            tokens = cost.max_batched_tokens - decodes - budget
            self.state, self.chunks, self.step_decodes = STEP, chunks, decodes
            step = cost.step_overhead_s + tokens * cost.prefill_s_per_token + decodes * cost.decode_s_per_seq
            self.sim.wake_at(now + step, self, self.version)
        elif decodes:
            self.state, self.run_start = DECODE_RUN, now
            self.run_step = cost.step_overhead_s + decodes * cost.decode_s_per_seq
            self.run_steps = self.decoding[0][0] - self.clock
            self.sim.wake_at(now + self.run_steps * self.run_step, self, self.version)
        else:
            self.state = IDLE
