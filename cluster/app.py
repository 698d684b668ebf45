"""The Ray Serve application of a kvfleet cluster, built from a `ClusterConfig`.

    OpenAIIngress (router/openai_api.py)  --DeploymentHandle, stream=True-->  TargetWorker x replicas
                  (optional) TargetWorker --one call per draft replica per step, sticky-->  DraftWorker x replicas

The ingress is the `kvfleet.v1.Generation` servicer behind Serve's gRPC proxy (`grpc_options`
lists its servicer functions) and, through the same request path, OpenAI's HTTP API behind Serve's
HTTP proxy (the application's route prefix is "/"); the handle to TargetWorkers picks a replica for each request
according to `config.routing`: kvfleet's prefix-aware router (router/prefix_router.py, the
default), Serve's power of two choices, or round robin. Proposal calls to DraftWorkers always go
through the sticky prefix-aware router (StickyPrefixRouter, keyed by the draft model's id): each
sequence keeps hitting the draft replica that holds its draft KV.

`build_app(config)` is for Python callers (local mode, tests); `app_builder` is the
`import_path` target of a Serve config file (KubeRay's serveConfigV2): its `args` are a
`ClusterConfig` as a mapping.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig
from router.ingress import GRPC_SERVICER_FUNCTIONS
from router.openai_api import OpenAIIngress
from router.prefix_router import PrefixAwareRouter, RoundRobinRouter, StickyPrefixRouter
from workers.config import EngineConfig
from workers.deployment import DraftWorker, TargetWorker


def build_app(config: ClusterConfig) -> Application:
    if config.index is None:
        raise ValueError("config.index is None: start a Redis server first (local mode does) and set index.redis_url")
    target = config.target
    gpus = _gpus(target.num_gpus, config.engine.device)  # per rank: a replica reserves one bundle per rank
    per_rank = {"CPU": target.num_cpus, "GPU": gpus, **target.ray_resources}
    placement = {}
    if target.tensor_parallel_size > 1:
        # One bundle per rank on one node: the replica (rank 0) takes bundle 0, workers/group.py
        # places ranks 1..n-1 in the others.
        placement = dict(
            placement_group_bundles=[per_rank] * target.tensor_parallel_size, placement_group_strategy="STRICT_PACK"
        )
    engine, draft_args = with_cpu_threads(config.worker_engine, target.num_cpus), {}
    if config.draft is not None:
        draft_router = RequestRouterConfig(
            request_router_class=StickyPrefixRouter,
            request_router_kwargs={
                "index": config.index.model_dump(),
                "model_id": config.draft_model_id,
                "routing": config.routing.model_dump(),
                "page_size": config.engine.page_size,
            },
            request_routing_stats_period_s=target.routing_stats_period_s,
        )
        draft = serve.deployment(
            DraftWorker,
            name="DraftWorker",
            num_replicas=config.draft.replicas,
            max_ongoing_requests=config.draft.max_ongoing_requests,
            request_router_config=draft_router,
            ray_actor_options=_actor_options(
                config.draft.num_cpus, _gpus(config.draft.num_gpus, config.engine.device), config.draft.ray_resources
            ),
        ).bind(
            with_cpu_threads(config.draft.engine_config(config.engine), config.draft.num_cpus),
            config.draft.num_speculative_tokens,
            config.index,
            config.draft.channel,
        )
        engine = engine.model_copy(update={"speculative": config.draft.speculative()})
        draft_args = dict(
            draft=draft,
            draft_timeout_s=config.draft.timeout_s,
            draft_model_id=config.draft_model_id,
            draft_lookahead=config.draft.lookahead,
            draft_lookahead_min_rate=config.draft.lookahead_min_rate,
            draft_channel=config.draft.channel,
        )
    if config.kv_transfer.enabled:
        draft_args["kv_transfer"] = config.kv_transfer
    worker = serve.deployment(
        TargetWorker,
        name="TargetWorker",
        num_replicas=target.replicas,
        max_ongoing_requests=target.max_ongoing_requests,
        health_check_period_s=target.health_check_period_s,
        request_router_config=_router_config(config),
        ray_actor_options=_actor_options(target.num_cpus, gpus, target.ray_resources, main_loop=target.main_loop),
        **placement,
    ).bind(engine, config.index, target.metrics_period_s, **draft_args)
    ingress = serve.deployment(
        OpenAIIngress,
        name="GenerationIngress",
        num_replicas=config.ingress.replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    )
    return ingress.bind(worker, config.engine, config.index, config.grpc.auth_token_file, config.limits)


def _gpus(configured: float | None, device: str) -> float:
    """GPUs an actor reserves: as configured; else 1 on a CUDA device, and for device 'auto' when
    the Ray cluster has GPUs (so that 'auto' finds one in the actor), else 0."""
    if configured is not None:
        return configured
    if device == "auto":
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return 1.0 if device.startswith("cuda") else 0.0


def with_cpu_threads(engine: EngineConfig, num_cpus: float) -> EngineConfig:
    """The engine of a replica that reserves `num_cpus`: `engine.cpu_threads` if set, else one torch
    thread per whole reserved CPU (None below one: torch's default, which Ray sets to 1)."""
    if engine.cpu_threads is not None or num_cpus < 1:
        return engine
    return engine.model_copy(update={"cpu_threads": int(num_cpus)})


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float], main_loop: bool = False) -> dict:
    """`main_loop`: the replica runs its code on Serve's main event loop (TargetConfig.main_loop); the
    env var joins the job's runtime_env (Ray merges env_vars and keeps its other fields)."""
    options: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    if main_loop:
        options["runtime_env"] = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
    return options


def _router_config(config: ClusterConfig) -> RequestRouterConfig:
    period = config.target.routing_stats_period_s
    policy = config.routing.policy
    if policy == "power_of_two":
        return RequestRouterConfig(request_routing_stats_period_s=period)
    if policy == "round_robin":
        return RequestRouterConfig(request_router_class=RoundRobinRouter, request_routing_stats_period_s=period)
    kwargs = {
        "index": config.index.model_dump(),
        "model_id": config.model_id,
        "routing": config.routing.model_dump(),
        "page_size": config.engine.page_size,
    }
    return RequestRouterConfig(
        request_router_class=PrefixAwareRouter, request_router_kwargs=kwargs, request_routing_stats_period_s=period
    )


def grpc_options(config: ClusterConfig) -> dict[str, Any]:
    """Serve's gRPC proxy: kvfleet's servicer functions; server reflection only where every call is
    open anyway (Serve answers reflection in the proxy, before the ingress checks a token)."""
    return {
        "port": config.grpc.port,
        "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
        "enable_reflection": config.grpc.auth_token_file is None,
    }


def controller_options(config: ClusterConfig) -> dict[str, Any]:
    """Serve's controller options: its proxies (which inherit the controller's environment) refuse
    gRPC messages over `limits.max_request_bytes` (RESOURCE_EXHAUSTED, before reading them whole)
    instead of Serve's 2 GiB; RAY_SERVE_GRPC_MAX_MESSAGE_SIZE is Serve's knob for it."""
    env = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.limits.max_request_bytes)}
    return {"runtime_env": {"env_vars": env}}


def app_builder(args: dict[str, Any]) -> Application:
    """Serve config entry point: `import_path: cluster.app:app_builder`, `args:` a ClusterConfig."""
    return build_app(ClusterConfig.model_validate(args))
