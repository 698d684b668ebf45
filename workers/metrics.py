"""A worker replica's metrics, as `ray.util.metrics` (Ray exports them to Prometheus and the Ray
dashboard's metrics view shows them, prefixed `ray_`, e.g. `ray_kvfleet_queue_length`).

`WorkerMetrics`: what a worker group holds (queue, running sequences, KV pages, prefix-cache hits,
page-index publishing, speculation and draft calls), set by `TargetWorker` (workers/deployment.py)
from its engine's `EngineStats`. Every series is tagged with the model and the replica. Metrics are
created once per process (Ray registers them by name).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge


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
