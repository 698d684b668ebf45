"""The simulated cluster of `kvfleet bench simulate`: the routing policy driving a discrete-event simulation, no GPUs.

A seeded workload of conversations that share prefixes (`cluster.bench.sim_workload`) is routed to N
simulated replicas (`cluster.bench.sim_replica`: the engine's own page pool, `kvstore.page_pool`, and an
engine timed by a cost model), spread over `routers` router processes, by one of these policies:

- `prefix_aware`: `router.policy.choose` as `router/prefix_router.py` calls it. Leading pages held
  come from a lagged copy of the page index: each replica's KV events land `index_lag_s` after they
  happen; entries expire `index_ttl_s` after they were last stored or hit. Free pages are as of the
  replica's last heartbeat (every `heartbeat_s`). Loads are each router's own view (`load_view`):
  `serve`, Ray Serve's queue-length cache, which prefix_router.py reads: exact whenever this router
  sends the replica a request (the replica's accept answer carries its count), then -1 for each of
  this router's requests that finishes, and the heartbeat once the entry is `queue_len_cache_s`
  old; `heartbeat`, the last heartbeat plus this router's sends and completions since; `freshest`,
  both (each heartbeat and each send resets it);
- `oracle`: the same `choose`, but with every replica's exact cache contents, load and free pages;
- `round_robin`, `power_of_two` (two random replicas, the less loaded in the router's view),
  `least_loaded` (in the router's view, ties at random).

`choose` gets, by default, only the candidates that can win: the least-loaded replicas and, for
the most pages held that some eligible holder holds, those of its eligible holders that are least
loaded. The pruning mirrors the eligibility rule of `router/policy.py`, so the decisions are those
of the full candidate list, random tie-breaks included (`full_candidates=True` passes every
replica; a test checks that they agree); it makes a decision at 1,024 replicas cost O(holders),
not ~1 ms.

Measured: the requests that arrive between `warmup_s` and `duration_s` (loads are averaged over
the same window). Arrivals, steps and completions are exact under the cost model; there is no
network delay, no preemption (a request reserves pages for its whole answer) and no failure.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from cluster.bench.sim_replica import PAGE_SIZE, CostModel, HeldPages, Replica, ReplicaPages, Request
from cluster.bench.sim_workload import Conversation, Workload, make_conversations
from cluster.bench.stats import percentile
from router.policy import ReplicaView, RoutingConfig, choose, load_limit, short_of_pages

POLICIES = ("prefix_aware", "oracle", "round_robin", "power_of_two", "least_loaded")
LOAD_VIEWS = ("serve", "heartbeat", "freshest")


@dataclass(frozen=True)
class SimParams:
    replicas: int = 256
    policy: str = "prefix_aware"
    workload: Workload = field(default_factory=Workload)
    cost: CostModel = field(default_factory=CostModel)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    routers: int = 4
    load_view: str = "serve"  # how a router knows loads (LOAD_VIEWS; see above)
    queue_len_cache_s: float = 10.0  # Serve's RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S
    index_lag_s: float = 0.1
    index_ttl_s: float = 300.0
    heartbeat_s: float = 1.0
    seed: int = 0
    full_candidates: bool = False


@dataclass
class Report:
    policy: str
    replicas: int
    requests: int
    hit_rate: float  # cached prompt tokens / prompt tokens
    ttft_mean: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    requests_per_s: float
    output_tokens_per_s: float
    mean_load: float  # time-averaged requests in flight per replica
    max_load_ratio: float  # the most loaded replica's time-averaged load / the mean
    max_served_ratio: float  # the most requests one replica served / the mean
    measured_s: float  # the window measured: from warmup_s to duration_s
    wall_s: float
    reasons: dict[str, int]
    passed_over: int  # decisions for a replica holding fewer of the prompt's pages than another did (router's view)


class LoadBook:
    """Each replica's load as one router sees it, with the least-loaded ones kept at hand."""

    def __init__(self, n: int):
        self.load = [0] * n
        self.buckets: dict[int, set[int]] = {0: set(range(n))}
        self.min = 0

    def set(self, i: int, value: int) -> None:
        old = self.load[i]
        if value == old:
            return
        bucket = self.buckets[old]
        bucket.discard(i)
        if not bucket:
            del self.buckets[old]
        self.load[i] = value
        self.buckets.setdefault(value, set()).add(i)
        if value < self.min:
            self.min = value
        elif old == self.min and old not in self.buckets:
            self.min = min(self.buckets)

    def add(self, i: int, delta: int) -> None:
        self.set(i, self.load[i] + delta)

    def least_loaded(self) -> list[int]:
        return sorted(self.buckets[self.min])


ARRIVE, WAKE, HEARTBEAT = 0, 1, 2


class _Simulation:
    def __init__(self, params: SimParams):
        if params.policy not in POLICIES:
            raise ValueError(f"unknown policy {params.policy!r}: choose from {', '.join(POLICIES)}")
        if params.replicas < 2 or params.routers < 1:
            raise ValueError("a simulation needs at least 2 replicas and 1 router")
        self.p, n, cost, w = params, params.replicas, params.cost, params.workload
        if w.users is None and w.warmup_s >= w.duration_s:
            raise ValueError(f"--warmup-s ({w.warmup_s}) must be shorter than --duration-s ({w.duration_s})")
        self.convs = make_conversations(w, params.replicas, params.seed)
        if not self.convs:
            raise ValueError("the workload is empty: raise --duration-s, --rate or --users")
        longest = max(c.sys_len + sum(c.questions) + sum(c.answers) for c in self.convs)
        if -(-longest // PAGE_SIZE) > cost.pages_per_replica:
            raise ValueError(
                f"the longest conversation needs {-(-longest // PAGE_SIZE)} pages, more than a replica's "
                f"{cost.pages_per_replica}: raise --pages-per-replica or shorten the workload"
            )
        if cost.max_batched_tokens <= cost.max_batch:
            raise ValueError("--max-batched-tokens must exceed --max-batch (decodes take one token each)")
        self.names = [f"r{i}" for i in range(n)]
        self.index_of = {name: i for i, name in enumerate(self.names)}
        self.cached = HeldPages(self.names, expiring=False)
        self.index = HeldPages(self.names, expiring=True) if params.policy == "prefix_aware" else None
        self.events: deque = deque()
        emit = self._emit if self.index is not None else None
        self.pools = [ReplicaPages(i, cost.pages_per_replica, self.cached, emit) for i in range(n)]
        self.replicas = [Replica(i, cost, self.pools[i], self) for i in range(n)]
        if params.load_view not in LOAD_VIEWS:
            raise ValueError(f"unknown load view {params.load_view!r}: choose from {', '.join(LOAD_VIEWS)}")
        self.books = [LoadBook(n) for _ in range(params.routers)]
        self.contact = [[-float("inf")] * n for _ in range(params.routers)]  # a router's last news of a replica
        self.exact = LoadBook(n)
        self.hb_free = [cost.pages_per_replica] * n
        self.rng = random.Random(params.seed + 1)
        self.rr = [self.rng.randrange(n) for _ in range(params.routers)]
        self.heap: list = []
        self.seq = self.num_requests = 0
        self.now = 0.0
        self.area, self.last = [0.0] * n, [0.0] * n
        self.served = [0] * n
        self.done: list[Request] = []
        self.pending = 0  # requests arrived or due, not finished
        self.cutoff = params.workload.duration_s if params.workload.users is None else float("inf")
        self.window = (params.workload.warmup_s, self.cutoff)
        self.num_sys = params.workload.system_prompts

    # ------------------------------------------------------------- the event loop
    def _push(self, t: float, kind: int, a, b=None) -> None:
        self.seq += 1
        self.pending += kind == ARRIVE
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def wake_at(self, t: float, replica: Replica, version: int) -> None:
        self._push(t, WAKE, replica, version)

    def run(self) -> list[Request]:
        for c in self.convs:
            self._push(c.start, ARRIVE, self._request(c, 0, c.start))
        for i in range(self.p.replicas):
            self._push(self.rng.uniform(0, self.p.heartbeat_s), HEARTBEAT, i)
        while self.heap:
            t, _, kind, a, b = heapq.heappop(self.heap)
            self.now = t
            if kind == WAKE:
                a.wake(t, b)
            elif kind == ARRIVE:
                self._route(a, t)
            elif self.pending:
                self._heartbeat(a)
                self._push(t + self.p.heartbeat_s, HEARTBEAT, a)
        return self.done

    def _request(self, c: Conversation, turn: int, t: float) -> Request:
        ctx = c.sys_len + sum(c.questions[:turn]) + sum(c.answers[:turn])
        self.num_requests += 1
        return Request(
            self.num_requests, c.id, turn, t, c.sys_id, c.sys_len // PAGE_SIZE, self.num_sys + c.id,
            ctx + c.questions[turn], c.answers[turn],
        )  # fmt: skip

    def _heartbeat(self, i: int) -> None:
        stale = self.now - self.p.queue_len_cache_s
        for book, contact in zip(self.books, self.contact, strict=True):
            if self.p.load_view != "serve" or contact[i] < stale:
                book.set(i, self.exact.load[i])
        self.hb_free[i] = self.pools[i].num_free_pages

    def _news(self, r: int, i: int, delta: int) -> None:
        """Router r sent replica i a request (+1) or saw one finish (-1)."""
        if self.p.load_view == "heartbeat":
            self.books[r].add(i, delta)  # the last heartbeat, plus what this router did since
        elif delta > 0:  # Serve: the replica's answer to the send carries its exact count
            self.books[r].set(i, self.exact.load[i])
            self.contact[r][i] = self.now
        elif self.p.load_view == "freshest" or self.contact[r][i] >= self.now - self.p.queue_len_cache_s:
            self.books[r].add(i, -1)  # a cache entry that has expired is not decremented
            self.contact[r][i] = self.now

    def _in_flight(self, i: int, delta: int) -> None:
        start, end = self.window
        overlap = min(self.now, end) - max(self.last[i], start)
        if overlap > 0:
            self.area[i] += self.exact.load[i] * overlap
        self.last[i] = self.now
        self.exact.add(i, delta)

    def first_token(self, req: Request, t: float) -> None:
        req.first_token = t - req.arrival

    def finished(self, req: Request, t: float) -> None:
        req.e2e = t - req.arrival
        self._in_flight(req.replica, -1)
        if self.p.policy != "oracle":
            self._news(req.router, req.replica, -1)
        self.done.append(req)
        self.pending -= 1
        c = self.convs[req.conv]
        if req.turn + 1 < len(c.questions) and (nxt := t + c.thinks[req.turn]) <= self.cutoff:
            self._push(nxt, ARRIVE, self._request(c, req.turn + 1, nxt))

    # ------------------------------------------------------------- the index and the routers
    def _emit(self, kind: str, replica: int, keys) -> None:
        self.events.append((self.now + self.p.index_lag_s, kind, replica, keys))

    def _apply_index_events(self, t: float) -> None:
        events, index, ttl = self.events, self.index, self.p.index_ttl_s
        while events and events[0][0] <= t:
            at, kind, r, keys = events.popleft()
            if kind == "removed":
                entries = index.entries[r]
                index.remove(r, [key for key in keys if key in entries])
            elif kind == "touched":  # a hit restarts the entries' TTL (its pages were stored, not removed)
                index.entries[r].update(dict.fromkeys(keys, at + ttl))
            else:
                index.put(r, keys, at + ttl)

    def _route(self, req: Request, t: float) -> None:
        policy, n = self.p.policy, self.p.replicas
        req.router = r = self.rng.randrange(self.p.routers)
        book = self.exact if policy == "oracle" else self.books[r]
        if policy == "prefix_aware":
            self._apply_index_events(t)
            i = self._choose(req, book, self.index, self.hb_free.__getitem__, t)
        elif policy == "oracle":
            i = self._choose(req, book, self.cached, lambda i: self.pools[i].num_free_pages, t)
        elif policy == "round_robin":
            i, self.rr[r] = self.rr[r] % n, self.rr[r] + 1
        elif policy == "power_of_two":
            a, b = self.rng.sample(range(n), 2)
            la, lb = book.load[a], book.load[b]
            i = a if la < lb else b if lb < la else self.rng.choice((a, b))
        else:
            i = self.rng.choice(book.least_loaded())
        req.replica = i
        if not req.reason:
            req.reason = policy
        self._in_flight(i, 1)
        if policy != "oracle":
            self._news(r, i, 1)
        if self.window[0] <= t <= self.window[1]:
            self.served[i] += 1
        self.replicas[i].submit(req, t)

    def _choose(self, req: Request, book: LoadBook, held_pages: HeldPages, free_of, t: float) -> int:
        cfg, total = self.p.routing, self.p.cost.pages_per_replica
        held, levels = held_pages.matched(req, t)
        cost = self.p.cost
        if cfg.rule != "spill":
            # The predicted-TTFT rule weighs every candidate (no pruning), with the cost model's
            # rates as a router would measure them; no backlog estimate (the load carries it here).
            rates = (1 / cost.prefill_s_per_token, cost.decode_s_per_seq + cost.step_overhead_s / cost.max_batch)
            views = [
                ReplicaView(self.names[i], book.load[i], free_of(i), total, *rates) for i in range(self.p.replicas)
            ]
            decision = choose(views, held, cfg, self.rng, prompt_tokens=req.prompt_len, page_size=PAGE_SIZE)
            req.reason = decision.reason.value
            req.passed_over = decision.matched_pages < max(held.values(), default=0)
            return self.index_of[decision.replica_id]
        if self.p.full_candidates:
            picked = range(self.p.replicas)
        else:
            # The least loaded always stay eligible; beyond them only the least-loaded eligible holders
            # of the longest prefix that has any can win (router/policy.py's rule 1 and 2).
            lowest = book.min
            limit = load_limit(lowest, cfg)
            picked = set(book.buckets[lowest])
            loads = sorted(v for v in book.buckets if v <= limit)
            for count, members in levels:
                if count < cfg.min_matched_pages:
                    break
                for v in loads:
                    hit = book.buckets[v] & members
                    if v > lowest:
                        hit = {i for i in hit if not short_of_pages(free_of(i), total, cfg)}
                    if hit:
                        picked |= hit
                        break
                else:
                    continue
                break
            picked = sorted(picked)
        views = [ReplicaView(self.names[i], book.load[i], free_of(i), total) for i in picked]
        decision = choose(views, held, cfg, self.rng)
        req.reason = decision.reason.value
        req.passed_over = decision.matched_pages < max(held.values(), default=0)
        return self.index_of[decision.replica_id]


def simulate(params: SimParams) -> Report:
    """One policy on one cluster size: route the workload, run it to the end, measure."""
    started = time.perf_counter()
    sim = _Simulation(params)
    sim.run()
    for i in range(params.replicas):
        sim._in_flight(i, 0)  # close the load integrals
    start, end = sim.window[0], min(sim.window[1], sim.now)
    span = max(end - start, 1e-9)
    done = [r for r in sim.done if start <= r.arrival <= end]
    loads = [a / span for a in sim.area]
    mean_load = sum(loads) / len(loads)
    ttft = sorted(r.first_token for r in done)
    e2e = sorted(r.e2e for r in done)
    prompt = sum(r.prompt_len for r in done)
    return Report(
        policy=params.policy,
        replicas=params.replicas,
        requests=len(done),
        hit_rate=sum(r.cached_tokens for r in done) / prompt,
        ttft_mean=sum(ttft) / len(ttft),
        ttft_p50=percentile(ttft, 0.5),
        ttft_p90=percentile(ttft, 0.9),
        ttft_p99=percentile(ttft, 0.99),
        e2e_p50=percentile(e2e, 0.5),
        e2e_p99=percentile(e2e, 0.99),
        requests_per_s=len(done) / span,
        output_tokens_per_s=sum(r.answer_len for r in done) / span,
        mean_load=mean_load,
        max_load_ratio=max(loads) / mean_load if mean_load else 0.0,
        max_served_ratio=max(sim.served) / (sum(sim.served) / len(sim.served)),
        measured_s=span,
        wall_s=time.perf_counter() - started,
        reasons=dict(sorted(Counter(r.reason for r in done).items())),
        passed_over=sum(r.passed_over for r in done),
    )
