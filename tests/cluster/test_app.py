"""The Serve application built from a config (no cluster started: the deployments' options)."""

import pytest

from cluster.app import build_app
from cluster.config import ClusterConfig, DraftConfig, TargetConfig
from kvstore.index import IndexConfig
from workers.config import EngineConfig


def worker_deployment(config: ClusterConfig):
    # Application -> ingress bound deployment -> its first init argument, the workers' handle
    return build_app(config)._bound_deployment.init_args[0]._bound_deployment


def config(model_dir, **target) -> ClusterConfig:
    return ClusterConfig.local(model_dir).model_copy(
        update={"target": TargetConfig(**target), "index": IndexConfig(redis_url="redis://127.0.0.1:1/0")}
    )


def test_a_tensor_parallel_group_reserves_one_bundle_per_rank_on_one_node(model_dirs):
    worker = worker_deployment(config(model_dirs["llama"], tensor_parallel_size=2, num_cpus=0.5, num_gpus=1))
    assert worker._replica_config.placement_group_bundles == [{"CPU": 0.5, "GPU": 1.0}] * 2
    assert worker._replica_config.placement_group_strategy == "STRICT_PACK"
    assert worker.ray_actor_options["num_gpus"] == 1.0  # rank 0, the replica itself, in bundle 0
    engine_config = worker.init_args[0]
    assert engine_config.tensor_parallel_size == 2


def test_a_single_rank_group_needs_no_placement_group(model_dirs):
    worker = worker_deployment(config(model_dirs["llama"]))
    assert worker._replica_config.placement_group_bundles is None
    assert worker.init_args[0].tensor_parallel_size == 1


def test_the_tensor_parallel_size_is_set_once_in_the_target_section(model_dirs):
    with pytest.raises(ValueError, match=r"target\.tensor_parallel_size"):
        ClusterConfig(
            engine=EngineConfig(model=str(model_dirs["llama"]), tensor_parallel_size=2),
            target=TargetConfig(tensor_parallel_size=4),
        )


def test_custom_ray_resources_pin_targets_and_drafts_to_their_nodes(model_dirs):
    """The Helm chart's pods advertise kvfleet-target / kvfleet-draft; the replicas ask for them."""
    cfg = config(
        model_dirs["llama"], tensor_parallel_size=2, num_gpus=1, ray_resources={"kvfleet-target": 1}
    ).model_copy(
        update={"draft": DraftConfig(model=str(model_dirs["llama"]), replicas=3, ray_resources={"kvfleet-draft": 1})}
    )
    worker = worker_deployment(cfg)
    assert worker._replica_config.placement_group_bundles == [{"CPU": 1.0, "GPU": 1.0, "kvfleet-target": 1.0}] * 2
    assert worker.ray_actor_options["resources"] == {"kvfleet-target": 1.0}  # fits bundle 0
    draft = worker.init_kwargs["draft"]._bound_deployment  # TargetWorker(..., draft=the handle)
    assert draft.num_replicas == 3
    assert draft.ray_actor_options["resources"] == {"kvfleet-draft": 1.0}
    assert "resources" not in worker_deployment(config(model_dirs["llama"])).ray_actor_options


def test_gpus_follow_the_device_unless_configured(model_dirs):
    def gpus(device: str, **target) -> float:
        cfg = config(model_dirs["llama"], **target)
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"device": device})})
        return worker_deployment(cfg).ray_actor_options["num_gpus"]

    assert gpus("cuda") == 1.0 and gpus("cuda:0") == 1.0 and gpus("cpu") == 0.0
    assert gpus("auto") == 0.0  # this machine's Ray (if any) has no GPUs: 'auto' runs on CPU
    assert gpus("cpu", num_gpus=0.5) == 0.5


def test_kv_transfer_reaches_the_workers_only_when_enabled_and_needs_a_routing_policy_that_pins(model_dirs):
    from router.policy import RoutingConfig
    from workers.config import KVTransferConfig

    assert "kv_transfer" not in worker_deployment(config(model_dirs["llama"])).init_kwargs
    on = config(model_dirs["llama"]).model_copy(update={"kv_transfer": KVTransferConfig(enabled=True, timeout_s=1.5)})
    assert worker_deployment(on).init_kwargs["kv_transfer"].timeout_s == 1.5
    base = dict(engine=EngineConfig(model=str(model_dirs["llama"])), kv_transfer={"enabled": True})
    with pytest.raises(ValueError, match="round_robin"):
        ClusterConfig(**base, routing=RoutingConfig(policy="power_of_two"))
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        ClusterConfig(**base, target=TargetConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="host_kv_cache_gib"):
        EngineConfig(model=str(model_dirs["llama"]), host_kv_cache_gib=1, tensor_parallel_size=2)


def test_replicas_use_a_torch_thread_per_reserved_cpu_unless_cpu_threads_is_set(model_dirs):
    cfg = config(model_dirs["llama"], num_cpus=2).model_copy(
        update={"draft": DraftConfig(model=str(model_dirs["llama"]), num_cpus=3)}
    )
    worker = worker_deployment(cfg)
    draft = worker.init_kwargs["draft"]._bound_deployment
    assert worker.init_args[0].cpu_threads == 2 and draft.init_args[0].cpu_threads == 3
    assert worker.init_kwargs["draft_lookahead"] is True
    assert worker.init_kwargs["draft_lookahead_min_rate"] == cfg.draft.lookahead_min_rate  # the config's reaches it
    assert worker_deployment(config(model_dirs["llama"], num_cpus=0.5)).init_args[0].cpu_threads is None  # torch's
    pinned = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"cpu_threads": 1})})
    assert worker_deployment(pinned).init_args[0].cpu_threads == 1


def test_an_engine_runs_with_its_cpu_threads(model_dirs):
    import torch

    from workers.engine import Engine

    before = torch.get_num_threads()
    try:
        Engine(EngineConfig(model=str(model_dirs["llama"]), device="cpu", num_pages=64, cpu_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_targets_run_on_their_replicas_main_loop_unless_configured_off(model_dirs):
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert worker_deployment(config(model_dirs["llama"])).ray_actor_options["runtime_env"] == {"env_vars": env}
    assert "runtime_env" not in worker_deployment(config(model_dirs["llama"], main_loop=False)).ray_actor_options
