"""`kvfleet bench simulate`: every routing policy at every cluster size on one seeded workload, simulated
(cluster/bench/sim_cluster.py), printed as a table with issue 6's targets and written as JSON."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict, fields, replace
from pathlib import Path

from cluster.bench.sim_cluster import LOAD_VIEWS, POLICIES, Report, SimParams, simulate
from cluster.bench.sim_replica import PAGE_SIZE, CostModel
from cluster.bench.sim_workload import Workload
from router.policy import RoutingConfig


def _table(reports: list[Report]) -> str:
    head = (
        f"{'replicas':>8} {'policy':<13} {'requests':>8} {'hit rate':>8} {'TTFT mean':>9} {'p50':>7} {'p90':>7} "
        f"{'p99':>7} {'e2e p50':>7} {'p99':>7} {'req/s':>7} {'load':>5} {'max/mean':>8} {'served':>6} "
        f"{'passed':>6}  reasons"
    )
    lines = [head, "-" * (len(head) + 20)]
    for r in reports:
        reasons = " ".join(f"{k}={v}" for k, v in r.reasons.items())
        lines.append(
            f"{r.replicas:>8} {r.policy:<13} {r.requests:>8} {r.hit_rate:>8.1%} {r.ttft_mean * 1e3:>7.0f}ms "
            f"{r.ttft_p50 * 1e3:>5.0f}ms {r.ttft_p90 * 1e3:>5.0f}ms {r.ttft_p99 * 1e3:>5.0f}ms {r.e2e_p50:>6.1f}s "
            f"{r.e2e_p99:>6.1f}s {r.requests_per_s:>7.1f} {r.mean_load:>5.1f} {r.max_load_ratio:>7.2f}x "
            f"{r.max_served_ratio:>5.2f}x {r.passed_over:>6}  {reasons}"
        )
    return "\n".join(lines)


def run_simulation(
    params: SimParams, replicas: list[int], policies: list[str], json_path: str | None = None, echo=print
) -> list[Report]:
    """Every policy at every cluster size, on the same seeded workload; print a table (and write JSON)."""
    reports = []
    for n in replicas:
        for policy in policies:
            reports.append(simulate(replace(params, replicas=n, policy=policy)))
            echo(f"  {n} replicas, {policy}: {reports[-1].wall_s:.1f} s", flush=True)
    ok = _targets(reports)
    echo(_table(reports) + ("\n" + ok if ok else ""))
    if json_path:
        out = {"params": _jsonable(params), "reports": [asdict(r) for r in reports]}
        Path(json_path).write_text(json.dumps(out, indent=1))
    return reports


def _targets(reports: list[Report]) -> str:
    """Issue 6's targets, for each size where both prefix_aware and oracle ran."""
    by = defaultdict(dict)
    for r in reports:
        by[r.replicas][r.policy] = r
    lines = []
    for n, rs in by.items():
        if "prefix_aware" in rs and "oracle" in rs:
            pa, orc = rs["prefix_aware"], rs["oracle"]
            ratio = pa.hit_rate / orc.hit_rate if orc.hit_rate else 1.0
            worst = max(pa.max_load_ratio, pa.max_served_ratio)
            lines.append(
                f"{n} replicas: prefix_aware's hit rate is {ratio:.1%} of the oracle's ({pa.hit_rate:.1%} vs "
                f"{orc.hit_rate:.1%}; target >= 95%: {'met' if ratio >= 0.95 else 'NOT met'}); its busiest replica "
                f"ran {pa.max_load_ratio:.2f}x the mean load and served {pa.max_served_ratio:.2f}x the mean "
                f"requests (target <= 1.5x: {'met' if worst <= 1.5 else 'NOT met'})"
            )
    return "\n".join(lines)


def _jsonable(params: SimParams) -> dict:
    out = {f.name: getattr(params, f.name) for f in fields(params)}
    out["workload"], out["cost"] = asdict(params.workload), asdict(params.cost)
    out["routing"] = params.routing.model_dump()
    return out


# ----------------------------------------------------------------- the command line
def add_simulate_parser(bench_subparsers) -> None:
    """`kvfleet bench simulate ...` (bench_subparsers: the `kvfleet bench` subparsers)."""
    w, c, p, rc = Workload(), CostModel(), SimParams(), RoutingConfig()
    sim = bench_subparsers.add_parser(
        "simulate",
        help="simulate routing policies on 8 to 1,024 replicas with a cost model (no GPUs)",
        description="The routing policy of router/policy.py driving a discrete-event simulation: prompt-token "
        "cache hit rate, TTFT, end-to-end latency and load balance per policy and cluster size. Example: "
        "kvfleet bench simulate --replicas 8 64 256 1024 --json sim.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 256])
    sim.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    sim.add_argument("--seed", type=int, default=p.seed)
    sim.add_argument("--json", help="also write the reports here")
    g = sim.add_argument_group("workload")
    g.add_argument("--system-prompts", type=int, default=w.system_prompts)
    g.add_argument("--system-prompt-tokens", type=int, default=w.system_prompt_tokens, help="mean length")
    g.add_argument("--prompt-zipf", type=float, default=w.prompt_zipf, help="popularity skew (0: uniform)")
    g.add_argument("--turns", type=int, default=w.turns, help="per conversation")
    g.add_argument("--question-tokens", type=int, default=w.question_tokens, help="mean")
    g.add_argument("--answer-tokens", type=int, default=w.answer_tokens, help="mean")
    g.add_argument("--rate-per-replica", type=float, default=w.rate_per_replica, help="requests/s (Poisson)")
    g.add_argument("--rate", type=float, help="requests/s in all (overrides --rate-per-replica)")
    g.add_argument("--think-s", type=float, default=w.think_s, help="mean pause between turns")
    g.add_argument("--duration-s", type=float, default=w.duration_s, help="conversations start over this long")
    g.add_argument("--users", type=int, help="run exactly this many conversations to their end instead")
    g.add_argument(
        "--warmup-s", type=float, default=w.warmup_s, help="measure requests arriving from then to --duration-s"
    )
    g = sim.add_argument_group("replica cost model")
    g.add_argument("--pages-per-replica", type=int, default=c.pages_per_replica, help=f"KV pages of {PAGE_SIZE}")
    g.add_argument("--max-batch", type=int, default=c.max_batch, help="sequences per step")
    g.add_argument("--max-batched-tokens", type=int, default=c.max_batched_tokens, help="tokens per step")
    g.add_argument("--step-overhead-ms", type=float, default=c.step_overhead_s * 1e3)
    g.add_argument("--prefill-us-per-token", type=float, default=c.prefill_s_per_token * 1e6)
    g.add_argument("--decode-us-per-seq", type=float, default=c.decode_s_per_seq * 1e6)
    g = sim.add_argument_group("index and routers")
    g.add_argument("--routers", type=int, default=p.routers, help="router processes (each sees its own requests)")
    g.add_argument(
        "--load-view",
        choices=LOAD_VIEWS,
        default=p.load_view,
        help="how a router knows loads. serve (what prefix_router.py reads): Ray Serve's queue-length cache, "
        "exact at each send, minus this router's completions, the heartbeat once stale; heartbeat: the last "
        "heartbeat plus this router's sends and completions; freshest: both",
    )
    g.add_argument("--queue-len-cache-s", type=float, default=p.queue_len_cache_s, help="Serve's cache timeout")
    g.add_argument("--index-lag-ms", type=float, default=p.index_lag_s * 1e3, help="KV event to index delay")
    g.add_argument("--index-ttl-s", type=float, default=p.index_ttl_s)
    g.add_argument("--heartbeat-ms", type=float, default=p.heartbeat_s * 1e3)
    g.add_argument(
        "--rule",
        choices=("predicted_ttft", "spill"),
        default=rc.rule,
        help="prefix_aware's rule (router/policy.py); 'spill' runs with pruned candidates, fast at 1,024 replicas",
    )
    g.add_argument("--spill-abs-threshold", type=float, default=rc.spill_abs_threshold)
    g.add_argument("--spill-rel-threshold", type=float, default=rc.spill_rel_threshold)
    g.add_argument("--min-matched-pages", type=int, default=rc.min_matched_pages)
    g.add_argument("--min-free-page-fraction", type=float, default=rc.min_free_page_fraction)
    g.add_argument("--full-candidates", action="store_true", help="pass every replica to the policy (slow)")
    sim.set_defaults(func=cmd_simulate)


def params_from_args(args) -> SimParams:
    return SimParams(
        workload=Workload(
            system_prompts=args.system_prompts,
            system_prompt_tokens=args.system_prompt_tokens,
            prompt_zipf=args.prompt_zipf,
            turns=args.turns,
            question_tokens=args.question_tokens,
            answer_tokens=args.answer_tokens,
            think_s=args.think_s,
            rate_per_replica=args.rate_per_replica,
            rate=args.rate,
            duration_s=args.duration_s,
            users=args.users,
            warmup_s=args.warmup_s,
        ),
        cost=CostModel(
            step_overhead_s=args.step_overhead_ms / 1e3,
            prefill_s_per_token=args.prefill_us_per_token / 1e6,
            decode_s_per_seq=args.decode_us_per_seq / 1e6,
            max_batch=args.max_batch,
            max_batched_tokens=args.max_batched_tokens,
            pages_per_replica=args.pages_per_replica,
        ),
        routing=RoutingConfig(
            rule=args.rule,
            spill_abs_threshold=args.spill_abs_threshold,
            spill_rel_threshold=args.spill_rel_threshold,
            min_matched_pages=args.min_matched_pages,
            min_free_page_fraction=args.min_free_page_fraction,
        ),
        routers=args.routers,
        load_view=args.load_view,
        queue_len_cache_s=args.queue_len_cache_s,
        index_lag_s=args.index_lag_ms / 1e3,
        index_ttl_s=args.index_ttl_s,
        heartbeat_s=args.heartbeat_ms / 1e3,
        seed=args.seed,
        full_candidates=args.full_candidates,
    )


def cmd_simulate(args) -> list[Report]:
    return run_simulation(params_from_args(args), args.replicas, args.policies, args.json)
