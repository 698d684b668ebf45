"""`kvfleet bench serve`: a seeded load of prefix-sharing conversations through the real gRPC API.

The workload: `--system-prompts` distinct system prompts of `--system-len` tokens; `--users`
conversations, each on one system prompt, of `--turns` turns. A turn's prompt is the system prompt,
the conversation so far (earlier questions and the model's actual answers) and a new question of
`--question-len` tokens; the answer is `--answer-len` tokens. Conversations start as a Poisson
process of `--rate` per second; a conversation's next turn follows its previous answer after an
exponential think time (`--think-time` mean). Token ids are drawn from the vocabulary with the
seed, so every policy sees the same prompts.

Each policy runs on a fresh local cluster (`--replicas` TargetWorkers; cold caches), one after the
other in this process, each replica warmed up first with prompts apart from the workload's (kernel
compiles and other one-time costs: cluster/bench/warmup.py; `--no-warmup` skips it); `--compare`
runs prefix_aware, power_of_two and round_robin and prints the ratios (`--rules predicted_ttft spill`
runs prefix_aware under each rule of router/policy.py). `--shape llama3-8b --load-format dummy` serves
Llama-3-8B's shapes with random weights and no tokenizer (the workload is token ids already).
Reported: TTFT, TPOT, inter-token latency and end-to-end latency (mean, p50, p90, p99), requests/s
and output tokens/s, and the prompt-token cache hit rate (cached / prompt tokens, from each
response's usage).

`--tiers` runs the workload on {no tier, host tier, host tier + pulls} instead (cluster/bench/tiers.py).

`--url` runs the same workload once against a deployment that is already serving, instead of local
clusters: `grpc://HOST:PORT` (or `HOST:PORT`) through the gRPC API, `http://HOST:PORT/v1` through the
OpenAI HTTP API (streamed `/v1/completions` with token-id prompts; `return_token_ids` keeps each
conversation's history in token ids); `--token` (default `$KVFLEET_TOKEN`) is its bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
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
    sent: float = 0.0  # seconds from the workload's start
    prompt: list[int] = field(default_factory=list, repr=False)
    answer: list[int] = field(default_factory=list, repr=False)


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    return {"mean": statistics.fmean(xs)} | {f"p{round(q * 100)}": percentile(xs, q) for q in (0.5, 0.9, 0.99)}


async def _run_workload(target: str, args, vocab_size: int) -> tuple[list[Turn], float]:
    """The conversations through `target`: a gRPC address, or an OpenAI HTTP base URL (http://...)."""
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

    async with _client(target, args) as send:
        begin = time.perf_counter()

        async def conversation(u: int):
            await asyncio.sleep(max(0.0, begin + starts[u] - time.perf_counter()))
            history = list(systems[u % args.system_prompts])
            for t in range(args.turns):
                prompt = history + questions[(u, t)]
                turn = Turn(u, t, prompt=prompt)
                sent = time.perf_counter()
                turn.sent = sent - begin
                answer = await send(prompt, turn)
                turn.e2e = time.perf_counter() - sent
                turn.output_tokens = len(answer)
                turn.answer = answer
                results.append(turn)
                if turn.error:
                    return
                history = prompt + answer
                await asyncio.sleep(thinks[(u, t)])

        await asyncio.gather(*(conversation(u) for u in range(args.users)))
        elapsed = time.perf_counter() - begin
    return results, elapsed


class _Clock:
    """TTFT and inter-token latencies of one turn, from the times its tokens arrive."""

    def __init__(self, turn: Turn):
        self.turn = turn
        self.sent = self.last = time.perf_counter()
        self.first = True

    def tokens(self) -> None:
        now = time.perf_counter()
        if self.first:
            self.turn.ttft = now - self.sent
            self.first = False
        else:
            self.turn.itl.append(now - self.last)
        self.last = now


@contextlib.asynccontextmanager
async def _client(target: str, args):
    """`send(prompt_ids, turn) -> answer_ids` over gRPC or OpenAI's HTTP API; it fills `turn`."""
    token = getattr(args, "token", None)
    if target.startswith(("http://", "https://")):
        import aiohttp

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = target.rstrip("/") + "/completions"
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:

            async def send_http(prompt: list[int], turn: Turn) -> list[int]:
                body = {
                    "prompt": prompt,
                    "max_tokens": args.answer_len,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "return_token_ids": True,
                }
                clock, answer = _Clock(turn), []
                try:
                    async with session.post(url, json=body) as r:
                        if r.status != 200:
                            turn.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                            return answer
                        async for line in r.content:
                            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                turn.error = f"HTTP stream: {event['error']['message']}"
                            for choice in event.get("choices", []):
                                if choice.get("token_ids"):
                                    clock.tokens()
                                    answer += choice["token_ids"]
                            if event.get("usage"):
                                turn.prompt_tokens = event["usage"]["prompt_tokens"]
                                details = event["usage"].get("prompt_tokens_details") or {}
                                turn.cached_tokens = details.get("cached_tokens", 0)
                except (aiohttp.ClientError, TimeoutError) as e:
                    turn.error = f"HTTP: {e!r}"
                return answer

            yield send_http
        return

    import grpc

    from protos.kvfleet.v1 import generation_pb2 as pb
    from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.insecure_channel(target.removeprefix("grpc://")) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def send_grpc(prompt: list[int], turn: Turn) -> list[int]:
            req = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(max_tokens=args.answer_len, ignore_eos=True),
            )
            clock, answer = _Clock(turn), []
            try:
                async for r in stub.Generate(req, timeout=args.timeout, metadata=metadata):
                    if r.token_ids:
                        clock.tokens()
                        answer += r.token_ids
                    if r.finish_reason:
                        turn.prompt_tokens = r.usage.prompt_tokens
                        turn.cached_tokens = r.usage.cached_prompt_tokens
                        turn.replica = r.replica
            except grpc.RpcError as e:
                turn.error = f"{e.code().name}: {e.details()}"
            return answer

        yield send_grpc


def _vocab_size(target: str, token: str | None) -> int:
    """The served model's vocabulary, asked of the deployment (gRPC ListModels or /v1/models)."""
    if target.startswith(("http://", "https://")):
        import urllib.request

        request = urllib.request.Request(target.rstrip("/") + "/models")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(json.load(reply)["data"][0]["vocab_size"])
    import grpc

    from protos.kvfleet.v1 import generation_pb2 as pb
    from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target.removeprefix("grpc://")) as channel:
        reply = pb_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata)
    return reply.models[0].vocab_size


def _run_url(args) -> dict:
    """The workload once, against the deployment at `args.url` (its routing policy, its replicas)."""
    vocab = _vocab_size(args.url, args.token)
    print(f"[{args.url}] {args.users} conversations...", file=sys.stderr, flush=True)
    turns, elapsed = asyncio.run(_run_workload(args.url, args, vocab))
    return _report(args.url, turns, elapsed)


def _report(policy: str, turns: list[Turn], elapsed: float, page_size: int = 16) -> dict:
    from cluster.bench.ceiling import hit_ceilings

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
        # the best any routing and cache could do on these turns (cluster/bench/ceiling.py)
        "cache_hit_ceiling": hit_ceilings(ok, page_size),
        "ttft_s": _stats([t.ttft for t in ok]),
        "tpot_s": _stats([(t.e2e - t.ttft) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]),
        "itl_s": _stats([x for t in ok for x in t.itl]),
        "e2e_s": _stats([t.e2e for t in ok]),
        "requests_per_replica": dict(sorted(per_replica.items())),
        "first_errors": [t.error for t in turns if t.error][:3],
    }


def _runs(args) -> list[tuple[str, str | None]]:
    """(policy, prefix-aware rule) per run: every prefix-aware rule of `--rules`, then with
    `--compare` the other policies. A run of another rule than the first is named `prefix_aware:RULE`."""
    rules = args.rules or ["predicted_ttft"]
    policies = list(POLICIES) if args.compare else [args.policy]
    runs = []
    for policy in policies:
        runs += [(policy, rule) for rule in rules] if policy == "prefix_aware" else [(policy, None)]
    return runs


def _run_policy(policy: str, args, rule: str | None = None) -> dict:
    from cluster.bench.serve_cluster import engine_settings, ray_settings, warm
    from cluster.config import ClusterConfig, GrpcConfig, IngressConfig, TargetConfig
    from cluster.local import ServeCluster
    from router.policy import RoutingConfig
    from workers.models.config import ModelConfig

    model = args.model
    config = ClusterConfig.local(model, **engine_settings(args)).model_copy(
        update={
            "target": TargetConfig(replicas=args.replicas, num_cpus=args.worker_cpus, num_gpus=args.worker_gpus),
            "ingress": IngressConfig(replicas=1, num_cpus=0.25),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": ray_settings(args),
            "routing": RoutingConfig(policy=policy, **({"rule": rule} if rule else {})),
        }
    )
    vocab = ModelConfig.from_dir(model).vocab_size
    if rule and rule != (args.rules or ["predicted_ttft"])[0]:
        policy = f"{policy}:{rule}"
    print(f"[{policy}] starting {args.replicas} replica(s) of {config.model_id}...", file=sys.stderr, flush=True)
    with ServeCluster(config, progress=lambda m: None) as cluster:
        warm(config.app_name, args, vocab)
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
        f"{'policy':<20}{'hit rate':>9}{'TTFT mean':>10}{'p50':>9}{'p90':>9}{'p99':>9}{'TPOT p50':>9}"
        f"{'ITL p99':>9}{'E2E p50':>9}{'E2E p99':>9}{'req/s':>7}{'tok/s':>8}{'errors':>7}",
        "(latencies in ms)",
    ]
    for r in reports:
        t, e = r["ttft_s"], r["e2e_s"]
        lines.append(
            f"{r['policy']:<20}{r['cache_hit_rate']:>9.1%}{ms(t['mean']):>10}{ms(t['p50']):>9}{ms(t['p90']):>9}"
            f"{ms(t['p99']):>9}{ms(r['tpot_s']['p50']):>9}{ms(r['itl_s']['p99']):>9}{ms(e['p50']):>9}"
            f"{ms(e['p99']):>9}{r['requests_per_s']:>7.2f}{r['output_tokens_per_s']:>8.1f}{r['errors']:>7}"
        )
    return "\n".join(lines)


# The workload's defaults. `--tiers`'s (TIERS_DEFAULTS over these) make hot prefixes that outgrow
# the replicas' pools (6 system prompts of 64 pages over 3 replicas of 128 pages, conversations'
# histories on top: two prompts fill a pool; fewer prompts land unevenly, prefix-aware routing
# putting 2-3 on one replica), at a rate a 2-core CPU serves with no tier without a growing queue
# (TTFT then measures caching more than queueing), with enough turns per system prompt (48
# conversations x 4 turns) that the workload's hit-rate ceiling (cache_hit_ceiling) is about 96%.
WORKLOAD_DEFAULTS = dict(
    host_kv_cache_gib=0.5,
    system_prompts=3,
    system_len=768,
    users=24,
    turns=3,
    question_len=32,
    answer_len=32,
    rate=1.0,
    think_time=1.0,
    num_pages=1024,
)
TIERS_DEFAULTS = dict(
    host_kv_cache_gib=0.25,
    system_prompts=6,
    system_len=1024,
    users=48,
    turns=4,
    question_len=8,
    answer_len=8,
    rate=0.25,
    num_pages=128,
)


def _fill_defaults(args) -> None:
    """The workload arguments left unset take WORKLOAD_DEFAULTS, or with --tiers TIERS_DEFAULTS."""
    for name, default in WORKLOAD_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, TIERS_DEFAULTS.get(name, default) if getattr(args, "tiers", False) else default)


def run_serve_bench(args) -> dict:
    _fill_defaults(args)
    args.token = args.token or os.environ.get("KVFLEET_TOKEN") or None
    if args.url is not None:
        if args.compare:
            raise SystemExit("--compare starts a local cluster per policy; with --url the deployment's policy runs")
        reports = [_run_url(args)]
        print(_table(reports))
        out = {"workload": {k: v for k, v in vars(args).items() if k not in ("func", "token")}, "results": reports}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return out
    if args.shape:
        from cluster.bench.shapes import resolve_model

        args.model = resolve_model(args, tempfile.mkdtemp(prefix="kvfleet-bench-"))
    if args.model is None:
        from cluster.demo.model import shipped_demo_pair

        args.model = str(shipped_demo_pair()[0])
    if args.tiers:
        from cluster.bench.tiers import run_tiers

        workload = {k: v for k, v in vars(args).items() if k not in ("func", "token")}
        out = {"workload": workload} | run_tiers(args, _run_workload, _report, _table)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return out
    workload = {k: v for k, v in vars(args).items() if k not in ("func", "token")}
    reports = []
    for policy, rule in _runs(args):
        reports.append(_run_policy(policy, args, rule))
        if args.json:  # what has run so far survives a later run that fails to start
            Path(args.json).write_text(json.dumps({"workload": workload, "results": reports}, indent=2) + "\n")
    out = {"workload": workload, "results": reports}
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
    from cluster.bench.shapes import add_shape_arguments

    p = bench_subparsers.add_parser(
        "serve",
        help="prefix-sharing conversations through the gRPC API, per routing policy",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--url",
        help="run against this deployment instead of local clusters: grpc://HOST:PORT (or HOST:PORT) for gRPC, "
        "http://HOST:PORT/v1 for the OpenAI HTTP API",
    )
    p.add_argument("--token", help="bearer token of the deployment at --url (default: $KVFLEET_TOKEN)")
    p.add_argument("--model", help="model directory (default: the demo model kvfleet-pycoder)")
    add_shape_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--worker-cpus", type=float, default=0.5, help="Ray CPUs per TargetWorker replica")
    p.add_argument(
        "--worker-gpus",
        type=float,
        default=None,
        help="Ray GPUs per TargetWorker replica (e.g. 0.25: four replicas share one GPU); default: 1 on CUDA",
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one engine step")
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "fp8", "int8", "int4"],
        help="every replica's weight scheme (engine.quantization): fp8 halves an 8B shape's weights, so four "
        "replicas share an 80 GB GPU with room for their KV pools",
    )
    p.add_argument(
        "--no-dashboard", dest="dashboard", action="store_false", help="start the local Ray without its dashboard"
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="measure from the first request of each fresh cluster (default: warm every replica up first: "
        "kernel compiles and the like, cluster/bench/warmup.py)",
    )
    p.add_argument("--policy", choices=POLICIES, default="prefix_aware")
    p.add_argument("--compare", action="store_true", help="run every policy on the same workload")
    p.add_argument(
        "--rules",
        nargs="+",
        choices=("predicted_ttft", "spill"),
        help="prefix_aware's rule(s) (router/policy.py), each a run of its own; the first is the baseline of "
        "the ratios (default: predicted_ttft)",
    )
    p.add_argument(
        "--tiers", action="store_true", help="run {no tier, host tier, host tier + pulls} (cluster/bench/tiers.py)"
    )
    p.add_argument("--variants", nargs="+", choices=("no_tier", "host_tier", "host_tier+pulls"), help="with --tiers")
    # the workload's defaults differ with --tiers (WORKLOAD_DEFAULTS, TIERS_DEFAULTS): None here
    helps = dict(
        host_kv_cache_gib="host tier per replica, GiB, with --tiers",
        system_len="tokens per system prompt",
        rate="conversations started per second (Poisson)",
        think_time="mean seconds between a reply and the next turn",
        num_pages="KV pages per replica (16 tokens each)",
    )
    for name, default in WORKLOAD_DEFAULTS.items():
        tiers = TIERS_DEFAULTS.get(name, default)
        note = f"default {default}" + (f"; {tiers} with --tiers" if tiers != default else "")
        help_ = f"{helps[name]} ({note})" if name in helps else f"({note})"
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None, help=help_)
    p.add_argument(
        "--spill-period",
        type=float,
        default=6.0,
        help="with --tiers: seconds between spilled turns (a document computed on one replica, then asked of "
        "another: cluster/bench/tiers.py), 0 for none",
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=run_serve_bench)
