"""Ray Serve request routers: prefix-aware (kvfleet's) and round-robin (a baseline) for TargetWorkers,
and the sticky prefix-aware router for DraftWorkers.

`PrefixAwareRouter` runs inside every DeploymentHandle that routes to TargetWorkers (the ingress
replicas hold them). For each request it reads the prompt's page hashes from the call's
`page_hashes` keyword (the ingress computes them once), asks the shared page index in ONE round
trip how many leading pages each candidate replica holds (on its device, then in its host tier;
with each replica's heartbeat), and lets
`router.policy.choose` weigh that against load. Load is Serve's own count of requests in flight on
each replica (its queue-length cache: fresh, updated as this handle sends requests), else the
replica's last heartbeat. The predicted-TTFT rule also gets each replica's measured prefill rate and
per-sequence decode cost (router/rates.py, from the `EngineStats` that Serve polls from every replica
as its routing stats every `routing_stats_period_s`: no extra Redis round trip) and this router's
estimate of the prompt tokens it sent there not yet computed. The chosen replica comes first; the
others follow least loaded first, so Serve falls back to them if the chosen one refuses (its
`max_ongoing_requests` is reached).

A prompt's pages reach the index only once computed: until then the router counts the pages of
prompts it sent in the last `recent_route_ttl_s` as held by the replica it sent them to
(router/recent.py), so a second request with a new prefix follows the first to the replica
computing it instead of computing it again elsewhere.

Every router process reads the same index, so every ingress replica makes the same choice for
the same prompt (once the index knows it: the recent routes are each router's own). If the index
does not answer (Redis down or slower than its timeout) the router routes by load alone (reason
FALLBACK) and counts it; it never fails a request for that.

`StickyPrefixRouter` routes proposal calls to DraftWorkers (initialised with the DRAFT model's id,
under which the draft replicas publish their pages): a call that names a replica in its
`draft_replica` keyword goes there while that replica is a candidate (the target pins each
sequence to the replica holding its draft KV: workers/spec/draft_client.py); any other call is routed
by its `page_hashes` like a request to TargetWorkers.

A call to TargetWorkers that names a replica in its `pin_replica` keyword (a pull's
`export_pages`: workers/transfer.py) goes to that replica while it is a candidate, under either router.
"""

from __future__ import annotations

import logging
import random
import time
from itertools import count
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from kvstore.index import AsyncPageIndex, IndexConfig, ReplicaMatch
from router.policy import ReplicaView, RoutingConfig, choose
from router.rates import PrefillBacklog, ReplicaRates
from router.recent import RecentRoutes

logger = logging.getLogger(__name__)

PAGE_HASHES_KWARG = "page_hashes"
DRAFT_REPLICA_KWARG = "draft_replica"  # DraftWorker.propose's keyword: the replica a call is pinned to
PIN_REPLICA_KWARG = "pin_replica"  # TargetWorker.export_pages's keyword: a pull asks that replica (workers/transfer.py)


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self,
        index: dict[str, Any] | None = None,
        model_id: str = "",
        routing: dict | None = None,
        page_size: int = 16,
    ):
        self._index_config = IndexConfig.model_validate(index) if index is not None else None
        self._model_id = model_id
        self._config = RoutingConfig.model_validate(routing or {})
        self._page_size = page_size
        self._index: AsyncPageIndex | None = None
        self._rng = random.Random()
        self._metrics = None
        self._recent = RecentRoutes(self._config.recent_route_ttl_s)
        self._rates = ReplicaRates(self._config.rate_ewma_weight, self._config.rate_max_age_s)
        self._backlog = PrefillBacklog()
        self._decisions = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        pinned = _pinned(candidate_replicas, pending_request, PIN_REPLICA_KWARG)
        if pinned is not None:
            return pinned
        try:
            return await self._choose(candidate_replicas, pending_request)
        except Exception:
            # Serve would retry a raising router forever and the request would hang: route by
            # load instead, and say so.
            logger.exception("prefix-aware routing failed; routing this request by load")
            return [[r] for r in sorted(candidate_replicas, key=lambda r: self._view(r, None).load)]

    async def _choose(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        hashes = pending_request.kwargs.get(PAGE_HASHES_KWARG) if pending_request is not None else None
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        metrics = self._ensure_metrics()
        matches: dict[str, ReplicaMatch] | None = None
        if hashes and self._index_config is not None:
            index = self._ensure_index()
            t0 = time.perf_counter()
            malformed = index.metrics.malformed
            matches = await index.try_lookup_with_load(hashes, ids, with_tiers=True)
            if index.metrics.malformed > malformed:
                metrics.index_malformed_entries.inc(index.metrics.malformed - malformed)
            if matches is None:
                metrics.index_lookup_failures.inc()
            else:
                metrics.index_lookup_latency.observe(time.perf_counter() - t0)
        now = time.monotonic()
        views = [self._view(r, (matches or {}).get(rid), now) for r, rid in zip(candidate_replicas, ids, strict=True)]
        matched = None if matches is None else {rid: m.matched_pages for rid, m in matches.items()}
        host = None if matches is None else {rid: m.host_pages for rid, m in matches.items() if m.host_pages}
        if not hashes:
            matched = {}  # nothing to match (a prompt shorter than a page): route by load
        elif matched is not None:
            matched, host = with_recent(matched, host or {}, self._recent.leading(hashes))
        prompt = _prompt_tokens(pending_request)
        decision = choose(views, matched, self._config, self._rng, host, prompt, self._page_size)
        if hashes:
            self._recent.record(hashes, decision.replica_id)
        if decision.predicted_ttft_s is not None:
            self._backlog.add(decision.replica_id, decision.uncached_tokens, now, decision.prefill_tokens_s)
            metrics.predicted_ttft.observe(decision.predicted_ttft_s)
        self._decisions += 1
        if self._decisions % 1024 == 0:  # replicas that have gone leave the tables
            self._rates.forget(set(ids))
            self._backlog.forget(set(ids))
        metrics.decisions.inc(1, {"reason": decision.reason.value if hashes else "no_hashes"})
        if decision.matched_pages:
            metrics.matched_pages.inc(decision.matched_pages)
        by_id = dict(zip(ids, candidate_replicas, strict=True))
        chosen = by_id[decision.replica_id]
        rest = sorted((v for v in views if v.replica_id != decision.replica_id), key=lambda v: v.load)
        return [[chosen]] + [[by_id[v.replica_id]] for v in rest]

    # ------------------------------------------------------------------ internals
    def _view(self, replica: RunningReplica, match: ReplicaMatch | None, now: float | None = None) -> ReplicaView:
        """The replica's load (Serve's in-flight count, else its heartbeat's), free pages (its
        heartbeat's) and, with `now`, its measured rates (from the routing stats Serve polls from it)
        and this router's estimate of its prefill backlog."""
        rid = replica.replica_id.unique_id
        in_flight = self.replica_queue_len_cache.get(replica.replica_id)
        load, free, total = float(in_flight or 0), 0, 0
        if match is not None:
            heartbeat = match.load.num_waiting + match.load.num_running
            load = float(in_flight if in_flight is not None else heartbeat)
            free, total = match.load.num_free_pages, match.load.num_total_pages
        if now is None:
            return ReplicaView(rid, load, free, total)
        measured = self._rates.observe(rid, replica.routing_stats, now)
        prefill, cost = self._rates.rates(rid, now)
        if measured:
            metrics = self._ensure_metrics()
            if prefill is not None:
                metrics.prefill_rate.set(prefill, {"replica": rid})
            if cost is not None:
                metrics.request_cost.set(cost, {"replica": rid})
        backlog = self._backlog.pending(rid, now, prefill or self._config.default_prefill_tokens_s)
        return ReplicaView(rid, load, free, total, prefill, cost, backlog)

    def _ensure_index(self) -> AsyncPageIndex:
        if self._index is None:  # created on the router's event loop, which its connections belong to
            self._index = AsyncPageIndex(self._index_config, self._model_id)
        return self._index

    def _ensure_metrics(self):
        if self._metrics is None:
            from router.metrics import RouterMetrics

            self._metrics = RouterMetrics(self._model_id)
        return self._metrics


class StickyPrefixRouter(PrefixAwareRouter):
    def initialize_state(self, **kwargs):
        super().initialize_state(**kwargs)
        # A proposal call is a few tokens on a sequence the draft already holds: affinity is all
        # that matters, so drafts keep the spill rule.
        self._config = self._config.model_copy(update={"rule": "spill"})

    async def _choose(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        pin = pending_request.kwargs.get(DRAFT_REPLICA_KWARG) if pending_request is not None else None
        if pin:
            pinned = next((r for r in candidate_replicas if r.replica_id.unique_id == pin), None)
            if pinned is not None:
                # The others follow least loaded first: Serve falls back to them only if the
                # pinned replica refuses (its max_ongoing_requests reached).
                rest = sorted(
                    (r for r in candidate_replicas if r is not pinned), key=lambda r: self._view(r, None).load
                )
                return [[pinned]] + [[r] for r in rest]
            # the replica has gone: route as a new sequence (the draft client counts the move)
        return await super()._choose(candidate_replicas, pending_request)


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Each request to the next replica in turn (a baseline for `kvfleet bench serve --compare`)."""

    def initialize_state(self, **_):
        self._next = count()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        pinned = _pinned(candidate_replicas, pending_request, PIN_REPLICA_KWARG)
        if pinned is not None:
            return pinned
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self._next) % len(ordered)
        return [[r] for r in ordered[i:] + ordered[:i]]


def _prompt_tokens(pending_request: PendingRequest | None) -> int | None:
    """The prompt's length, from the call's first argument when it is a `GenerateRequest`."""
    if pending_request is None or not pending_request.args:
        return None
    ids = getattr(pending_request.args[0], "prompt_token_ids", None)
    return len(ids) if ids is not None else None


def with_recent(
    matched: dict[str, int], host: dict[str, int], recent: dict[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """The index's answer (device run, host-tier continuation), where a replica was sent a longer
    leading run of the prompt's pages a moment ago (router/recent.py) counting that run as held on
    its device: it is computing them, or has and not yet published them."""
    matched, host = dict(matched), dict(host)
    for r, n in recent.items():
        if n > matched.get(r, 0) + host.get(r, 0):
            matched[r], host[r] = n, 0
    return matched, {r: n for r, n in host.items() if n}


def _pinned(
    candidates: list[RunningReplica], pending_request: PendingRequest | None, kwarg: str
) -> list[list[RunningReplica]] | None:
    """Only the replica a call names in `kwarg` (Serve waits for it rather than send the call
    elsewhere); None when the call names none or that replica is not a candidate (gone: the call
    is routed as any other, and the caller sees who answered)."""
    pin = pending_request.kwargs.get(kwarg) if pending_request is not None else None
    if not pin:
        return None
    first = next((r for r in candidates if r.replica_id.unique_id == pin), None)
    if first is None:
        return None
    return [[first]]
