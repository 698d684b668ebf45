"""Warm every TargetWorker replica of a fresh local cluster before a bench's measured workload.

A replica's first steps of a kind pay one-time costs: Triton compiles its kernels for new shapes
(on a GPU, seconds per kernel; the compiled kernels land in an on-disk cache that later processes
reuse), allocators grow, lazy imports run. In `kvfleet bench serve --compare`, where each policy
runs on a fresh cluster one after the other, the first policy would pay them all inside its
measurement and the later ones would find the disk cache warm. So each replica first serves,
pinned to it (`pin_replica`, no routing): a prompt like the workload's first turns (a prefill with
nothing cached), a continuation of it (a prefill after a cached prefix), then a batch of short
prompts decoding together. Their tokens are drawn apart from the workload's (another seed), so the
workload's prefixes are still uncached when it starts.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor


def target_replica_ids(app_name: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#TargetWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted(n[len(prefix) :] for n in names)


def warm_up(app_name: str, vocab_size: int, prompt_len: int, extend_len: int, output_len: int, batch: int = 8) -> float:
    """Warm each replica (all at once); returns the seconds it took."""
    from ray import serve

    from workers.request import GenerateRequest, SamplingParams

    handle = serve.get_deployment_handle("TargetWorker", app_name=app_name).options(stream=True)
    rng = random.Random(0x5EED)
    sampling = SamplingParams(max_tokens=output_len, ignore_eos=True)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    def run(replica: str, prompt: list[int]) -> None:
        for _ in handle.generate.remote(GenerateRequest(prompt, sampling), pin_replica=replica):
            pass

    def one_replica(replica: str) -> None:
        first = tokens(prompt_len)
        run(replica, first)  # prefill, nothing cached
        run(replica, first + tokens(extend_len))  # prefill after a cached prefix
        prompts = [tokens(extend_len) for _ in range(batch)]
        with ThreadPoolExecutor(batch) as pool:  # decodes of a batch
            list(pool.map(lambda p: run(replica, p), prompts))

    start = time.perf_counter()
    replicas = target_replica_ids(app_name)
    with ThreadPoolExecutor(len(replicas)) as pool:
        list(pool.map(one_replica, replicas))
    return time.perf_counter() - start
