"""The routing policy, driven directly (pure logic: no Ray, no Redis)."""

import random
from collections import Counter

import pytest

from router.policy import Reason, ReplicaView, RoutingConfig, choose

CONFIG = RoutingConfig(spill_abs_threshold=4, spill_rel_threshold=0.5)


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
    weightless = RoutingConfig(host_page_weight=0.0)
    assert choose(views(2, 2, 2), even, weightless, host_pages={"r1": 40}).replica_id == "r0"


def test_host_pages_do_not_make_an_overloaded_holder_eligible():
    d = choose(views(9, 2), {"r0": 2, "r1": 0}, CONFIG, host_pages={"r0": 20})
    assert (d.replica_id, d.reason) == ("r1", Reason.SPILL)
