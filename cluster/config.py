"""`ClusterConfig`: one YAML file describes a whole kvfleet cluster, validated once (pydantic).

    engine:                      # workers.config.EngineConfig: the model and every engine knob
      model: /models/llama-3-8b
      max_model_len: 8192
    target: {replicas: 4, num_gpus: 1}
    ingress: {replicas: 2}
    grpc: {port: 50051}
    limits: {max_request_bytes: 16777216, max_stop_strings: 16}   # router.limits.LimitsConfig
    draft: {model: /models/llama-3-1b, replicas: 2, num_speculative_tokens: 4}   # optional
    index: {redis_url: redis://redis:6379/0}     # omit in local mode: a private server is started
    kv_transfer: {enabled: true}                 # replicas pull prefix pages from each other
    ray: {address: auto}                         # omit in local mode: a local Ray is started

Every other section nests the config model of the folder that owns it (`EngineConfig` from
workers/, `IndexConfig` from kvstore/), so no field is declared twice. `kvfleet serve` with no
file builds `ClusterConfig.local(model_dir)`: local Ray, private Redis, the demo model on CPU.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvstore.index import IndexConfig
from router.limits import LimitsConfig
from router.policy import RoutingConfig
from workers.config import EngineConfig, KVTransferConfig, SpeculativeConfig, dir_model_id


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(_Section):
    """The TargetWorker deployment: one replica per worker group (one engine)."""

    replicas: int = Field(1, ge=1, description="Worker groups, each with its own engine and KV cache.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks (GPUs) per worker group: the model is split over them, Megatron-style."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per rank of a replica.")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs Ray reserves per rank of a replica; default: 1 on a CUDA device, or on 'auto' when "
        "the Ray cluster has GPUs, else 0.",
    )
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests a replica holds at once (running + waiting in its engine)."
    )
    health_check_period_s: float = Field(5.0, gt=0, description="How often Serve checks each replica.")
    routing_stats_period_s: float = Field(1.0, gt=0, description="How often replicas report their load to routers.")
    metrics_period_s: float = Field(1.0, gt=0, description="How often replicas update their gauges.")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each rank of a replica asks for, e.g. {'kvfleet-target': 1}: with nodes that "
        "advertise them (the Helm chart's target pods do), target replicas land there and nowhere else.",
    )
    main_loop: bool = Field(
        True,
        description="Run the replicas' code on their Serve replica's main event loop (Serve's "
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, as in its throughput-optimized mode): every call, a pull's "
        "export among them, crosses one thread less. The engine never blocks its loop for long (steps run on a "
        "thread of their own). False: Serve's default, a loop on a thread of its own.",
    )


class DraftConfig(_Section):
    """Draft replicas for speculative decoding: DraftWorker deployments of a small model that share
    the target's tokenizer. Target workers send each step's proposal requests to them in one call
    and verify exactly; when the replicas are slow or down, the target decodes alone."""

    model: str = Field(description="Draft model directory (same tokenizer and vocabulary as the target).")
    replicas: int = Field(1, ge=1, description="DraftWorker replicas, each with its own paged KV cache.")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Most tokens proposed per sequence per step (k).")
    adaptive: bool = Field(True, description="Choose k per step from the measured acceptance rate and draft cost.")
    max_batch_size: int = Field(32, ge=1, description="Decodes in a step above which targets do not speculate.")
    timeout_s: float = Field(0.5, gt=0, description="A proposal call slower than this is dropped for that step.")
    lookahead: bool = Field(
        True,
        description="While the target verifies a step, its draft replicas already propose for the next one "
        "(assuming the whole proposal accepted); a guess that does not fit costs only the draft's work.",
    )
    lookahead_min_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Ask for a lookahead only where steps accept their whole proposal at least this often "
        "(measured apart after a step that accepted everything and after one that did not; 0: always). "
        "For draft replicas without spare capacity (a lookahead that misses delays the call after it); "
        "0.3 skips most lookaheads after a rejection (with the demo pair, 26% of those steps accept everything).",
    )
    channel: bool = Field(
        True,
        description="Pinned proposal calls (a sequence's calls after its first) go over a socket from the target "
        "straight to its draft replica (opened once per replica, authenticated with a key the replica hands out "
        "through Ray), not through Ray and Serve's request wrapper: a round trip of well under a millisecond "
        "instead of several. Ray Serve still places, routes and replaces the replicas; a channel that fails is "
        "dropped and that replica's calls go through Ray. False: no socket (every call through Ray).",
    )
    retry_after_s: float = Field(5.0, gt=0, description="After a failed call, targets decode alone this long.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per draft replica.")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per draft replica; default: 1 on a CUDA device, or on 'auto' when the Ray cluster "
        "has GPUs, else 0.",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Proposal calls one draft replica holds at once.")
    num_pages: int | None = Field(None, ge=1, description="KV pages of each draft replica's pool.")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each draft replica asks for, e.g. {'kvfleet-draft': 1}: with nodes that "
        "advertise them (the Helm chart's draft pods do), draft replicas land there and nowhere else.",
    )

    def engine_config(self, target: EngineConfig) -> EngineConfig:
        """The draft replica's engine settings: the target's, for the draft model."""
        return target.model_copy(
            update={
                "model": self.model,
                "model_id": None,
                "tokenizer": None,
                "speculative": None,
                "num_pages": self.num_pages,
                "skip_tokenizer_init": True,
                "tensor_parallel_size": 1,
            }
        )

    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig(
            method="replicas",
            num_speculative_tokens=self.num_speculative_tokens,
            adaptive=self.adaptive,
            max_batch_size=self.max_batch_size,
            retry_after_s=self.retry_after_s,
        )


class IngressConfig(_Section):
    """The ingress deployment: the gRPC servicer and the OpenAI HTTP API (validation, tokenization, page hashes)."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(4096, ge=1, description="Streams one ingress replica serves at once.")


class GrpcConfig(_Section):
    port: int = Field(
        50051, ge=0, le=65535, description="Port of Ray Serve's gRPC proxy on every node (0: a free port)."
    )
    http_port: int = Field(8000, ge=0, le=65535, description="Port of Serve's HTTP proxy (0: any free port).")
    host: str = Field(
        "0.0.0.0",
        description="Address Serve's gRPC and HTTP proxies listen on; local mode uses 127.0.0.1 (set 0.0.0.0 to "
        "expose the API to the network). The gRPC proxy binds it where kvfleet starts Serve (cluster/bind.py).",
    )
    auth_token_file: str | None = Field(
        None,
        description="A file holding the token every call must carry as `authorization: Bearer <token>` "
        "metadata (e.g. a mounted Secret; read when an ingress replica starts); None: no check. "
        "grpc.health Check stays open for probes.",
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="An existing Ray cluster ('auto', 'ray://...'); None: start one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: the machine's).")
    include_dashboard: bool = Field(
        True,
        description="Start Ray's dashboard with a local Ray (it needs ray[default]'s packages).",
    )
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=0, le=65535)
    namespace: str = "kvfleet"


class ClusterConfig(_Section):
    engine: EngineConfig
    target: TargetConfig = TargetConfig()
    ingress: IngressConfig = IngressConfig()
    grpc: GrpcConfig = GrpcConfig()
    limits: LimitsConfig = Field(
        LimitsConfig(), description="What one request may ask for, checked at the ingress before any work."
    )
    index: IndexConfig | None = Field(
        None, description="The shared page index; None: start a private Redis-protocol server (local mode)."
    )
    routing: RoutingConfig = Field(
        RoutingConfig(), description="How the ingress picks a TargetWorker replica for each request (router/policy.py)."
    )
    draft: DraftConfig | None = Field(None, description="Draft replicas for speculative decoding; None: none.")
    kv_transfer: KVTransferConfig = Field(
        KVTransferConfig(), description="Pulls of KV pages between TargetWorker replicas (workers/kv_transfer.py)."
    )
    ray: RayConfig = RayConfig()
    app_name: str = Field("kvfleet", description="Ray Serve application name (the gRPC 'application' metadata).")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.engine.replica_id:
            raise ValueError("engine.replica_id is set by each worker replica; leave it out of the config")
        if self.engine.tensor_parallel_size not in (1, self.target.tensor_parallel_size):
            raise ValueError("set the tensor-parallel size as target.tensor_parallel_size, not engine's")
        if self.draft is not None and self.engine.speculative is not None:
            raise ValueError("set either draft (draft replicas) or engine.speculative (in-process), not both")
        if self.kv_transfer.enabled and self.target.tensor_parallel_size > 1:
            raise ValueError("kv_transfer needs target.tensor_parallel_size 1 (a pull moves rank 0's KV only)")
        if self.kv_transfer.enabled and self.routing.policy == "power_of_two":
            raise ValueError(
                "kv_transfer needs routing.policy prefix_aware or round_robin (they route a pull to its holder)"
            )
        return self

    @property
    def worker_engine(self) -> EngineConfig:
        """The engine config each TargetWorker replica runs (with the group's tensor-parallel size)."""
        return self.engine.model_copy(update={"tensor_parallel_size": self.target.tensor_parallel_size})

    @property
    def draft_model_id(self) -> str:
        """The draft model's id: the draft replicas index their pages under it ("" without a draft)."""
        if self.draft is None:
            return ""
        return dir_model_id(self.draft.model)

    @property
    def model_id(self) -> str:
        return self.engine.served_model_id

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    @classmethod
    def local(cls, model_dir: str | Path, **engine) -> ClusterConfig:
        """Local mode: a private Ray and Redis on this machine, gRPC (:50051) and HTTP (:8000) on 127.0.0.1, CPU
        by default."""
        engine = {"device": "cpu", **engine}
        return cls(engine=EngineConfig(model=str(model_dir), **engine), grpc=GrpcConfig(host="127.0.0.1"))
