"""`TargetWorker`: the Ray Serve deployment that wraps one engine (one replica = one worker group).

The ingress calls `generate` through a streaming DeploymentHandle; Ray Serve's router picks the
replica. Each replica names itself by its Serve replica id (`ReplicaID.unique_id`, the same
string routers see as `RunningReplica.replica_id.unique_id`) in its KV events, its heartbeats in
the shared page index, and the last delta of every request.

Around the engine the replica runs a publisher thread (KV events and heartbeats to the page
index, never blocking the engine) and a periodic task that updates its metrics. Serve polls
`record_routing_stats` for the load it reports to routers, and `check_health`, which fails once
the engine loop has died so Serve replaces the replica.

`DraftWorker` is a draft replica. It publishes its pool's pages to the same index under its own
Serve replica id and the draft model's id, and names itself in every reply, so that targets can
route each sequence's proposal calls to the replica holding its draft KV
(workers/spec/draft_client.py; the draft deployment's router is router/prefix_router.py's
StickyPrefixRouter).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from kvstore.hashing import PageHash
from kvstore.index import IndexConfig, PageIndex, ReplicaLoad
from kvstore.publisher import Publisher
from kvstore.transport import PagePayload
from workers.config import EngineConfig, KVTransferConfig
from workers.engine import Engine
from workers.kv_transfer import KVPuller, PullStats
from workers.replica_actors import ReplicaActors
from workers.request import EngineDeadError, EngineStats, GenerateRequest, TokenDelta
from workers.spec.channel import ChannelServer, ReplicaChannels
from workers.spec.draft_client import DraftClientStats, RoutedDraftProposer
from workers.spec.draft_routes import DraftCall
from workers.spec.wire import DraftBatch, DraftReply
from workers.transfer import IndexLocator, RayPageTransport

logger = logging.getLogger(__name__)


class TargetWorker:
    def __init__(
        self,
        engine_config: EngineConfig,
        index_config: IndexConfig | None,
        metrics_period_s: float = 1.0,
        draft=None,
        draft_timeout_s: float = 0.5,
        draft_model_id: str = "",
        kv_transfer: KVTransferConfig | None = None,
        draft_lookahead: bool = True,
        draft_lookahead_min_rate: float = 0.0,
        draft_channel: bool = True,
    ):
        """`draft`: a DeploymentHandle to DraftWorker replicas of the model `draft_model_id` (then
        engine_config.speculative's method is 'replicas'); each engine step sends one call per
        draft replica holding some of its sequences, pinned, plus routed calls for new ones. The
        sequences of a call slower than `draft_timeout_s`, or failing, are not speculated that
        step and re-route; when every call of a step fails, the target decodes alone a while.
        `kv_transfer` (enabled, with an index): before a request enters the engine, pull the
        leading pages of its prompt that another replica holds (workers/kv_transfer.py).
        `draft_lookahead`: ask for each step's next proposals while it verifies (draft_client.py),
        where steps accept whole proposals at least `draft_lookahead_min_rate` of the time.
        `draft_channel`: pinned calls over each draft replica's socket channel (workers/spec/channel.py)
        where it is up, else through its actor."""

        from workers.metrics import WorkerMetrics

        self.replica_id = _serve_replica_id()
        config = engine_config.model_copy(update={"replica_id": self.replica_id})
        self.publisher: Publisher | None = None
        proposer = None
        if draft is not None:
            if not draft_model_id:
                raise ValueError("draft_model_id is required with draft replicas: their pages are indexed under it")
            proposer = RoutedDraftProposer(
                draft_submit(draft, channel=draft_channel),
                torch.device("cpu"),
                config.page_size,
                draft_model_id,
                draft_timeout_s,
                draft_lookahead,
                draft_lookahead_min_rate,
            )
        self.proposer = proposer
        self.engine = Engine(config, kv_event_sink=self._publish, proposer=proposer)
        if proposer is not None:
            proposer.device = self.engine.device
        if index_config is not None:
            index = PageIndex(index_config, self.engine.model_id)
            self.publisher = Publisher(index, self.replica_id, self._load).start()
        self.puller: KVPuller | None = None
        self._locator: IndexLocator | None = None
        if kv_transfer is not None and kv_transfer.enabled and index_config is not None:
            transport = RayPageTransport(_own_deployment_handle)
            self._locator = IndexLocator(
                index_config,
                self.engine.model_id,
                self.replica_id,
                kv_transfer.replicas_refresh_s,
                on_live=transport.resolve,
            )
            self.puller = KVPuller(self.engine, transport, self._locator, kv_transfer)
        self.metrics = WorkerMetrics(self.engine.model_id, self.replica_id)
        self._metrics_period_s = metrics_period_s
        self._metrics_task: asyncio.Task | None = None
        self._warm_task: asyncio.Task | None = None  # the pull transport's first call
        self._probe_data = None  # probe_bytes' answer
        logger.info("TargetWorker %s serves %s", self.replica_id, self.engine.model_id)

    async def generate(
        self, request: GenerateRequest, page_hashes: list[PageHash] | None = None, pin_replica: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Stream the engine's deltas. `page_hashes` (the prompt's, hashed once at the ingress) ride
        as a keyword for the request router, which reads them there; the engine reuses them rather
        than hashing the prompt again (`pin_replica`, also for the router, names the replica that
        must serve the call). Cancelling the call aborts the request."""
        self._ensure_metrics_task()
        if page_hashes is not None and request.page_hashes is None:
            request = replace(request, page_hashes=page_hashes)
        if self.puller is not None and request.page_hashes:
            try:
                await self.puller.prepare(request)
            except Exception:  # a pull only saves work: a bug in it must not fail the request
                logger.exception("pull for %s failed; its pages will be recomputed", request.request_id)
                self.puller.stats.fallbacks["error"] += 1
        first = True
        async for delta in self.engine.generate(request):
            if first:  # name the replica at once, so a client knows where its request runs
                delta.replica_id = self.replica_id
                first = False
            yield delta

    async def stats(self, pin_replica: str | None = None) -> EngineStats:
        """The engine's figures (`pin_replica`: for the request router, to ask a given replica)."""
        return self.engine.stats()

    async def export_pages(self, hashes: list[PageHash], pin_replica: str | None = None) -> PagePayload:
        """The leading run of `hashes` this replica holds, for another replica's pull
        (`pin_replica` is for the request router: the call must reach this replica)."""
        return await self.engine.export_pages(hashes)

    async def probe_bytes(self, num_bytes: int, pin_replica: str | None = None):
        """`num_bytes` bytes as a payload's data travels (a uint8 array): the raw transport's
        answer, which `kvfleet bench serve --tiers` times against a pull of as many bytes."""
        import numpy as np

        if self._probe_data is None or self._probe_data.nbytes != num_bytes:
            self._probe_data = np.ones(num_bytes, dtype=np.uint8)
        return self._probe_data

    async def probe_transport(
        self, holder: str, hashes: list[PageHash], repeats: int = 5, pin_replica: str | None = None
    ) -> dict:
        """From this replica: fetches of `hashes` from `holder` (a pull's export) against raw calls
        of as many bytes to it, back to back (RayPageTransport.probe); for the bench."""
        if self.puller is None:
            raise RuntimeError("probe_transport needs kv_transfer enabled")
        return await self.puller.transport.probe(holder, hashes, repeats, 60.0)

    async def probe_raw(self, holder: str, num_pages: int, pin_replica: str | None = None) -> tuple[int, float]:
        """From this replica: one raw call to `holder` returning as many bytes as `num_pages` of
        this replica's pages (RayPageTransport.raw_call_s), timed: (bytes, seconds). The bench
        calls it while its workload runs, for the raw transport under the load the pulls see."""
        if self.puller is None:
            raise RuntimeError("probe_raw needs kv_transfer enabled")
        size = num_pages * self.engine.page_io.layout.page_bytes
        return size, await self.puller.transport.raw_call_s(holder, size, 60.0)

    async def pull_stats(self, pin_replica: str | None = None) -> PullStats | None:
        """How this replica's pulls went (None when kv_transfer is off)."""
        return None if self.puller is None else self.puller.stats

    async def draft_stats(self) -> DraftClientStats | None:
        """How this replica's proposal calls went (None without draft replicas)."""
        return None if self.proposer is None else self.proposer.stats

    def record_routing_stats(self) -> dict[str, int]:
        """What routers see of this replica's load (Ray Serve polls it every routing_stats_period_s)."""
        return asdict(self.engine.stats())

    def check_health(self) -> None:
        if self.engine._dead is not None:
            raise EngineDeadError(f"replica {self.replica_id}: the engine loop died: {self.engine._dead!r}")
        if self.engine.ranks is not None and not self.engine.ranks.alive():
            raise EngineDeadError(f"replica {self.replica_id}: a rank of its tensor-parallel group died")

    async def __del__(self) -> None:
        # Serve calls this on graceful shutdown: withdraw the heartbeat so routers drop us at once.
        # Also after a constructor that raised (e.g. out of GPU memory while loading): close what
        # was made, so the replica's log ends with that error, not a missing attribute.
        if getattr(self, "_metrics_task", None) is not None:
            self._metrics_task.cancel()
        if getattr(self, "engine", None) is not None:
            await self.engine.shutdown()
        _close(getattr(self, "publisher", None))
        if getattr(self, "_locator", None) is not None:
            self._locator.close()
        if getattr(self, "puller", None) is not None:
            self.puller.close()

    # ------------------------------------------------------------------ internals
    def _publish(self, events) -> None:
        if self.publisher is not None:
            self.publisher.submit(events)

    def _load(self) -> ReplicaLoad:
        # Called on the publisher thread: reads a few ints, no locks needed for a heartbeat.
        stats = self.engine.stats()
        return ReplicaLoad(**{f.name: getattr(stats, f.name) for f in fields(ReplicaLoad)})

    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None or self._metrics_task.done():
            # A fresh context: a task that inherits the request's Serve context outlives the
            # request, and Serve then never delivers that request's cancellation (seen on 2.60).
            loop = asyncio.get_running_loop()
            self._metrics_task = loop.create_task(self._report_metrics(), context=contextvars.Context())
            if self.puller is not None and self._warm_task is None:
                warm = self.puller.warm(self.replica_id)
                self._warm_task = loop.create_task(warm, context=contextvars.Context())

    async def _report_metrics(self) -> None:
        while True:
            self.metrics.update(
                self.engine.stats(),
                self.publisher.metrics if self.publisher else None,
                self.proposer.stats if self.proposer is not None else None,
                self.puller.stats if self.puller is not None else None,
            )
            await asyncio.sleep(self._metrics_period_s)


def draft_submit(handle, direct: bool = True, channel: bool = True):
    """`submit` for a RoutedDraftProposer: one `DraftCall` through a DraftWorker DeploymentHandle.
    The keywords are for the deployment's request router (StickyPrefixRouter reads them). With
    `direct`, a call pinned to a replica goes straight to that replica: over its socket channel
    (`channel`, workers/spec/channel.py: no Ray on the round trip) once that is up, else to the
    replica's actor (`ReplicaActors`): no routing decision per step for a sequence whose replica
    is known."""
    actors = ReplicaActors(handle.app_name, handle.deployment_name) if direct else None
    channels = ReplicaChannels(_channel_address(actors)) if actors is not None and channel else None

    def submit(call: DraftCall):
        if actors is not None and call.replica_id is not None:
            pending = channels.call(call.replica_id, call.batch) if channels is not None else None
            if pending is None:
                pending = actors.call(call.replica_id, "propose", call.batch)
            if pending is not None:
                return pending
        return handle.propose.remote(call.batch, page_hashes=call.page_hashes, draft_replica=call.replica_id)

    submit.channels = channels  # for tests and benches
    return submit


def _channel_address(actors: ReplicaActors, timeout_s: float = 30.0):
    """A replica's channel address, asked once through its actor (None: no actor, or no channel)."""

    def fetch(replica_id: str):
        pending = actors.call(replica_id, "channel_address")
        return None if pending is None else pending.result(timeout_s)

    return fetch


@dataclass
class DraftWorkerStats:
    replica_id: str
    model_id: str
    num_calls: int = 0
    num_sequences: int = 0  # proposal requests answered (one per sequence per call)
    num_new_sessions: int = 0  # draft sessions started here (a request's first call, or after eviction)
    num_cached_prompt_tokens: int = 0  # of their tokens, found in this replica's prefix cache
    num_sessions: int = 0
    num_free_pages: int = 0
    num_total_pages: int = 0
    calls_per_request: dict[str, int] = field(default_factory=dict)  # the latest requests seen


class DraftWorker:
    """A draft replica: one draft model with its own paged KV cache and prefix caching
    (workers/spec/draft_model.py), answering proposal calls, from Serve and (`channel`) from its
    socket channel (workers/spec/channel.py, for pinned calls), one at a time (a lock); sessions
    of requests that ended are released by the next call (`DraftBatch.released`) or evicted when
    its pool runs short. With `index_config`, its KV events and heartbeats go to the shared page
    index under its Serve replica id and the draft model's id."""

    _MAX_TRACKED_REQUESTS = 4096

    def __init__(
        self,
        engine_config: EngineConfig,
        num_speculative_tokens: int,
        index_config: IndexConfig | None = None,
        channel: bool = True,
    ):
        from workers.spec.draft_model import DraftModel

        self.channel: ChannelServer | None = None
        self.publisher: Publisher | None = None
        self._lock = threading.Lock()  # the model serves one call at a time, from Serve or the channel

        self.model = DraftModel.standalone(engine_config, num_speculative_tokens)
        self.replica_id = _serve_replica_id()
        self.counters = DraftWorkerStats(self.replica_id, self.model.model_id)
        self._calls_per_request: OrderedDict[str, int] = OrderedDict()
        if index_config is not None and self.replica_id:
            index = PageIndex(index_config, self.model.model_id)
            self.publisher = Publisher(index, self.replica_id, self._load).start()
            self.model.publish_kv_events(self.publisher.submit, self.replica_id)
        if channel:
            self.channel = ChannelServer(self._serve, _node_ip())
        logger.info(
            "DraftWorker %s serves %s (%d pages)", self.replica_id, self.model.model_id, self.model.pool.num_pages
        )

    async def propose(
        self, batch: DraftBatch, page_hashes: list[PageHash] | None = None, draft_replica: str | None = None
    ) -> list[DraftReply]:
        """`page_hashes` and `draft_replica` are for the request router (StickyPrefixRouter)."""
        return self._serve(batch)

    def channel_address(self) -> tuple[str, int, bytes] | None:
        """Where this replica's channel listens, with its authkey (None: no channel)."""
        return None if self.channel is None else self.channel.address

    def _serve(self, batch: DraftBatch) -> list[DraftReply]:
        with self._lock:
            return self._serve_locked(batch)

    def _serve_locked(self, batch: DraftBatch) -> list[DraftReply]:
        st = self.counters
        for r in batch.requests:
            self._calls_per_request[r.request_id] = self._calls_per_request.get(r.request_id, 0) + 1
            self._calls_per_request.move_to_end(r.request_id)
        while len(self._calls_per_request) > self._MAX_TRACKED_REQUESTS:
            self._calls_per_request.popitem(last=False)
        t0 = time.perf_counter()
        replies = self.model.serve(batch)
        compute_s = time.perf_counter() - t0
        for reply in replies:
            reply.replica_id = self.replica_id
            reply.compute_s = compute_s
        st.num_calls += 1
        st.num_sequences += len(batch.requests)
        return replies

    async def stats(self, draft_replica: str | None = None) -> DraftWorkerStats:
        """This replica's counters (`draft_replica`: pin the call to that replica)."""
        pool = self.model.pool
        return DraftWorkerStats(
            **{
                **asdict(self.counters),
                "num_new_sessions": self.model.num_sessions_started,
                "num_cached_prompt_tokens": self.model.num_cached_prompt_tokens,
                "num_sessions": len(self.model.sessions),
                "num_free_pages": pool.num_free_pages,
                "num_total_pages": pool.num_pages,
                "calls_per_request": dict(self._calls_per_request),
            }
        )

    def check_health(self) -> None:
        pass

    def __del__(self) -> None:
        # Synchronous (Serve accepts either): Ray also runs it when the actor's object is collected,
        # where an `async def` left a coroutine never awaited.
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        _close(getattr(self, "publisher", None))

    def _load(self) -> ReplicaLoad:
        pool = self.model.pool
        return ReplicaLoad(
            num_running=len(self.model.sessions), num_free_pages=pool.num_free_pages, num_total_pages=pool.num_pages
        )


def _close(publisher: Publisher | None) -> None:
    """Stop a replica's publisher (its thread withdraws the heartbeat on the way out: routers drop
    the replica at once) and close its index connections."""
    if publisher is not None:
        publisher.close()
        publisher.index.close()


def _own_deployment_handle():
    """A handle to this replica's own deployment (for pulls from its peers)."""
    from ray import serve

    ctx = serve.get_replica_context()
    return serve.get_deployment_handle(ctx.deployment, ctx.app_name)


def _node_ip() -> str:
    """This node's IP in the Ray cluster (loopback outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def _serve_replica_id() -> str:
    """This Serve replica's id; "" when not running as one (a plain Ray actor, a test)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""
