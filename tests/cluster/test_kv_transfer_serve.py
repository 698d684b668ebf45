"""Pulls of KV pages between TargetWorker replicas, end to end on loopback: a second Serve
application ("kvfleet-pull": 2 TargetWorkers of the tiny Llama with a host tier and kv_transfer on,
no CPUs reserved) beside the session cluster, on its Ray and Redis, under its own index namespace.
Calls go straight to the TargetWorker deployment, pinned to a replica (`pin_replica`), so a test
says which replica computes a prefix and which one must pull it. Heartbeats live 30 s here, so a
killed holder still looks alive to the index: the test that kills one runs last."""

from __future__ import annotations

import time

import pytest

from kvstore.hashing import page_hashes
from tests.conftest import scaled
from workers.config import dir_model_id
from workers.request import GenerateRequest, SamplingParams

APP = "kvfleet-pull"
PAGE = 4
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def pull_app(serve_cluster, model_dirs):
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ClusterConfig, IngressConfig, TargetConfig
    from router.policy import RoutingConfig
    from workers.config import EngineConfig, KVTransferConfig

    index = serve_cluster.config.index.model_copy(
        update={"namespace": "kvpull", "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 30.0}
    )
    engine = EngineConfig(
        model=str(model_dirs["llama"]), device="cpu", page_size=PAGE, num_pages=128, max_model_len=256,
        host_kv_cache_gib=0.01,
    )  # fmt: skip
    config = ClusterConfig(
        engine=engine,
        target=TargetConfig(replicas=2, num_cpus=0, metrics_period_s=0.2, routing_stats_period_s=0.2),
        ingress=IngressConfig(replicas=1, num_cpus=0),
        index=index,
        routing=RoutingConfig(),
        # the cost model's first guess favours pulls; the deadline is generous on 2 shared cores
        kv_transfer=KVTransferConfig(
            enabled=True, timeout_s=scaled(20), assumed_bandwidth_gib_s=10.0, replicas_refresh_s=0.2
        ),
        app_name=APP,
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield config
    serve.delete(APP)


def handle():
    from ray import serve

    return serve.get_deployment_handle("TargetWorker", app_name=APP)


def replica_ids() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#TargetWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted(n[len(prefix) :] for n in names)


def generate(config, tokens: list[int], replica: str, request_id: str):
    """The request's tokens and last delta, served by `replica`."""
    hashes = page_hashes(tokens, PAGE, dir_model_id(config.engine.model))
    request = GenerateRequest(tokens, GREEDY, request_id=request_id)
    stream = handle().options(stream=True).generate.remote(request, page_hashes=hashes, pin_replica=replica)
    deltas = list(stream)
    assert deltas[-1].replica_id == replica
    return [t for d in deltas for t in d.token_ids], deltas[-1]


def pinned(method: str, replica: str):
    return getattr(handle(), method).remote(pin_replica=replica).result(timeout_s=scaled(60))


def wait_for_index(config, tokens: list[int], replica: str, pages: int) -> None:
    from kvstore.index import PageIndex

    index = PageIndex(config.index, dir_model_id(config.engine.model))
    hashes = page_hashes(tokens, PAGE, dir_model_id(config.engine.model))[:pages]
    try:
        deadline = time.monotonic() + scaled(30)
        while index.lookup(hashes, [replica]).get(replica, 0) < pages:
            assert time.monotonic() < deadline, f"{replica} did not publish {pages} pages"
            time.sleep(0.1)
    finally:
        index.close()


def prompt(seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(64)] + [7]  # 16 full pages, then one token


def test_a_replica_pulls_the_prefix_another_computed_and_the_output_is_identical(pull_app):
    a, b = replica_ids()
    tokens = prompt(1)
    on_a, first = generate(pull_app, tokens, a, "pull-a")
    assert first.num_cached_prompt_tokens == 0
    wait_for_index(pull_app, tokens, a, 16)
    on_b, last = generate(pull_app, tokens, b, "pull-b")
    assert on_b == on_a
    assert last.num_cached_prompt_tokens == 64  # every full page, pulled from a
    st = pinned("pull_stats", b)
    assert (st.num_pulls, st.num_pages) == (1, 16) and st.num_bytes > 0
    assert pinned("stats", a).num_exported_pages == 16
    assert pinned("stats", b).num_inserted_pages == 16
    # the raw transport a pull is set against (kvfleet bench serve --tiers): a plain call from b to
    # a through the same path, returning as many bytes as those 16 pages
    size, seconds = handle().probe_raw.remote(a, 16, pin_replica=b).result(timeout_s=scaled(60))
    assert size == st.num_bytes and seconds > 0


def test_a_killed_holder_means_recompute_and_a_counted_error(pull_app):
    import ray

    a, b = replica_ids()
    tokens = prompt(2)
    on_a, _ = generate(pull_app, tokens, a, "dead-a")
    wait_for_index(pull_app, tokens, a, 16)
    before = pinned("pull_stats", b).fallbacks
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#TargetWorker#{a}", namespace="serve"), no_restart=True)
    on_b, last = generate(pull_app, tokens, b, "dead-b")
    assert on_b == on_a and last.num_cached_prompt_tokens == 0
    after = pinned("pull_stats", b).fallbacks
    assert after["error"] + after["timeout"] == before["error"] + before["timeout"] + 1, after
    stats = pinned("stats", b)
    assert stats.num_running == 0 and stats.num_free_pages == stats.num_total_pages
