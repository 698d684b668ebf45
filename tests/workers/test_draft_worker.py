"""Draft replicas: the target's `RoutedDraftProposer` talking to `DraftWorker`s, first through a
pickling in-process call (the wire's shape), then to real Ray actors, one of which is killed
mid-run: generation goes on without speculation, then speculates again on a live replica."""

import asyncio
import pickle

import pytest
import torch

from cluster.demo.model import shipped_demo_pair
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams
from workers.spec.draft_client import RoutedDraftProposer
from workers.spec.wire import DraftBatch

TARGET, DRAFT = (str(p) for p in shipped_demo_pair())
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n"]


class Answered:
    """A call that has its answer (the in-process stand-in for a DeploymentResponse)."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value

    def cancel(self):
        pass


class RayCall:
    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def result(self, timeout_s=None):
        return self.ray.get(self.ref, timeout=timeout_s)

    def cancel(self):
        self.ray.cancel(self.ref)


def proposer(submit, timeout_s: float = 5.0) -> RoutedDraftProposer:
    return RoutedDraftProposer(submit, torch.device("cpu"), 4, "kvfleet-pycoder-draft", timeout_s)


def target_config(speculate: bool = True, **spec) -> EngineConfig:
    speculative = SpeculativeConfig(method="replicas", num_speculative_tokens=4, adaptive=False, **spec)
    return EngineConfig(
        model=TARGET,
        device="cpu",
        page_size=4,
        num_pages=512,
        max_model_len=512,
        speculative=speculative if speculate else None,
    )


def draft_config() -> EngineConfig:
    return EngineConfig(
        model=DRAFT, device="cpu", page_size=4, num_pages=512, max_model_len=512, skip_tokenizer_init=True
    )


async def run_all(engine, params):
    outs = await asyncio.gather(
        *(engine.complete(GenerateRequest(engine.tokenizer.encode(p), params)) for p in PROMPTS)
    )
    return [o.token_ids for o in outs]


async def close(engine):
    await engine.shutdown()
    assert engine.pool.num_free_pages == engine.pool.num_pages


@pytest.fixture(scope="module")
def greedy_reference():
    engine = Engine(target_config(speculate=False))
    out = asyncio.run(run_all(engine, SamplingParams(max_tokens=40, ignore_eos=True)))
    asyncio.run(close(engine))
    return out


async def test_remote_draft_proposals_keep_greedy_output_identical(greedy_reference):
    from workers.spec.draft_model import DraftModel

    draft = DraftModel.standalone(draft_config(), 4)

    def submit(call):  # through pickle, as a replica call would go
        replies = pickle.loads(pickle.dumps(draft.serve(pickle.loads(pickle.dumps(call.batch)))))
        for reply in replies:
            reply.replica_id = "r0"
        return Answered(replies)

    engine = Engine(target_config(), proposer=proposer(submit))
    assert await run_all(engine, SamplingParams(max_tokens=40, ignore_eos=True)) == greedy_reference
    # proposals computed ahead, during verification, were used (hits) and dropped (misses) alike
    client = engine.spec.proposer.stats
    assert client.num_ahead_hits > 0 and client.num_ahead_misses > 0, client
    # sampled requests get q with their proposals and verify against it
    sampled = await run_all(engine, SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True))
    assert all(len(t) == 20 for t in sampled)
    st = engine.stats()
    assert st.spec_accepted_tokens > 0 and st.spec_failures == 0
    await close(engine)
    # later calls carry the ids of requests that ended; one more call releases the last ones
    draft.serve(DraftBatch([], engine.spec.proposer.routes.released.pop("r0")))
    assert not draft.sessions and draft.pool.num_free_pages == draft.pool.num_pages


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


async def test_a_killed_draft_replica_costs_nothing_and_speculation_resumes(ray_session, greedy_reference):
    ray = ray_session
    from workers.deployment import DraftWorker

    actor_cls = ray.remote(num_cpus=0)(DraftWorker)
    replicas = [actor_cls.remote(draft_config(), 4)]
    ray.get(replicas[0].check_health.remote())

    def submit(call):  # the latest replica (there is no Serve here to route)
        return RayCall(ray, replicas[-1].propose.remote(call.batch))

    engine = Engine(target_config(retry_after_s=0.3), proposer=proposer(submit, timeout_s=30))
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    task = asyncio.ensure_future(run_all(engine, params))
    while engine.stats().spec_accepted_tokens == 0:
        await asyncio.sleep(0.05)
    ray.kill(replicas[0])  # mid-run: the next calls fail
    while engine.stats().spec_failures == 0:
        await asyncio.sleep(0.02)
    steps_while_down = engine.stats().spec_steps
    replicas.append(actor_cls.remote(draft_config(), 4))  # Serve would start a replacement
    ray.get(replicas[-1].check_health.remote())
    outputs = await asyncio.wait_for(task, 120)
    st = engine.stats()
    assert [o[:40] for o in outputs] == greedy_reference
    assert st.spec_failures >= 1
    assert st.spec_steps > steps_while_down, "speculation resumed on the new replica"
    client = engine.spec.proposer.stats  # a DraftWorker's replies say how long it worked on each call
    assert client.call_compute_s > 0
    await close(engine)
    for r in replicas[1:]:
        ray.kill(r)


async def test_calls_over_a_replicas_channel_keep_greedy_output_identical(ray_session, greedy_reference):
    """Every call over the DraftWorker's socket channel once it is up (its actor before): a
    lookahead and a step's call may be in flight at once on two connections, and the replica's
    lock serialises them. Killing the replica fails the channel's calls like any failed call."""
    ray = ray_session
    from workers.deployment import DraftWorker
    from workers.spec.channel import ReplicaChannels

    actor_cls = ray.remote(num_cpus=0)(DraftWorker)
    replica = actor_cls.remote(draft_config(), 4)
    channels = ReplicaChannels(lambda rid: ray.get(replica.channel_address.remote(), timeout=60))

    def submit(call):
        return channels.call("r0", call.batch) or RayCall(ray, replica.propose.remote(call.batch))

    engine = Engine(target_config(retry_after_s=0.3), proposer=proposer(submit, timeout_s=30))
    assert await run_all(engine, SamplingParams(max_tokens=40, ignore_eos=True)) == greedy_reference
    client = engine.spec.proposer.stats
    assert client.num_channel_calls > 0 and client.num_failed_calls == 0, client
    assert channels.ready("r0")
    ray.kill(replica)
    outputs = await asyncio.wait_for(run_all(engine, SamplingParams(max_tokens=40, ignore_eos=True)), 120)
    assert outputs == greedy_reference
    assert engine.stats().spec_failures >= 1 and not channels.ready("r0")
    await close(engine)
