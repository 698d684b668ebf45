"""A tensor-parallel worker group: rank 0 is the engine's own process; ranks 1..n-1 run here.

`RankGroup(config)` starts ranks 1..n-1 and `join_as_rank0` makes the caller rank 0 of one
`torch.distributed` group (NCCL on GPU, gloo on CPU; every collective times out after
`tp_timeout_s`, so a dead rank fails the engine's step instead of hanging it). Where the ranks run:

- inside a Ray Serve replica whose placement group has one bundle per rank (the TargetWorker
  deployment asks for them, STRICT_PACK: one node): ranks are Ray actors in bundles 1..n-1;
- anywhere else (tests, a single machine without Ray): local processes (spawned), rank r on
  cuda:r when the engine runs on CUDA.

Each rank builds the same runner as the engine (`workers.runner.model_runner.build_runner`) over its shard and
serves rank 0's steps (`ModelRunner.serve_ranks`) until rank 0 stops the group.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from workers.config import EngineConfig
from workers.layers.parallel import TPInfo
from workers.models.config import ModelConfig
from workers.runner.config import resolve_device
from workers.runner.model_runner import build_runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupInit:
    size: int
    master_addr: str
    master_port: int
    backend: str
    timeout_s: float


def join(init: GroupInit, rank: int) -> TPInfo:
    import torch.distributed as dist

    dist.init_process_group(
        init.backend,
        init_method=f"tcp://{init.master_addr}:{init.master_port}",
        rank=rank,
        world_size=init.size,
        timeout=timedelta(seconds=init.timeout_s),
    )
    return TPInfo(rank=rank, size=init.size)


def rank_device(device: str, rank: int, in_ray: bool) -> torch.device:
    d = resolve_device(device)
    if d.type != "cuda":
        return d
    # A Ray actor sees only its own GPU (CUDA_VISIBLE_DEVICES); local processes share all of them.
    return torch.device("cuda", 0 if in_ray else (d.index or 0) + rank)


def run_rank(config: EngineConfig, init: GroupInit, rank: int, in_ray: bool = False) -> None:
    """The life of rank `rank` (>= 1): join, build its shard, serve rank 0's steps, leave."""
    import torch.distributed as dist

    device = rank_device(config.device, rank, in_ray)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = join(init, rank)
    try:
        runner = build_runner(config, ModelConfig.from_dir(config.model), device, tp)
        runner.serve_ranks()
    finally:
        dist.destroy_process_group()


class RankActor:
    """Ranks 1..n-1 inside a Ray placement group (created by `RankGroup` as Ray actors)."""

    def run(self, config: EngineConfig, init: GroupInit, rank: int) -> None:
        run_rank(config, init, rank, in_ray=True)


class RankGroup:
    def __init__(self, config: EngineConfig):
        self.config = config
        size = config.tensor_parallel_size
        on_cuda = rank_device(config.device, 0, in_ray=False).type == "cuda"
        backend = config.tp_backend if config.tp_backend != "auto" else ("nccl" if on_cuda else "gloo")
        self._processes = []
        self._actors = []
        self._runs = []
        self.in_ray = _current_placement_group() is not None
        addr = _node_ip() if self.in_ray else "127.0.0.1"
        self.init = GroupInit(size, addr, _free_port(addr), backend, config.tp_timeout_s)
        if self.in_ray:
            self._start_actors()
        else:
            self._start_processes()
        where = "Ray actors" if self.in_ray else "local processes"
        logger.info("tensor-parallel group of %d (%s, ranks 1..n-1 as %s) at %s", size, backend, where, addr)

    def join_as_rank0(self, device: torch.device) -> TPInfo:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return join(self.init, 0)

    def alive(self) -> bool:
        """False once any rank has died (its process exited or its actor task ended)."""
        if self._processes:
            return all(p.is_alive() for p in self._processes)
        if self._runs:
            import ray

            done, _ = ray.wait(self._runs, timeout=0)
            return not done
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """After rank 0 has stopped the ranks: wait for them, then leave the group."""
        import torch.distributed as dist

        for p in self._processes:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
        if self._runs:
            import ray

            ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout_s)
            for actor in self._actors:
                ray.kill(actor)
        self._processes, self._actors, self._runs = [], [], []
        if dist.is_initialized():
            dist.destroy_process_group()

    def _start_processes(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA or thread state
        for rank in range(1, self.init.size):
            args = (self.config, self.init, rank)
            p = ctx.Process(target=run_rank, args=args, daemon=True, name=f"kvfleet-rank{rank}")
            p.start()
            self._processes.append(p)

    def _start_actors(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = _current_placement_group()
        if pg.bundle_count < self.init.size:
            raise ValueError(
                f"tensor_parallel_size {self.init.size} needs a placement group of {self.init.size} bundles, "
                f"this replica has {pg.bundle_count}"
            )
        bundle = pg.bundle_specs[1] if pg.bundle_count > 1 else {}
        cls = ray.remote(RankActor)
        for rank in range(1, self.init.size):
            actor = cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote()
            self._actors.append(actor)
            self._runs.append(actor.run.remote(self.config, self.init, rank))


def _current_placement_group():
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return ray.util.get_current_placement_group()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _free_port(host: str) -> int:
    """A TCP port free a moment ago, for the group's rendezvous (kvstore.redis_server has one too,
    but importing it would pull Redis into the engine's layer)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
