"""`kvfleet bench serve`: a seeded load of prefix-sharing conversations through the real gRPC API.

The workload: `--system-prompts` distinct system prompts of `--system-len` tokens; `--users`
conversations, each on one system prompt, of `--turns` turns. A turn's prompt is the system prompt,
the conversation so far (earlier questions and the model's actual answers) and a new question of
`--question-len` tokens; the answer is `--answer-len` tokens. Conversations start as a Poisson
process of `--rate` per second; a conversation's next turn follows its previous answer after an
exponential think time (`--think-time` mean). Token ids are drawn from the vocabulary with the
seed, so every policy sees the same prompts.

Each policy runs on a fresh local cluster (`--replicas` TargetWorkers; cold caches), one after the
other in this process; `--compare` runs prefix_aware, power_of_two and round_robin and prints the
ratios. Reported: TTFT, TPOT, inter-token latency and end-to-end latency (mean, p50, p90, p99),
requests/s and output tokens/s, and the prompt-token cache hit rate (cached / prompt tokens, from
each response's usage).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.bench.stats import percentile

POLICIES = ("prefix_aware", "power_of_two", "round_robin")


@dataclass
class Turn:
    user: int
    turn: int
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    replica: str = ""
    error: str = ""


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    return {"mean": statistics.fmean(xs)} | {f"p{round(q * 100)}": percentile(xs, q) for q in (0.5, 0.9, 0.99)}


async def _run_workload(target: str, args, vocab_size: int) -> tuple[list[Turn], float]:
    import grpc

    from protos.kvfleet.v1 import generation_pb2 as pb
    from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    low = 3  # skip the special tokens
    systems = [[rng.randrange(low, vocab_size) for _ in range(args.system_len)] for _ in range(args.system_prompts)]
    questions = {
        (u, t): [rng.randrange(low, vocab_size) for _ in range(args.question_len)]
        for u in range(args.users)
        for t in range(args.turns)
    }
    starts, t0 = [], 0.0
    for _ in range(args.users):
        t0 += rng.expovariate(args.rate)
        starts.append(t0)
    thinks = {(u, t): rng.expovariate(1 / args.think_time) if args.think_time > 0 else 0.0 for (u, t) in questions}
    results: list[Turn] = []

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        begin = time.perf_counter()

        async def conversation(u: int):
            await asyncio.sleep(max(0.0, begin + starts[u] - time.perf_counter()))
            history = list(systems[u % args.system_prompts])
            for t in range(args.turns):
                prompt = history + questions[(u, t)]
                turn = Turn(u, t)
                req = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=prompt),
                    sampling=pb.SamplingParams(max_tokens=args.answer_len, ignore_eos=True),
                )
                sent = last = time.perf_counter()
                answer: list[int] = []
                try:
                    async for r in stub.Generate(req, timeout=args.timeout):
                        now = time.perf_counter()
                        if r.token_ids:
                            if not answer:
                                turn.ttft = now - sent
                            else:
                                turn.itl.append(now - last)
                            last = now
                            answer += r.token_ids
                        if r.finish_reason:
                            turn.prompt_tokens = r.usage.prompt_tokens
                            turn.cached_tokens = r.usage.cached_prompt_tokens
                            turn.replica = r.replica
                    turn.e2e = time.perf_counter() - sent
                    turn.output_tokens = len(answer)
                except grpc.RpcError as e:
                    turn.error = f"{e.code().name}: {e.details()}"
                results.append(turn)
                if turn.error:
                    return
                history = prompt + answer
                await asyncio.sleep(thinks[(u, t)])

        await asyncio.gather(*(conversation(u) for u in range(args.users)))
        elapsed = time.perf_counter() - begin
    return results, elapsed


def _report(policy: str, turns: list[Turn], elapsed: float) -> dict:
    ok = [t for t in turns if not t.error]
    prompt = sum(t.prompt_tokens for t in ok)
    per_replica: dict[str, int] = {}
    for t in ok:
        per_replica[t.replica] = per_replica.get(t.replica, 0) + 1
    return {
        "policy": policy,
        "requests": len(turns),
        "errors": len(turns) - len(ok),
        "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": sum(t.output_tokens for t in ok) / elapsed,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": sum(t.cached_tokens for t in ok),
        "cache_hit_rate": sum(t.cached_tokens for t in ok) / prompt if prompt else 0.0,
        "ttft_s": _stats([t.ttft for t in ok]),
        "tpot_s": _stats([(t.e2e - t.ttft) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]),
        "itl_s": _stats([x for t in ok for x in t.itl]),
        "e2e_s": _stats([t.e2e for t in ok]),
        "requests_per_replica": dict(sorted(per_replica.items())),
        "first_errors": [t.error for t in turns if t.error][:3],
    }


def _run_policy(policy: str, args) -> dict:
    from cluster.config import ClusterConfig, GrpcConfig, IngressConfig, RayConfig, TargetConfig
    from cluster.local import ServeCluster
    from router.policy import RoutingConfig
    from workers.models.config import ModelConfig

    model = args.model
    engine = dict(device=args.device, max_model_len=args.max_model_len, num_pages=args.num_pages)
    config = ClusterConfig.local(model, **engine).model_copy(
        update={
            "target": TargetConfig(replicas=args.replicas, num_cpus=args.worker_cpus),
            "ingress": IngressConfig(replicas=1, num_cpus=0.25),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": RayConfig(num_cpus=max(4, args.replicas + 2), dashboard_port=0),
            "routing": RoutingConfig(policy=policy),
        }
    )
    vocab = ModelConfig.from_dir(model).vocab_size
    print(f"[{policy}] starting {args.replicas} replica(s) of {config.model_id}...", file=sys.stderr, flush=True)
    with ServeCluster(config, progress=lambda m: None) as cluster:
        turns, elapsed = asyncio.run(_run_workload(cluster.grpc_target, args, vocab))
    report = _report(policy, turns, elapsed)
    print(
        f"[{policy}] {report['requests']} requests in {elapsed:.1f} s, hit rate {report['cache_hit_rate']:.1%}, "
        f"mean TTFT {report['ttft_s']['mean'] * 1e3:.0f} ms",
        file=sys.stderr,
        flush=True,
    )
    return report


def _table(reports: list[dict]) -> str:
    ms = lambda s: f"{s * 1e3:8.1f}"  # noqa: E731
    lines = [
        f"{'policy':<14}{'hit rate':>9}{'TTFT mean':>10}{'p50':>9}{'p90':>9}{'p99':>9}{'TPOT p50':>9}"
        f"{'ITL p99':>9}{'E2E p50':>9}{'E2E p99':>9}{'req/s':>7}{'tok/s':>8}{'errors':>7}",
        "(latencies in ms)",
    ]
    for r in reports:
        t, e = r["ttft_s"], r["e2e_s"]
        lines.append(
            f"{r['policy']:<14}{r['cache_hit_rate']:>9.1%}{ms(t['mean']):>10}{ms(t['p50']):>9}{ms(t['p90']):>9}"
            f"{ms(t['p99']):>9}{ms(r['tpot_s']['p50']):>9}{ms(r['itl_s']['p99']):>9}{ms(e['p50']):>9}"
            f"{ms(e['p99']):>9}{r['requests_per_s']:>7.2f}{r['output_tokens_per_s']:>8.1f}{r['errors']:>7}"
        )
    return "\n".join(lines)


def run_serve_bench(args) -> dict:
    if args.model is None:
        from cluster.demo.model import shipped_demo_pair

        args.model = str(shipped_demo_pair()[0])
    policies = list(POLICIES) if args.compare else [args.policy]
    reports = [_run_policy(p, args) for p in policies]
    out = {"workload": {k: v for k, v in vars(args).items() if k != "func"}, "results": reports}
    print(_table(reports))
    if len(reports) > 1:
        base = reports[0]
        ratios = {}
        for r in reports[1:]:
            ratios[r["policy"]] = {
                "ttft_mean_ratio": r["ttft_s"]["mean"] / base["ttft_s"]["mean"] if base["ttft_s"]["mean"] else None,
                "ttft_p99_ratio": r["ttft_s"]["p99"] / base["ttft_s"]["p99"] if base["ttft_s"]["p99"] else None,
                "hit_rate_difference": base["cache_hit_rate"] - r["cache_hit_rate"],
            }
            print(
                f"{base['policy']} vs {r['policy']}: mean TTFT {ratios[r['policy']]['ttft_mean_ratio']:.2f}x lower, "
                f"p99 TTFT {ratios[r['policy']]['ttft_p99_ratio']:.2f}x lower, "
                f"hit rate {base['cache_hit_rate']:.1%} vs {r['cache_hit_rate']:.1%}"
            )
        out["ratios_vs_" + base["policy"]] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda o: asdict(o)) + "\n")
    return out


def add_serve_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "serve",
        help="prefix-sharing conversations through the gRPC API, per routing policy",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", help="model directory (default: the demo model kvfleet-pycoder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--worker-cpus", type=float, default=0.5, help="Ray CPUs per TargetWorker replica")
    p.add_argument("--policy", choices=POLICIES, default="prefix_aware")
    p.add_argument("--compare", action="store_true", help="run every policy on the same workload")
    p.add_argument("--system-prompts", type=int, default=3)
    p.add_argument("--system-len", type=int, default=768, help="tokens per system prompt")
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.0, help="conversations started per second (Poisson)")
    p.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a reply and the next turn")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-pages", type=int, default=1024, help="KV pages per replica (16 tokens each)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=run_serve_bench)
