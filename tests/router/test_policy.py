"""The routing policy, driven directly (pure logic: no Ray, no Redis)."""

import random
from collections import Counter

import pytest

from router.policy import Reason, ReplicaView, RoutingConfig, choose

CONFIG = RoutingConfig(rule="spill", spill_abs_threshold=4, spill_rel_threshold=0.5)


def views(*loads, free=100, total=100):
    return [ReplicaView(f"r{i}", load, free, total) for i, load in enumerate(loads)]


def test_the_holder_is_chosen_when_load_is_even():
    d = choose(views(2, 2, 2), {"r1": 5}, CONFIG)
    assert (d.replica_id, d.reason, d.matched_pages) == ("r1", Reason.PREFIX_HIT, 5)


def test_the_holder_is_kept_while_its_lead_is_under_the_threshold():
    # min load 2: the limit is 2 + 4 + 0.5 * 2 = 7 in flight.
    assert choose(views(7, 2, 2), {"r0": 5}, CONFIG).replica_id == "r0"


def test_an_overloaded_holder_spills_to_the_least_loaded_replica():
    d = choose(views(8, 3, 2), {"r0": 5}, CONFIG)
    assert (d.replica_id, d.reason, d.matched_pages) == ("r2", Reason.SPILL, 0)


def test_after_a_spill_the_second_holder_attracts_the_prefix():
    d = choose(views(8, 3, 2), {"r0": 5, "r1": 5}, CONFIG)
    assert (d.replica_id, d.reason) == ("r1", Reason.PREFIX_HIT)


def test_passing_over_an_overloaded_longer_holder_for_a_partial_one_is_a_spill():
    d = choose(views(9, 1, 1), {"r0": 8, "r1": 3}, CONFIG)
    assert (d.replica_id, d.reason, d.matched_pages) == ("r1", Reason.SPILL, 3)


def test_the_longest_prefix_holder_wins_among_several():
    d = choose(views(1, 1, 1, 1), {"r0": 2, "r1": 9, "r3": 4}, CONFIG)
    assert (d.replica_id, d.matched_pages) == ("r1", 9)


def test_equal_prefixes_go_to_the_less_loaded_holder():
    assert choose(views(3, 1, 0), {"r0": 6, "r1": 6}, CONFIG).replica_id == "r1"


def test_without_index_information_the_least_loaded_replica_is_chosen():
    d = choose(views(3, 1, 2), None, CONFIG)
    assert (d.replica_id, d.reason) == ("r1", Reason.FALLBACK)
    d = choose(views(3, 1, 2), {}, CONFIG)
    assert (d.replica_id, d.reason) == ("r1", Reason.LOAD)


def test_a_holder_short_of_free_pages_counts_as_overloaded():
    candidates = [ReplicaView("r0", 2, 1, 100), ReplicaView("r1", 1, 80, 100)]
    assert choose(candidates, {"r0": 5}, CONFIG).reason is Reason.SPILL
    # ... unless it is also the least loaded: it would have to take the request anyway.
    candidates = [ReplicaView("r0", 0, 1, 100), ReplicaView("r1", 1, 80, 100)]
    assert choose(candidates, {"r0": 5}, CONFIG).reason is Reason.PREFIX_HIT


@pytest.mark.parametrize("matched", [None, {}, {"r0": 1, "r1": 1, "r2": 1}])
def test_ties_break_randomly(matched):
    rng = random.Random(0)
    picks = Counter(choose(views(1, 1, 1), matched, CONFIG, rng).replica_id for _ in range(600))
    assert set(picks) == {"r0", "r1", "r2"} and min(picks.values()) > 150


def test_a_popular_prefix_spreads_once_its_holder_runs_ahead():
    """Requests of one prefix arriving while none finish: the holder takes them until it runs
    spill_abs_threshold ahead; then the others become holders too, and load stays within bounds."""
    rng = random.Random(1)
    loads = {"r0": 0, "r1": 0, "r2": 0}
    held = {"r0": 3}
    for _ in range(60):
        d = choose([ReplicaView(r, n, 100, 100) for r, n in loads.items()], dict(held), CONFIG, rng)
        loads[d.replica_id] += 1
        held[d.replica_id] = 3  # the chosen replica now holds the prefix
    assert set(held) == {"r0", "r1", "r2"}
    assert max(loads.values()) - min(loads.values()) <= 4 + 0.5 * min(loads.values()) + 1


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        choose([], {}, CONFIG)


def test_a_host_tier_page_counts_a_little_below_a_device_page():
    # r0: 10 pages on its device; r1: 10 pages, 4 of them in its host tier; r2: 6 + 6 in host.
    gpu, host = {"r0": 10, "r1": 6, "r2": 6}, {"r1": 4, "r2": 6}
    d = choose(views(2, 2, 2), gpu, CONFIG, host_pages=host)
    assert (d.replica_id, d.reason, d.matched_pages) == ("r2", Reason.PREFIX_HIT, 12)  # 6 + 0.9 * 6 > 10
    even = {"r0": 10, "r1": 6, "r2": 0}
    d = choose(views(2, 2, 2), even, CONFIG, host_pages={"r1": 4})
    assert (d.replica_id, d.matched_pages) == ("r0", 10)  # 10 on the device beat 6 + 0.9 * 4
    only_host = choose(views(2, 2, 2), {"r0": 0, "r1": 0}, CONFIG, host_pages={"r1": 3})
    assert (only_host.replica_id, only_host.reason, only_host.matched_pages) == ("r1", Reason.PREFIX_HIT, 3)
    weightless = RoutingConfig(rule="spill", host_page_weight=0.0)
    assert choose(views(2, 2, 2), even, weightless, host_pages={"r1": 40}).replica_id == "r0"


def test_host_pages_do_not_make_an_overloaded_holder_eligible():
    d = choose(views(9, 2), {"r0": 2, "r1": 0}, CONFIG, host_pages={"r0": 20})
    assert (d.replica_id, d.reason) == ("r1", Reason.SPILL)


# ---------------------------------------------------------------------- rule="predicted_ttft"
TTFT = RoutingConfig()  # the default rule
PROMPT = 832  # tokens: 52 pages of 16
HOT = {"r0": 50}  # r0 holds 800 of them: 32 left to compute there, 832 anywhere else


def measured(loads, prefill_tokens_s, request_cost_s=0.002, **kw):
    return [ReplicaView(f"r{i}", n, 100, 100, prefill_tokens_s, request_cost_s, **kw) for i, n in enumerate(loads)]


def test_a_hot_holder_with_a_long_queue_loses_to_an_idle_replica_when_prefill_is_cheap():
    # GPU-like: 50k prompt tokens/s. r0: 1.5 x 10 x 2 ms = 30 ms of queue + 0.6 ms of prefill;
    # r1: no queue + 16.6 ms of prefill.
    d = choose(measured([10, 0], 50_000), HOT, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason, d.uncached_tokens) == ("r1", Reason.SPILL, PROMPT)


def test_the_same_holder_wins_when_prefill_is_expensive():
    # CPU-like: 2k prompt tokens/s. r0: 30 ms + 16 ms; r1: 416 ms.
    d = choose(measured([10, 0], 2_000), HOT, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason, d.matched_pages, d.uncached_tokens) == ("r0", Reason.PREFIX_HIT, 50, 32)


def test_each_replica_is_judged_by_its_own_rates():
    slow_holder = [ReplicaView("r0", 4, 100, 100, 1_000, 0.002), ReplicaView("r1", 0, 100, 100, 100_000, 0.002)]
    # r0: 12 ms + 32 ms; r1: 8.3 ms
    assert choose(slow_holder, HOT, TTFT, prompt_tokens=PROMPT).replica_id == "r1"
    busy_steps = [ReplicaView("r0", 4, 100, 100, 20_000, 0.001), ReplicaView("r1", 4, 100, 100, 20_000, 0.05)]
    # even with no prefix anywhere, the replica whose steps cost less per sequence wins
    assert choose(busy_steps, {}, TTFT, prompt_tokens=PROMPT).replica_id == "r0"


def test_prompt_tokens_routed_but_not_yet_computed_count_as_queue():
    views_ = [
        ReplicaView("r0", 1, 100, 100, 10_000, 0.002, queued_prefill_tokens=4_000),  # 400 ms of backlog
        ReplicaView("r1", 1, 100, 100, 10_000, 0.002),
    ]
    d = choose(views_, HOT, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason) == ("r1", Reason.SPILL)


def test_equal_predictions_prefer_the_longer_prefix_then_the_lower_load_then_chance():
    # r1 holds as much as r0 but runs one more request at no cost: equal predictions, r0 less loaded
    free = RoutingConfig(default_request_cost_s=0.0)
    assert choose(views(3, 1, 0), {"r0": 6, "r1": 6}, free, prompt_tokens=100).replica_id == "r1"
    rng = random.Random(0)
    picks = Counter(choose(views(1, 1, 1), {}, TTFT, rng, prompt_tokens=100).replica_id for _ in range(600))
    assert set(picks) == {"r0", "r1", "r2"} and min(picks.values()) > 150


def test_unknown_rates_take_the_fleets_mean_then_the_defaults():
    # r1 has no measurement yet: it is taken to prefill as slowly as r0 measured (2k tokens/s), so
    # the holder keeps the prefix; with nothing measured anywhere, the default (10k tokens/s) decides.
    fleet = [ReplicaView("r0", 10, 100, 100, 2_000, 0.002), ReplicaView("r1", 0, 100, 100)]
    assert choose(fleet, HOT, TTFT, prompt_tokens=PROMPT).replica_id == "r0"
    nothing = [ReplicaView("r0", 10, 100, 100), ReplicaView("r1", 0, 100, 100)]
    # defaults: r0 1.5 x 10 x 2 ms + 3.2 ms = 33 ms; r1 83 ms
    assert choose(nothing, HOT, TTFT, prompt_tokens=PROMPT).replica_id == "r0"
    cheap = RoutingConfig(default_prefill_tokens_s=100_000)
    assert choose(nothing, HOT, cheap, prompt_tokens=PROMPT).replica_id == "r1"


def test_an_idle_replica_measured_slow_is_predicted_at_the_fleets_fastest_rate():
    # r1 was measured at 500 tokens/s while cold (its first compiles); r0, busy, at 200k. A new prompt
    # held nowhere goes to the idle r1: taken at its own measurement it would never get traffic again.
    fleet = [ReplicaView("r0", 3, 100, 100, 200_000, 0.002), ReplicaView("r1", 0, 100, 100, 500, 0.002)]
    d = choose(fleet, {}, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason, d.prefill_tokens_s) == ("r1", Reason.LOAD, 200_000)
    # once it has work in flight its own (slow) measurement counts again
    fleet[1] = ReplicaView("r1", 1, 100, 100, 500, 0.002)
    assert choose(fleet, {}, TTFT, prompt_tokens=PROMPT).replica_id == "r0"


def test_without_index_information_the_least_busy_replica_is_chosen_by_prediction():
    d = choose(measured([3, 1, 2], 10_000), None, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason) == ("r1", Reason.FALLBACK)
    d = choose(measured([3, 1, 2], 10_000), {}, TTFT, prompt_tokens=PROMPT)
    assert (d.replica_id, d.reason) == ("r1", Reason.LOAD)


def test_a_holder_short_of_free_pages_is_passed_over_under_either_rule():
    candidates = [ReplicaView("r0", 2, 1, 100, 2_000, 0.002), ReplicaView("r1", 1, 80, 100, 2_000, 0.002)]
    assert choose(candidates, HOT, TTFT, prompt_tokens=PROMPT).reason is Reason.SPILL


def test_host_tier_pages_count_at_their_weight_in_the_tokens_left_to_compute():
    # r0: 40 device pages; r1: 20 device + 30 host pages at 0.9 = 47 pages' worth: r1 computes less
    d = choose(measured([1, 1], 2_000), {"r0": 40, "r1": 20}, TTFT, host_pages={"r1": 30}, prompt_tokens=PROMPT)
    assert (d.replica_id, d.matched_pages) == ("r1", 50)
    assert d.uncached_tokens == pytest.approx(PROMPT - 16 * 47)


def test_a_burst_on_one_prefix_spreads_sooner_where_prefill_is_cheap():
    """Requests of one prefix arriving while none finish: the holder takes them while its queue
    costs less than a prefill elsewhere. Cheap prefill (GPU) spreads them at once; expensive
    prefill (CPU) keeps them on the holder (until its queue costs what a prefill elsewhere does:
    about 130 requests here)."""

    def burst(prefill_tokens_s: float) -> dict[str, int]:
        rng = random.Random(1)
        loads, held = {"r0": 0, "r1": 0, "r2": 0, "r3": 0}, {"r0": 50}
        for _ in range(24):
            candidates = [ReplicaView(r, n, 100, 100, prefill_tokens_s, 0.004) for r, n in loads.items()]
            d = choose(candidates, dict(held), TTFT, rng, prompt_tokens=PROMPT)
            loads[d.replica_id] += 1
            held[d.replica_id] = 50
        return loads

    gpu, cpu = burst(100_000), burst(1_000)
    assert max(gpu.values()) - min(gpu.values()) <= 2, gpu  # balanced
    assert cpu["r0"] >= 20, cpu  # 1.5 x 4 ms per request queued vs 0.8 s to prefill elsewhere
