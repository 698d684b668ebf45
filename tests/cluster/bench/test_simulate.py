"""`kvfleet bench simulate`: the page pool, the simulated engine, the routing policies and the command."""

import argparse
import heapq
import json
from dataclasses import asdict, replace

import pytest

from cluster.bench.sim_cluster import POLICIES, SimParams, Workload, _Simulation, simulate
from cluster.bench.sim_replica import CostModel, HeldPages, Replica, ReplicaPages, Request
from cluster.bench.simulate import add_simulate_parser
from router.policy import RoutingConfig

TINY = Workload(
    system_prompts=4, system_prompt_tokens=512, users=120, turns=3, question_tokens=64, answer_tokens=64,
    rate=40.0, think_s=2.0, warmup_s=0.0,
)  # fmt: skip
TINY_COST = CostModel(pages_per_replica=2048)


def tiny(policy: str, **changes) -> SimParams:
    return replace(SimParams(replicas=8, policy=policy, workload=TINY, cost=TINY_COST), **changes)


def same(a, b) -> bool:
    a, b = asdict(a), asdict(b)
    a.pop("wall_s"), b.pop("wall_s")
    return a == b


def request(conv: int, prompt_len: int, answer_len: int = 16, sys_pages: int = 0, rid: int = 0) -> Request:
    return Request(rid, conv, 0, 0.0, 0, sys_pages, 100 + conv, prompt_len, answer_len)


def run_to_end(pool: ReplicaPages, req: Request) -> None:
    """Admit, prefill, decode and finish req by hand (as the engine does)."""
    assert pool.admit(req, 0.0)
    pool.commit(req, req.prompt_pages)
    pool.commit(req, (req.prompt_len + req.answer_len) // 16)
    pool.release(req)


# ------------------------------------------------------------------ the page pool
def test_finished_pages_stay_cached_and_a_later_turn_reuses_its_leading_pages():
    held = HeldPages(["r0"], expiring=False)
    pool = ReplicaPages(0, 16, held)
    first = request(1, prompt_len=40, answer_len=24, sys_pages=1)  # 2 full prompt pages, 4 in all
    run_to_end(pool, first)
    assert pool.num_free_pages == 16 and len(pool.lru) == 4
    follow_up = request(1, prompt_len=64 + 20, sys_pages=1)  # the conversation so far, and a question
    assert held.leading(0, follow_up, 0.0) == 4
    assert pool.admit(follow_up, 0.0) and follow_up.cached_tokens == 64
    assert pool.num_free_pages == 16 - follow_up.total_pages  # the 4 cached pages are pinned again
    whole = request(1, prompt_len=64, sys_pages=1)  # a prompt cached entirely recomputes its last page
    assert pool.admit(whole, 0.0) and whole.cached_tokens == 48


def test_leading_pages_stop_at_the_first_page_missing():
    held = HeldPages(["r0"], expiring=False)
    pool = ReplicaPages(0, 16, held)
    run_to_end(pool, request(1, prompt_len=96))
    probe = request(1, prompt_len=96 + 16)
    assert held.leading(0, probe, 0.0) == 7
    key = probe.keys(2, 3)
    held.remove(0, key)  # the view loses page 2 (the pool keeps it: the view is what routers read)
    assert held.leading(0, probe, 0.0) == 2
    assert held.matched(probe, 0.0)[0] == {"r0": 2}


def test_the_pool_evicts_least_recently_released_pages_tail_first():
    events = []
    held = HeldPages(["r0"], expiring=False)
    pool = ReplicaPages(0, 6, held, emit=lambda kind, r, keys: events.append((kind, list(keys))))
    a, b = request(1, prompt_len=32), request(2, prompt_len=32)  # 3 pages each, with the answer
    run_to_end(pool, a)
    run_to_end(pool, b)
    events.clear()
    c = request(3, prompt_len=32)
    assert pool.admit(c, 0.0)
    assert events == [("removed", a.keys(0, 3)[::-1])]  # a went first, its last page first
    assert held.leading(0, request(1, prompt_len=48), 0.0) == 0
    assert held.leading(0, request(2, prompt_len=48), 0.0) == 3
    assert not pool.admit(request(4, prompt_len=64), 0.0)  # b's 3 cached pages are all that is free


def test_an_expiring_index_forgets_entries_after_their_ttl():
    index = HeldPages(["r0", "r1"], expiring=True)
    req = request(1, prompt_len=64)
    index.put(1, req.keys(0, 4), 10.0)
    assert index.matched(req, 5.0)[0] == {"r1": 4}
    assert index.matched(req, 10.0)[0] == {}


# ------------------------------------------------------------------ the engine's cost model
class Clock:
    """The simulator's side of a replica, alone: an event heap and what it reports."""

    def __init__(self):
        self.heap, self.seq, self.ttft, self.done = [], 0, {}, []

    def wake_at(self, t, replica, version):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, replica, version))

    def first_token(self, req, t):
        self.ttft[req.id] = t - req.arrival

    def finished(self, req, t):
        self.done.append((req.id, t))

    def run(self):
        while self.heap:
            t, _, replica, version = heapq.heappop(self.heap)
            replica.wake(t, version)


class Submit:
    def __init__(self, replica, req):
        self.replica, self.req = replica, req

    def wake(self, t, version):
        self.replica.submit(self.req, t)


def test_a_cached_prompt_reaches_its_first_token_sooner_than_an_uncached_one():
    cost = CostModel(step_overhead_s=0.005, prefill_s_per_token=50e-6, decode_s_per_seq=1e-4, pages_per_replica=256)
    clock = Clock()
    replica = Replica(0, cost, ReplicaPages(0, cost.pages_per_replica, HeldPages(["r0"], expiring=False)), clock)
    cold = request(1, prompt_len=1024, answer_len=8, rid=1)
    replica.submit(cold, 0.0)
    clock.run()
    warm = request(1, prompt_len=1024, answer_len=8, rid=2)
    warm.arrival = 10.0
    replica.submit(warm, 10.0)
    clock.run()
    assert clock.ttft[1] == pytest.approx(0.005 + 1024 * 50e-6)
    assert warm.cached_tokens == 1008 and clock.ttft[2] == pytest.approx(0.005 + 16 * 50e-6)
    # then 7 decode steps of one sequence each
    assert clock.done[0][1] == pytest.approx(clock.ttft[1] + 7 * (0.005 + 1e-4))


def test_a_new_request_joins_a_run_of_decode_steps_at_the_next_step_boundary():
    cost = CostModel(step_overhead_s=0.01, prefill_s_per_token=0.0, decode_s_per_seq=0.0, pages_per_replica=64)
    clock = Clock()
    replica = Replica(0, cost, ReplicaPages(0, 64, HeldPages(["r0"], expiring=False)), clock)
    replica.submit(request(1, prompt_len=16, answer_len=11, rid=1), 0.0)  # prefill ends at 0.01, then 10 decodes
    late = request(2, prompt_len=16, answer_len=2, rid=2)
    late.arrival = 0.035
    clock.wake_at(0.035, Submit(replica, late), 0)
    clock.run()
    assert clock.ttft[2] == pytest.approx(0.04 + 0.01 - 0.035)  # it waits for the step that ends at 0.04
    assert dict(clock.done) == pytest.approx({1: 0.11, 2: 0.06})  # the shared steps decoded the first one too


# ------------------------------------------------------------------ the simulation
def test_a_seed_gives_the_same_report_and_every_page_comes_back():
    a = simulate(tiny("prefix_aware", seed=3))
    assert same(a, simulate(tiny("prefix_aware", seed=3)))
    assert not same(a, simulate(tiny("prefix_aware", seed=4)))
    sim = _Simulation(tiny("oracle"))
    sim.run()
    assert all(p.num_free_pages == p.num_pages and p.num_anon == 0 for p in sim.pools)
    assert len(sim.done) == 120 * 3


def test_hit_rates_rank_oracle_then_prefix_aware_then_round_robin():
    hit = {p: simulate(tiny(p)).hit_rate for p in ("oracle", "prefix_aware", "round_robin")}
    assert hit["oracle"] >= hit["prefix_aware"] > hit["round_robin"] + 0.1


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
def test_load_based_policies_spread_load_evenly(policy):
    report = simulate(tiny(policy, replicas=4, workload=replace(TINY, users=240)))
    assert report.max_served_ratio < 1.15 and report.max_load_ratio < 1.25


@pytest.mark.parametrize("policy", ["prefix_aware", "oracle"])
@pytest.mark.parametrize(
    "routing, pages, rate",
    [
        (RoutingConfig(rule="spill"), 300, 40.0),
        (RoutingConfig(rule="spill", spill_abs_threshold=1, min_free_page_fraction=0.5), 200, 80.0),
    ],
    ids=["defaults", "replicas-short-of-pages"],
)
def test_pruned_candidates_give_the_decisions_of_the_full_list(policy, routing, pages, rate):
    """Under the spill rule the simulator passes `choose` only the replicas that can win; the
    decisions must not change."""
    params = tiny(policy, routing=routing, cost=CostModel(pages_per_replica=pages), workload=replace(TINY, rate=rate))
    assert same(simulate(params), simulate(replace(params, full_candidates=True)))


def test_bad_parameters_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="pages"):
        simulate(tiny("oracle", cost=CostModel(pages_per_replica=8)))
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(tiny("random"))


# ------------------------------------------------------------------ the command
def test_the_command_parses_runs_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="kvfleet bench")
    add_simulate_parser(parser.add_subparsers(dest="bench", required=True))
    out = tmp_path / "sim.json"
    args = parser.parse_args(
        ["simulate", "--replicas", "4", "8", "--policies", "prefix_aware", "oracle", "--users", "30", "--turns", "2",
         "--rate", "20", "--warmup-s", "0", "--system-prompt-tokens", "256", "--pages-per-replica", "1024",
         "--json", str(out)]
    )  # fmt: skip
    reports = args.func(args)
    assert [(r.replicas, r.policy) for r in reports] == [(4, "prefix_aware"), (4, "oracle"), (8, "prefix_aware"),
                                                         (8, "oracle")]  # fmt: skip
    text = capsys.readouterr().out
    assert "hit rate" in text and "of the oracle's" in text
    saved = json.loads(out.read_text())
    assert len(saved["reports"]) == 4 and saved["params"]["workload"]["users"] == 30
    assert set(POLICIES) >= {r["policy"] for r in saved["reports"]}
