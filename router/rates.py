"""What the predicted-TTFT rule (router/policy.py) measures of each replica, online. Pure: the clock is passed in.

`ReplicaRates` turns each replica's reports (its `EngineStats` as a dict: the routing stats Ray Serve
polls from every TargetWorker and hands the routers, no Redis round trip) into two EWMAs:

    prefill rate      = prompt tokens computed / time of the steps that computed them   (tokens/s)
    request cost      = time of decode-only steps / sequences those steps carried        (s per sequence)

each from the difference between a report and the one before (the counters are cumulative since
the engine started). The first report of a replica that shows work sets the baseline only: it covers
the replica's start (Triton compiles, first allocations, the bench's or a user's warm-up), whose
prefill can be 100x slower than the replica's real rate (on a GPU), and a replica measured that slow
would get no traffic, so no new measurement, until the rate went stale. A difference of too few tokens or sequences
is not a measurement (an idle replica keeps its last rates). A rate not refreshed for
`rate_max_age_s` is stale: `view` leaves it out and the policy uses the fleet's mean instead.

`PrefillBacklog` is the router's own estimate of the prompt tokens it routed to a replica that the
replica has not yet computed: each routed request adds its uncached tokens, and the backlog drains at
the replica's prefill rate (a fluid queue; it knows only this router's requests, and needs no
message from the replica). Its cost is O(1) per replica per decision.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_PREFILL_TOKENS = 64  # a smaller difference says more about step overhead than about the rate
_MIN_DECODE_SEQS = 8


@dataclass
class _Rates:
    prefill_tokens: float = 0.0  # the counters of the last report
    prefill_time_s: float = 0.0
    decode_seqs: float = 0.0
    decode_time_s: float = 0.0
    prefill_tokens_s: float | None = None
    prefill_at: float = 0.0  # when the rate was last measured (the caller's clock)
    request_cost_s: float | None = None
    cost_at: float = 0.0


class ReplicaRates:
    def __init__(self, ewma_weight: float = 0.3, max_age_s: float = 60.0):
        self.ewma_weight = ewma_weight
        self.max_age_s = max_age_s
        self._rates: dict[str, _Rates] = {}

    def observe(self, replica_id: str, stats: dict, now: float) -> bool:
        """A replica's latest report (`EngineStats` fields; others ignored); whether it measured
        something. Reports that repeat the last one, or go backwards (a restarted engine), move
        nothing but the baseline."""
        if not stats or "num_prefill_tokens" not in stats:
            return False
        r = self._rates.setdefault(replica_id, _Rates())
        tokens, t_prefill = float(stats["num_prefill_tokens"]), float(stats.get("prefill_time_s", 0.0))
        seqs, t_decode = float(stats.get("num_decode_seq_steps", 0)), float(stats.get("decode_time_s", 0.0))
        if not (r.prefill_tokens or r.decode_seqs):  # no work seen yet: a start-up report (module docstring)
            r.prefill_tokens, r.prefill_time_s, r.decode_seqs, r.decode_time_s = tokens, t_prefill, seqs, t_decode
            return False
        d_tokens, d_prefill = tokens - r.prefill_tokens, t_prefill - r.prefill_time_s
        if d_tokens < 0 or d_prefill < 0:  # the engine restarted: count from its new counters
            r.prefill_tokens, r.prefill_time_s = tokens, t_prefill
        elif d_tokens >= _MIN_PREFILL_TOKENS and d_prefill > 0:
            r.prefill_tokens_s = self._mix(r.prefill_tokens_s, d_tokens / d_prefill)
            r.prefill_at = now
            r.prefill_tokens, r.prefill_time_s = tokens, t_prefill
        d_seqs, d_decode = seqs - r.decode_seqs, t_decode - r.decode_time_s
        if d_seqs < 0 or d_decode < 0:
            r.decode_seqs, r.decode_time_s = seqs, t_decode
        elif d_seqs >= _MIN_DECODE_SEQS and d_decode > 0:
            r.request_cost_s = self._mix(r.request_cost_s, d_decode / d_seqs)
            r.cost_at = now
            r.decode_seqs, r.decode_time_s = seqs, t_decode
        return r.prefill_at == now or r.cost_at == now

    def rates(self, replica_id: str, now: float) -> tuple[float | None, float | None]:
        """(prefill tokens/s, request cost s) as measured and fresh; None for what is not."""
        r = self._rates.get(replica_id)
        if r is None:
            return None, None
        fresh = lambda at: now - at <= self.max_age_s  # noqa: E731
        return (
            r.prefill_tokens_s if r.prefill_tokens_s is not None and fresh(r.prefill_at) else None,
            r.request_cost_s if r.request_cost_s is not None and fresh(r.cost_at) else None,
        )

    def forget(self, keep: set[str]) -> None:
        """Drop replicas that are gone (keeps the table as small as the deployment)."""
        for rid in [rid for rid in self._rates if rid not in keep]:
            del self._rates[rid]

    def _mix(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1 - self.ewma_weight) * old + self.ewma_weight * sample


class PrefillBacklog:
    def __init__(self):
        self._backlog: dict[str, tuple[float, float]] = {}  # replica -> (tokens, as of when)

    def pending(self, replica_id: str, now: float, prefill_tokens_s: float) -> float:
        tokens, at = self._backlog.get(replica_id, (0.0, now))
        return max(0.0, tokens - prefill_tokens_s * max(0.0, now - at))

    def add(self, replica_id: str, tokens: float, now: float, prefill_tokens_s: float) -> None:
        self._backlog[replica_id] = (self.pending(replica_id, now, prefill_tokens_s) + tokens, now)

    def forget(self, keep: set[str]) -> None:
        for rid in [rid for rid in self._backlog if rid not in keep]:
            del self._backlog[rid]
