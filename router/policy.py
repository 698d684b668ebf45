"""The routing policy: which replica serves a request, from what each holds and how busy it is.

Pure: no Ray, no Redis, no clock. `choose` takes one `ReplicaView` per candidate (its load), the
number of the prompt's leading pages each one holds (from the shared page index; {} when the index
gave no answer) and a `RoutingConfig`, and returns a `Decision`. The Ray Serve adapter
(`router/prefix_router.py`) and the simulator (`cluster/bench/sim_cluster.py`) both call it; the simulator
prunes its candidates with the same `load_limit` and `short_of_pages`.

The rule, in the words of SGLang's cache-aware router and llm-d's scorers, made explicit:

1. A candidate is *eligible* unless it is overloaded relative to the least-loaded candidate:
       load(r) - min_load  >  spill_abs_threshold + spill_rel_threshold * min_load
   where load = requests in flight on the replica (running, waiting, or on their way), and a
   replica whose free KV pages have fallen under `min_free_page_fraction` counts as overloaded too
   (it would have to evict or preempt to take more).
2. Among eligible candidates, the one holding the most leading pages wins (ties: the lower load,
   then a random pick). A page in a replica's host-memory tier (restored by a copy, not reused
   in place) counts `host_page_weight` of a device page. If it holds at least
   `min_matched_pages`, the reason is PREFIX_HIT, or SPILL if an overloaded candidate held more.
3. Otherwise the least-loaded eligible candidate wins (ties broken at random): SPILL if an
   ineligible candidate held the prefix (the popular prefix now gets a second holder), LOAD if
   nobody held any of it, FALLBACK if the index gave no answer (route by load alone).

So a popular prefix sticks to its holder until that holder runs `spill_abs_threshold` requests
ahead of the idlest replica; then it spreads, and each new holder attracts its share.
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
    spill_abs_threshold: float = Field(
        4.0, ge=0, description="In-flight requests a holder may run ahead of the least-loaded replica before spilling."
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
    SPILL = "spill"  # the holder was overloaded: sent to the least-loaded replica
    LOAD = "load"  # no replica held any of the prompt: least loaded
    FALLBACK = "fallback"  # the page index gave no answer: least loaded


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    load: float  # requests in flight: running + waiting + routed but not yet admitted
    num_free_pages: int = 0
    num_total_pages: int = 0  # 0: unknown (no heartbeat yet)


@dataclass(frozen=True)
class Decision:
    replica_id: str
    reason: Reason
    matched_pages: int  # leading pages the chosen replica holds (device and host tier)


def choose(
    candidates: list[ReplicaView],
    matched_pages: dict[str, int] | None,
    config: RoutingConfig,
    rng: random.Random | None = None,
    host_pages: dict[str, int] | None = None,
) -> Decision:
    """The replica for one request. `matched_pages` maps replica id -> leading pages of the prompt
    it holds on its device (a missing replica holds none); None means the index gave no answer.
    `host_pages`: the pages of its host tier that continue that run."""
    if not candidates:
        raise ValueError("no candidate replicas")
    rng = rng or random
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


def load_limit(min_load: float, config: RoutingConfig) -> float:
    """The most requests in flight a replica may run and stay eligible (rule 1)."""
    return min_load + config.spill_abs_threshold + config.spill_rel_threshold * min_load


def short_of_pages(num_free_pages: int, num_total_pages: int, config: RoutingConfig) -> bool:
    """Fewer free KV pages than `min_free_page_fraction` of a known total (0: unknown, never short)."""
    return num_total_pages > 0 and num_free_pages < config.min_free_page_fraction * num_total_pages


def _least_loaded(candidates: list[ReplicaView], rng) -> ReplicaView:
    low = min(c.load for c in candidates)
    return rng.choice([c for c in candidates if c.load == low])
