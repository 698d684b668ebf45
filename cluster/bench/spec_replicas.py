"""Draft replicas for `kvfleet bench spec`: a local Ray, a private Redis and DraftWorkers served
behind their sticky prefix-aware router, as cluster/app.py deploys them, and the target's clients
of them (workers/spec/draft_client.py's RoutedDraftProposer) over one DeploymentHandle.

Every client (`replicas`: pinned calls straight to the replica over its socket channel, proposals
computed ahead during verification, as the cluster runs it; `replicas-actor`: the same with pinned
calls through the replica's actor instead (draft.channel off); `replicas-selective`: lookaheads only where steps
accept their whole proposal at least 30% of the time; `replicas-direct`: no lookahead;
`replicas-plain`: every call through the handle's router, no lookahead) talks to the same
replicas, so their rows share the draft's deployment and the machine's state.
"""

from __future__ import annotations

import torch

from cluster.config import DraftConfig

# proposer name -> (pinned calls straight to the replica, lookahead's min rate (None: no lookahead),
# those calls over the replica's channel rather than its actor)
_CHANNEL = DraftConfig.model_fields["channel"].default
VARIANTS = {
    "replicas": (True, DraftConfig.model_fields["lookahead_min_rate"].default, _CHANNEL),
    "replicas-actor": (True, DraftConfig.model_fields["lookahead_min_rate"].default, False),
    "replicas-selective": (True, 0.3, _CHANNEL),
    "replicas-direct": (True, None, _CHANNEL),
    "replicas-plain": (False, None, False),
}


class DraftReplicas:
    def __init__(self, args, target, k_max: int):
        """`target`: the target's EngineConfig (the draft's engine settings derive from it)."""
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig

        from cluster.app import with_cpu_threads
        from kvstore.index import IndexConfig
        from kvstore.redis_server import LocalRedisServer
        from router.prefix_router import StickyPrefixRouter
        from workers.deployment import DraftWorker

        self.args = args
        self.page_size = target.page_size
        self.redis = LocalRedisServer().start()
        index = IndexConfig(redis_url=self.redis.url)
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
        serve.start(proxy_location="Disabled")
        draft = DraftConfig(model=args.draft, num_pages=args.num_pages).engine_config(target)
        # as the cluster runs a replica: the threads of the CPUs it reserved, unless told
        draft = with_cpu_threads(draft.model_copy(update={"cpu_threads": args.draft_cpu_threads}), args.draft_num_cpus)
        self.draft_threads = draft.cpu_threads
        self.model_id = draft.served_model_id
        router = RequestRouterConfig(
            request_router_class=StickyPrefixRouter,
            request_router_kwargs={"index": index.model_dump(), "model_id": self.model_id},
            request_routing_stats_period_s=0.5,
        )
        app = serve.deployment(
            DraftWorker,
            name="DraftWorker",
            num_replicas=args.draft_replicas,
            max_ongoing_requests=64,
            request_router_config=router,
            ray_actor_options={"num_cpus": args.draft_num_cpus, "num_gpus": draft_gpus(args)},
        ).bind(draft, k_max, index)
        self.handle = serve.run(app, name="kvfleet-bench-spec", route_prefix=None)

    def proposer(self, name: str, device: torch.device):
        """The client of these replicas that proposer `name` is (see VARIANTS)."""
        from workers.deployment import draft_submit
        from workers.spec.draft_client import RoutedDraftProposer

        direct, min_rate, channel = VARIANTS[name]
        return RoutedDraftProposer(
            draft_submit(self.handle, direct=direct, channel=channel),
            device,
            self.page_size,
            self.model_id,
            self.args.draft_timeout_s,
            lookahead=min_rate is not None,
            lookahead_min_rate=min_rate or 0.0,
        )

    def round_trips(self, n: int = 200) -> dict:
        """Median ms of an empty proposal call (no sequences: transport and wrappers, no draft work)
        pinned to one replica, `n` of each in turn: over its channel, through its actor, and
        through the handle's router."""
        import statistics
        import time

        from workers.deployment import draft_submit
        from workers.spec.draft_routes import DraftCall
        from workers.spec.wire import DraftBatch

        rid = self.handle.stats.remote().result(timeout_s=60).replica_id
        call = DraftCall(rid, [], DraftBatch([]))
        over_channel = draft_submit(self.handle, channel=True)
        deadline = time.monotonic() + 30
        while not over_channel.channels.ready(rid) and time.monotonic() < deadline:
            over_channel(call).result(timeout_s=10)
            time.sleep(0.01)
        paths = {
            "channel": over_channel,
            "actor": draft_submit(self.handle, channel=False),
            "handle": lambda c: self.handle.propose.remote(c.batch, draft_replica=c.replica_id),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        kinds: dict[str, set] = {name: set() for name in paths}
        for _ in range(n):
            for name, submit in paths.items():
                t0 = time.perf_counter()
                pending = submit(call)
                pending.result(timeout_s=10)
                times[name].append(time.perf_counter() - t0)
                kinds[name].add(type(pending).__name__)
        out = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
        out["call_types"] = {name: sorted(k) for name, k in kinds.items()}  # the channel's must be ChannelCall
        return out

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.redis.close()


def draft_gpus(args) -> float:
    """GPUs a draft replica reserves: as asked, else a share of the GPU the target here runs on."""
    if args.draft_num_gpus is not None:
        return args.draft_num_gpus
    return 0.0 if args.device == "cpu" or not torch.cuda.is_available() else 0.5


def lookahead_row(before: dict, after: dict) -> dict:
    """A replicas row's lookahead over its timed runs (client stats before and after): how often a
    step's proposal was ready, why not, and what reading one and calling on a miss cost."""
    d = {k: after[k] - before[k] for k in after}
    looked = d["num_ahead_hits"] + d["num_ahead_misses"]
    return {
        "lookahead_hit_rate": round(d["num_ahead_hits"] / looked, 3) if looked else None,
        "lookahead_misses_rejected": d["num_ahead_misses_rejected"],  # the target rejected a drafted token
        "lookahead_misses_guess": d["num_ahead_misses"] - d["num_ahead_misses_rejected"],  # or the bonus guess
        "ahead_read_ms": round(1e3 * d["ahead_wait_s"] / max(1, looked), 3),  # per lookahead read
        "call_ms_per_call": round(1e3 * d["call_wait_s"] / max(1, d["num_calls"]), 3),
        # of which the replica's own work (the rest: Ray, Serve, pickling, waiting for a busy replica)
        "call_compute_ms": round(1e3 * d["call_compute_s"] / max(1, d["num_calls"]), 3),
        "ahead_compute_ms": round(1e3 * d["ahead_compute_s"] / max(1, d["num_ahead_read"]), 3),
        "direct_calls": d["num_direct_calls"],  # pinned calls straight to the replica (lookaheads included)
        "channel_calls": d["num_channel_calls"],  # of those, over its socket channel
    }
