"""kvfleet's metrics, as `ray.util.metrics`: Ray exports them to Prometheus and the Ray dashboard's
metrics view shows them (names are prefixed `ray_` there, e.g. `ray_kvfleet_requests_total`).

Three groups: `IngressMetrics` (what a client sees: outcomes, latencies and tokens of requests),
`RouterMetrics` (routing decisions and page-index lookups, in every process that routes to
workers) and `WorkerMetrics` (what a worker group holds: queue, running sequences, KV pages,
prefix-cache hits, page-index publishing, speculation and draft calls). Every series is tagged
with the model; worker series with the replica too. Metrics are created once per process (Ray registers them by name).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

# Seconds. Fine at the low end (a token on a GPU takes milliseconds), coarse at the high end.
_LATENCY_BOUNDARIES = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
]  # fmt: skip


class IngressMetrics:
    def __init__(self, model_id: str):
        tags = {"model": model_id}
        self.requests = Counter(
            "kvfleet_requests_total",
            description="Generate requests by outcome (ok, cancelled, invalid_argument, not_found, "
            "resource_exhausted, unavailable, internal).",
            tag_keys=("model", "outcome"),
        )
        self.requests.set_default_tags(tags)
        self.ttft = Histogram(
            "kvfleet_time_to_first_token_seconds",
            description="From the request's arrival at the ingress to its first token.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.ttft.set_default_tags(tags)
        self.tpot = Histogram(
            "kvfleet_time_per_output_token_seconds",
            description="Mean time between output tokens after the first, per request.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.tpot.set_default_tags(tags)
        self.e2e = Histogram(
            "kvfleet_e2e_latency_seconds",
            description="From the request's arrival at the ingress to its last message.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.e2e.set_default_tags(tags)
        self.prompt_tokens = Counter("kvfleet_prompt_tokens_total", "Prompt tokens of finished requests.", ("model",))
        self.prompt_tokens.set_default_tags(tags)
        self.cached_prompt_tokens = Counter(
            "kvfleet_cached_prompt_tokens_total", "Prompt tokens served from a prefix cache.", ("model",)
        )
        self.cached_prompt_tokens.set_default_tags(tags)
        self.completion_tokens = Counter("kvfleet_completion_tokens_total", "Generated tokens.", ("model",))
        self.completion_tokens.set_default_tags(tags)

    def finished(
        self,
        outcome: str,
        arrival: float,
        first: float | None,
        last: float,
        completion_tokens: int,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> None:
        """One request's end. Token counts: what it generated (also when cut short), and its prompt's
        (known once it finished in the engine; 0 otherwise)."""
        self.requests.inc(1, {"outcome": outcome})
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if cached_prompt_tokens:
            self.cached_prompt_tokens.inc(cached_prompt_tokens)
        if first is None:
            return
        self.ttft.observe(first - arrival)
        self.e2e.observe(last - arrival)
        if completion_tokens > 1:
            self.tpot.observe((last - first) / (completion_tokens - 1))


class RouterMetrics:
    """Recorded by the prefix-aware request router, in every process holding a handle to workers."""

    def __init__(self, model_id: str):
        tags = {"model": model_id}
        self.decisions = Counter(
            "kvfleet_routing_decisions_total",
            description="Routing decisions by reason: prefix_hit, spill (holder overloaded), load (nobody "
            "held the prefix), fallback (page index unanswered), no_hashes.",
            tag_keys=("model", "reason"),
        )
        self.decisions.set_default_tags(tags)
        self.matched_pages = Counter(
            "kvfleet_routing_matched_pages_total", "Leading prompt pages held by the chosen replicas.", ("model",)
        )
        self.matched_pages.set_default_tags(tags)
        self.index_lookup_latency = Histogram(
            "kvfleet_index_lookup_seconds",
            description="Latency of one page-index lookup (one Redis round trip).",
            boundaries=[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
            tag_keys=("model",),
        )
        self.index_lookup_latency.set_default_tags(tags)
        self.index_lookup_failures = Counter(
            "kvfleet_index_lookup_failures_total",
            description="Page-index lookups that got no answer (Redis down or slow): routed by load alone.",
            tag_keys=("model",),
        )
        self.index_lookup_failures.set_default_tags(tags)


class WorkerMetrics:
    def __init__(self, model_id: str, replica_id: str):
        tags = {"model": model_id, "replica": replica_id}
        keys = ("model", "replica")

        def gauge(name: str, description: str) -> Gauge:
            g = Gauge(name, description=description, tag_keys=keys)
            g.set_default_tags(tags)
            return g

        def counter(name: str, description: str) -> Counter:
            c = Counter(name, description=description, tag_keys=keys)
            c.set_default_tags(tags)
            return c

        self.waiting = gauge("kvfleet_queue_length", "Requests waiting for their first step.")
        self.running = gauge("kvfleet_running_sequences", "Sequences in the running batch.")
        self.page_usage = gauge("kvfleet_kv_page_usage_ratio", "Fraction of KV pages in use (0..1).")
        self.free_pages = gauge("kvfleet_kv_free_pages", "KV pages free (cached or empty).")
        self.prefix_queries = counter("kvfleet_prefix_cache_query_tokens_total", "Prompt tokens looked up.")
        self.prefix_hits = counter("kvfleet_prefix_cache_hit_tokens_total", "Prompt tokens found in the cache.")
        self.preemptions = counter("kvfleet_preemptions_total", "Sequences preempted for lack of pages.")
        self.index_published_pages = counter("kvfleet_index_published_pages_total", "Page hashes sent to the index.")
        self.index_dropped_pages = counter(
            "kvfleet_index_dropped_pages_total", "Page hashes dropped (publisher queue full or Redis down)."
        )
        self.index_errors = counter("kvfleet_index_publish_errors_total", "Failed writes to the page index.")
        # Speculative decoding (zero when the engine does not speculate).
        self.spec_proposed = counter("kvfleet_spec_proposed_tokens_total", "Draft tokens verified by the target.")
        self.spec_accepted = counter("kvfleet_spec_accepted_tokens_total", "Draft tokens the target accepted.")
        self.spec_steps = counter("kvfleet_spec_verify_steps_total", "Verifications (one per sequence per step).")
        self.spec_failures = counter(
            "kvfleet_spec_proposer_failures_total", "Proposer calls that failed (the target decoded alone)."
        )
        self.spec_acceptance = gauge("kvfleet_spec_acceptance_rate", "Accepted / proposed draft tokens since start.")
        self.spec_mean_length = gauge(
            "kvfleet_spec_mean_accepted_length", "Tokens emitted per verification since start (accepted + 1)."
        )
        self.spec_draft_rtt = gauge(
            "kvfleet_spec_draft_time_seconds", "Mean time of one proposer call (draft forwards or round trip)."
        )
        # Draft replicas (zero without them): calls by kind, sequences re-routed.
        self.draft_calls = Counter(
            "kvfleet_draft_calls_total",
            description="Proposal calls to draft replicas, by kind: pinned (to the replica holding the "
            "sequences' draft KV), routed (new sequences, by page hashes), failed (raised or timed out).",
            tag_keys=(*keys, "kind"),
        )
        self.draft_calls.set_default_tags(tags)
        self.draft_rerouted = counter(
            "kvfleet_draft_rerouted_sequences_total",
            "Sequences whose draft replica failed (their draft KV is rebuilt on another) or answered off its pin.",
        )
        self._last: dict[str, int] = {}

    def update(self, stats, publisher_metrics=None, draft_stats=None) -> None:
        """Set the gauges from an `EngineStats` and advance the counters by what changed."""
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.free_pages.set(stats.num_free_pages)
        used = stats.num_total_pages - stats.num_free_pages
        self.page_usage.set(used / stats.num_total_pages if stats.num_total_pages else 0.0)
        self._advance(self.prefix_queries, "q", stats.prefix_cache_queries)
        self._advance(self.prefix_hits, "h", stats.prefix_cache_hits)
        self._advance(self.preemptions, "p", stats.num_preemptions)
        if stats.spec_steps:
            self._advance(self.spec_proposed, "sp", stats.spec_proposed_tokens)
            self._advance(self.spec_accepted, "sa", stats.spec_accepted_tokens)
            self._advance(self.spec_steps, "ss", stats.spec_steps)
            self.spec_acceptance.set(stats.spec_accepted_tokens / max(1, stats.spec_proposed_tokens))
            self.spec_mean_length.set(stats.spec_emitted_tokens / stats.spec_steps)
            self.spec_draft_rtt.set(stats.spec_draft_time_s / max(1, stats.spec_draft_calls))
        self._advance(self.spec_failures, "sf", stats.spec_failures)
        if publisher_metrics is not None:
            self._advance(self.index_published_pages, "ip", publisher_metrics.published_pages)
            self._advance(self.index_dropped_pages, "id", publisher_metrics.dropped_pages)
            self._advance(self.index_errors, "ie", publisher_metrics.publish_errors)
        if draft_stats is not None:
            for kind in ("pinned", "routed", "failed"):
                self._advance(self.draft_calls, f"dc-{kind}", getattr(draft_stats, f"num_{kind}_calls"), {"kind": kind})
            self._advance(self.draft_rerouted, "dr", draft_stats.num_dropped + draft_stats.num_moved)

    def _advance(self, counter: Counter, key: str, total: int, tags: dict | None = None) -> None:
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta, tags)
        self._last[key] = total
