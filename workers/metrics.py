"""A worker replica's metrics, as `ray.util.metrics` (Ray exports them to Prometheus and the Ray
dashboard's metrics view shows them, prefixed `ray_`, e.g. `ray_kvfleet_queue_length`).

`WorkerMetrics`: what a worker group holds (queue, running sequences, KV pages, prefix-cache hits,
the host-memory tier, pulls between replicas, page-index publishing, speculation and draft calls),
set by `TargetWorker` (workers/deployment.py) from its engine's `EngineStats`. Every series is
tagged with the model and the replica. Metrics are created once per process (Ray registers them
by name).
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
        # The host-memory tier and pulls between replicas (zero when off).
        self.host_pages = gauge("kvfleet_host_kv_pages", "Pages of the host-memory KV tier.")
        self.host_used = gauge("kvfleet_host_kv_used_pages", "Host-tier pages holding a page's KV.")
        self.host_stored = counter(
            "kvfleet_host_kv_stored_pages_total", "Device pages copied to host memory on eviction."
        )
        self.host_restored = counter(
            "kvfleet_host_kv_restored_pages_total", "Host pages copied back to the device on a prefix hit."
        )
        self.pulled_pages = counter("kvfleet_kv_pulled_pages_total", "Pages pulled from other replicas and cached.")
        self.pulled_bytes = counter("kvfleet_kv_pulled_bytes_total", "Bytes of KV pulled from other replicas.")
        self.pulls = counter("kvfleet_kv_pulls_total", "Pulls that brought at least one page.")
        self.pull_time = counter("kvfleet_kv_pull_seconds_total", "Wall time of those pulls (fetch, check, insert).")
        self.pull_fetch_time = counter(
            "kvfleet_kv_pull_fetch_seconds_total", "Of that, the transport's (request sent to pages in hand)."
        )
        self.pull_phase_time = Counter(
            "kvfleet_kv_pull_phase_seconds_total",
            description="Time of the pulls that brought pages, by phase: locate (index), holder_lookup, "
            "holder_gather, holder_serialize (on the holder), wire (the calls and the object store), check, "
            "deserialize, scatter, insert (here); reserve (here, room for the pages, while the request is out: "
            "overlaps the holder's phases and the wire).",
            tag_keys=(*keys, "phase"),
        )
        self.pull_phase_time.set_default_tags(tags)
        self.exported_pages = counter("kvfleet_kv_exported_pages_total", "Pages sent to other replicas' pulls.")
        self.pull_fallbacks = Counter(
            "kvfleet_kv_pull_fallbacks_total",
            description="Pulls not made or failed, so their pages were recomputed, by reason: not_worth (cost "
            "model), timeout, error (holder dead or unreachable), mismatch (hash, model or layout), evicted "
            "(the holder no longer held them), index_down.",
            tag_keys=(*keys, "reason"),
        )
        self.pull_fallbacks.set_default_tags(tags)
        self._last: dict[str, float] = {}

    def update(self, stats, publisher_metrics=None, draft_stats=None, pull_stats=None) -> None:
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
        if stats.num_host_pages:
            self.host_pages.set(stats.num_host_pages)
            self.host_used.set(stats.num_host_cached_pages)
            self._advance(self.host_stored, "hs", stats.num_host_stored_pages)
            self._advance(self.host_restored, "hr", stats.num_host_restored_pages)
        self._advance(self.exported_pages, "xp", stats.num_exported_pages)
        if pull_stats is not None:
            self._advance(self.pulled_pages, "pp", pull_stats.num_pages)
            self._advance(self.pulled_bytes, "pb", pull_stats.num_bytes)
            self._advance(self.pulls, "pn", pull_stats.num_pulls)
            self._advance(self.pull_time, "pt", pull_stats.time_s)
            self._advance(self.pull_fetch_time, "pft", pull_stats.fetch_time_s)
            for phase, t in pull_stats.phase_s.items():
                self._advance(self.pull_phase_time, f"pph-{phase}", t, {"phase": phase})
            for reason, n in pull_stats.fallbacks.items():
                self._advance(self.pull_fallbacks, f"pf-{reason}", n, {"reason": reason})
        if draft_stats is not None:
            for kind in ("pinned", "routed", "failed"):
                self._advance(self.draft_calls, f"dc-{kind}", getattr(draft_stats, f"num_{kind}_calls"), {"kind": kind})
            self._advance(self.draft_rerouted, "dr", draft_stats.num_dropped + draft_stats.num_moved)

    def _advance(self, counter: Counter, key: str, total: float, tags: dict | None = None) -> None:
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta, tags)
        self._last[key] = total
