"""The routing policy: which replica serves a request, from what each holds and how busy it is.

Pure: no Ray, no Redis, no clock. `choose` takes one `ReplicaView` per candidate (its load and, when
measured, its rates), the number of the prompt's leading pages each one holds (from the shared page
index; {} when the index gave no answer), the prompt's length and a `RoutingConfig`, and returns a
`Decision`. The Ray Serve adapter (`router/prefix_router.py`) and the simulator
(`cluster/bench/sim_cluster.py`) both call it.

`rule="predicted_ttft"` (the default) sends the request where its first token is predicted soonest:

    predicted TTFT(r) = queueing delay(r) + uncached prompt tokens(r) / prefill rate(r)
    queueing delay(r) = load_weight * in_flight(r) * request_cost(r)
                        + prefill tokens routed to r and not yet computed / prefill rate(r)

where uncached tokens = prompt tokens - page_size * (leading pages held on its device + host_page_weight
* those continuing in its host tier), `request_cost` is the time one running sequence adds to a decode
step, and the rates are measured online (router/rates.py: EWMAs of each replica's own reports);
a replica without a fresh measurement takes the fleet's mean, else `default_prefill_tokens_s` /
`default_request_cost_s`, and an idle replica (nothing in flight or routed) is predicted at no less
than the fleet's fastest prefill rate (else one measured slow while cold or busy never gets the traffic
that would measure it again). So where prefill is slow (CPU) a holder keeps its prefix until its queue
costs more than recomputing the prompt elsewhere; where prefill is cheap (a GPU) the load decides
and a hot prefix spreads early. Ties: more pages held, then the lower load, then a random pick. This
is the trade Dynamo's KV router makes (prefill blocks weighed against active blocks) and SGLang's /
Ray Serve LLM's prefix routers make with a load-imbalance threshold, here in seconds so that the
measured rates set it, not a constant.

`rule="spill"` is the rule before it (in the words of SGLang's cache-aware router and llm-d's scorers):

1. A candidate is *eligible* unless it is overloaded relative to the least-loaded candidate:
       load(r) - min_load  >  spill_abs_threshold + spill_rel_threshold * min_load
   where load = requests in flight on the replica (running, waiting, or on their way).
2. Among eligible candidates, the one holding the most leading pages wins (ties: the lower load,
   then a random pick). A page in a replica's host-memory tier (restored by a copy, not reused
   in place) counts `host_page_weight` of a device page.
3. Otherwise the least-loaded eligible candidate wins (ties broken at random).

Under both rules a replica whose free KV pages have fallen under `min_free_page_fraction` is not
eligible unless it is among the least loaded (it would have to evict or preempt to take more).
Reasons: PREFIX_HIT (the chosen replica holds at least `min_matched_pages` and no candidate holds
more), SPILL (a candidate holding more was passed over), LOAD (nobody held any of the prompt),
FALLBACK (the index gave no answer: route by load alone).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["prefix_aware", "power_of_two", "round_robin"] = Field(
        "prefix_aware", description="prefix_aware (kvfleet's), power_of_two (Ray Serve's default), round_robin"
    )
    rule: Literal["predicted_ttft", "spill"] = Field(
        "predicted_ttft",
        description="prefix_aware's rule: 'predicted_ttft' sends a request where queueing plus prefilling its "
        "uncached tokens is predicted shortest (measured rates); 'spill' keeps a prefix on its holder until it runs "
        "spill_abs_threshold + spill_rel_threshold x the least load ahead.",
    )
    default_prefill_tokens_s: float = Field(
        10000.0, gt=0, description="predicted_ttft: a replica's prefill rate (tokens/s) until one is measured."
    )
    default_request_cost_s: float = Field(
        0.002,
        ge=0,
        description="predicted_ttft: what one running sequence adds to a decode step (s) until it is measured.",
    )
    load_weight: float = Field(
        1.5,
        ge=0,
        description="predicted_ttft: decode steps of a replica's load a new request waits through (half of the "
        "step in progress on average, then the step it joins).",
    )
    rate_ewma_weight: float = Field(
        0.3, gt=0, le=1, description="predicted_ttft: weight of a replica's newest report in its measured rates."
    )
    rate_max_age_s: float = Field(
        60.0, gt=0, description="predicted_ttft: a measured rate older than this is stale (the fleet's mean is used)."
    )
    spill_abs_threshold: float = Field(
        4.0,
        ge=0,
        description="rule=spill: in-flight requests a holder may run ahead of the least-loaded replica before "
        "spilling.",
    )
    spill_rel_threshold: float = Field(
        0.5, ge=0, description="... plus this fraction of the least-loaded replica's in-flight requests."
    )
    min_matched_pages: int = Field(1, ge=1, description="Leading pages a replica must hold to count as a holder.")
    min_free_page_fraction: float = Field(
        0.02, ge=0, le=1, description="A replica with fewer free KV pages than this fraction is overloaded."
    )
    host_page_weight: float = Field(
        0.9,
        ge=0,
        le=1,
        description="What a leading page in a replica's host-memory tier counts for against one on its device "
        "(a host hit costs a copy back; a device hit nothing).",
    )
    recent_route_ttl_s: float = Field(
        10.0,
        ge=0,
        description="A router counts the pages of prompts it sent in this many seconds as held by the replica it "
        "sent them to, until the index knows them (a new prefix sticks to the replica computing it); 0: off.",
    )


class Reason(enum.StrEnum):
    PREFIX_HIT = "prefix_hit"  # sent to the replica holding the longest prefix
    SPILL = "spill"  # a replica holding more was passed over (overloaded, or slower to answer)
    LOAD = "load"  # no replica held any of the prompt: the least loaded (predicted soonest)
    FALLBACK = "fallback"  # the page index gave no answer: by load alone


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    load: float  # requests in flight: running + waiting + routed but not yet admitted
    num_free_pages: int = 0
    num_total_pages: int = 0  # 0: unknown (no heartbeat yet)
    prefill_tokens_s: float | None = None  # measured prefill rate; None: unknown or stale
    request_cost_s: float | None = None  # measured decode-step time per running sequence; None: unknown
    queued_prefill_tokens: float = 0.0  # prompt tokens routed here and not yet computed (the router's estimate)


@dataclass(frozen=True)
class Decision:
    replica_id: str
    reason: Reason
    matched_pages: int  # leading pages the chosen replica holds (device and host tier)
    uncached_tokens: float = 0.0  # predicted_ttft: prompt tokens the chosen replica will compute
    prefill_tokens_s: float = 0.0  # predicted_ttft: the prefill rate its prediction used
    predicted_ttft_s: float | None = None  # predicted_ttft: the chosen replica's prediction


def choose(
    candidates: list[ReplicaView],
    matched_pages: dict[str, int] | None,
    config: RoutingConfig,
    rng: random.Random | None = None,
    host_pages: dict[str, int] | None = None,
    prompt_tokens: int | None = None,
    page_size: int = 16,
) -> Decision:
    """The replica for one request. `matched_pages` maps replica id -> leading pages of the prompt
    it holds on its device (a missing replica holds none); None means the index gave no answer.
    `host_pages`: the pages of its host tier that continue that run. `prompt_tokens` (default: the
    most pages anyone holds) and `page_size` turn pages into the tokens left to prefill."""
    if not candidates:
        raise ValueError("no candidate replicas")
    rng = rng or random
    if config.rule == "predicted_ttft":
        return _choose_by_ttft(candidates, matched_pages, config, rng, host_pages or {}, prompt_tokens, page_size)
    min_load = min(c.load for c in candidates)
    limit = load_limit(min_load, config)

    def overloaded(c: ReplicaView) -> bool:
        return c.load > limit or (c.load > min_load and short_of_pages(c.num_free_pages, c.num_total_pages, config))

    eligible = [c for c in candidates if not overloaded(c)] or [c for c in candidates if c.load == min_load]
    host = host_pages or {}
    held = {r: n + host.get(r, 0) for r, n in (matched_pages or {}).items()}
    w = config.host_page_weight
    score = {r: n + w * host.get(r, 0) for r, n in (matched_pages or {}).items()}

    qualified = [c for c in eligible if held.get(c.replica_id, 0) >= config.min_matched_pages]
    if qualified:
        best = max(score[c.replica_id] for c in qualified)
        holders = [c for c in qualified if score[c.replica_id] == best]
        # A longer holder was overloaded: a partial holder takes the request, and that is a spill.
        reason = Reason.SPILL if max(score.values()) > best else Reason.PREFIX_HIT
        chosen = _least_loaded(holders, rng).replica_id
        return Decision(chosen, reason, held[chosen])

    chosen = _least_loaded(eligible, rng)
    if matched_pages is None:
        reason = Reason.FALLBACK
    elif any(n >= config.min_matched_pages for n in held.values()):
        reason = Reason.SPILL
    else:
        reason = Reason.LOAD
    return Decision(chosen.replica_id, reason, held.get(chosen.replica_id, 0))


@dataclass(frozen=True)
class Prediction:
    replica_id: str
    ttft_s: float  # queueing + prefill of the uncached tokens
    queue_s: float
    uncached_tokens: float
    prefill_tokens_s: float  # the rate used (measured, the fleet's mean, or the default)


def predict(
    candidates: list[ReplicaView],
    cached_tokens: dict[str, float],
    prompt_tokens: float,
    config: RoutingConfig,
) -> list[Prediction]:
    """Each candidate's predicted TTFT (see the module docstring); `cached_tokens`: prompt tokens
    each one holds (device pages, plus host-tier pages at their weight)."""
    prefill = [c.prefill_tokens_s for c in candidates if c.prefill_tokens_s]
    cost = [c.request_cost_s for c in candidates if c.request_cost_s is not None]
    # Replicas of one deployment run on like hardware: one without a measurement is like the others.
    fleet_prefill = sum(prefill) / len(prefill) if prefill else config.default_prefill_tokens_s
    best_prefill = max(prefill, default=fleet_prefill)
    fleet_cost = sum(cost) / len(cost) if cost else config.default_request_cost_s
    out = []
    for c in candidates:
        rate = c.prefill_tokens_s or fleet_prefill
        if c.load == 0 and c.queued_prefill_tokens == 0:
            # An idle replica prefills at least as fast as the fleet's fastest: its own rate may have been
            # measured while it was busy or cold, and a replica that gets no traffic is never measured again.
            rate = max(rate, best_prefill)
        per_request = c.request_cost_s if c.request_cost_s is not None else fleet_cost
        uncached = max(0.0, prompt_tokens - cached_tokens.get(c.replica_id, 0.0))
        queue = config.load_weight * c.load * per_request + c.queued_prefill_tokens / rate
        out.append(Prediction(c.replica_id, queue + uncached / rate, queue, uncached, rate))
    return out


def _choose_by_ttft(
    candidates: list[ReplicaView],
    matched_pages: dict[str, int] | None,
    config: RoutingConfig,
    rng,
    host: dict[str, int],
    prompt_tokens: int | None,
    page_size: int,
) -> Decision:
    min_load = min(c.load for c in candidates)
    eligible = [
        c for c in candidates if c.load <= min_load or not short_of_pages(c.num_free_pages, c.num_total_pages, config)
    ]
    held = {r: n + host.get(r, 0) for r, n in (matched_pages or {}).items()}
    score = {
        r: n + config.host_page_weight * host.get(r, 0)
        for r, n in (matched_pages or {}).items()
        if held[r] >= config.min_matched_pages
    }
    cached = {r: page_size * n for r, n in score.items()}
    prompt = prompt_tokens if prompt_tokens is not None else page_size * max(held.values(), default=0)
    predictions = predict(eligible, cached, prompt, config)
    best = min(p.ttft_s for p in predictions)
    tied = [c for c, p in zip(eligible, predictions, strict=True) if p.ttft_s <= best * (1 + 1e-9) + 1e-12]
    most = max(score.get(c.replica_id, 0.0) for c in tied)
    chosen = _least_loaded([c for c in tied if score.get(c.replica_id, 0.0) == most], rng).replica_id
    prediction = next(p for p in predictions if p.replica_id == chosen)
    if matched_pages is None:
        reason = Reason.FALLBACK
    elif not score:
        reason = Reason.LOAD
    elif score.get(chosen, 0.0) < max(score.values()):
        reason = Reason.SPILL
    else:
        reason = Reason.PREFIX_HIT
    return Decision(
        chosen, reason, held.get(chosen, 0), prediction.uncached_tokens, prediction.prefill_tokens_s, prediction.ttft_s
    )


def load_limit(min_load: float, config: RoutingConfig) -> float:
    """The most requests in flight a replica may run and stay eligible (rule 1)."""
    return min_load + config.spill_abs_threshold + config.spill_rel_threshold * min_load


def short_of_pages(num_free_pages: int, num_total_pages: int, config: RoutingConfig) -> bool:
    """Fewer free KV pages than `min_free_page_fraction` of a known total (0: unknown, never short)."""
    return num_total_pages > 0 and num_free_pages < config.min_free_page_fraction * num_total_pages


def _least_loaded(candidates: list[ReplicaView], rng) -> ReplicaView:
    low = min(c.load for c in candidates)
    return rng.choice([c for c in candidates if c.load == low])
