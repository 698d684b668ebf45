"""The router layer's metrics, as `ray.util.metrics` (Ray exports them to Prometheus and the Ray
dashboard's metrics view shows them, prefixed `ray_`, e.g. `ray_kvfleet_requests_total`).

`IngressMetrics`: what a client sees (outcomes, latencies and tokens of requests), recorded by the
ingress (router/ingress.py). `RouterMetrics`: routing decisions and page-index lookups, recorded by
the prefix-aware request router (router/prefix_router.py) in every process that routes to workers.
Every series is tagged with the model. Metrics are created once per process (Ray registers them by name).
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
        self.index_malformed_entries = Counter(
            "kvfleet_index_malformed_entries_total",
            description="Entries read from the page index outside kvfleet's schema, skipped (see kvstore.index).",
            tag_keys=("model",),
        )
        self.index_malformed_entries.set_default_tags(tags)
        self.predicted_ttft = Histogram(
            "kvfleet_routing_predicted_ttft_seconds",
            description="The chosen replica's predicted TTFT (rule predicted_ttft): set beside "
            "kvfleet_time_to_first_token_seconds, it shows how well the router's rates fit.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.predicted_ttft.set_default_tags(tags)
        self.prefill_rate = Gauge(
            "kvfleet_routing_prefill_tokens_per_second",
            description="Each replica's prefill rate as the router measures it (EWMA of its reports).",
            tag_keys=("model", "replica"),
        )
        self.prefill_rate.set_default_tags(tags)
        self.request_cost = Gauge(
            "kvfleet_routing_request_cost_seconds",
            description="What one running sequence adds to each replica's decode step, as the router measures it.",
            tag_keys=("model", "replica"),
        )
        self.request_cost.set_default_tags(tags)
