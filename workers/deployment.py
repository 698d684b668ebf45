"""`TargetWorker`: the Ray Serve deployment that wraps one engine (one replica = one worker group).

The ingress calls `generate` through a streaming DeploymentHandle; Ray Serve's router picks the
replica. Each replica names itself by its Serve replica id (`ReplicaID.unique_id`, the same
string routers see as `RunningReplica.replica_id.unique_id`) in its KV events, its heartbeats in
the shared page index, and the last delta of every request.

Around the engine the replica runs a publisher thread (KV events and heartbeats to the page
index, never blocking the engine) and a periodic task that updates its metrics. Serve polls
`record_routing_stats` for the load it reports to routers, and `check_health`, which fails once
the engine loop has died so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, fields

import torch

from kvstore.hashing import PageHash
from kvstore.index import IndexConfig, PageIndex, ReplicaLoad
from kvstore.publisher import Publisher
from workers.config import EngineConfig
from workers.engine import Engine
from workers.request import EngineDeadError, EngineStats, GenerateRequest, TokenDelta
from workers.spec_decode import DraftBatch, DraftReply, RemoteDraftProposer

logger = logging.getLogger(__name__)


class TargetWorker:
    def __init__(
        self,
        engine_config: EngineConfig,
        index_config: IndexConfig | None,
        metrics_period_s: float = 1.0,
        draft=None,
        draft_timeout_s: float = 0.5,
    ):
        """`draft`: a DeploymentHandle to DraftWorker replicas (then engine_config.speculative's
        method is 'replicas'); each engine step's proposals go out as one call, and a call
        slower than `draft_timeout_s` or failing leaves that step (and a few more) unspeculated."""
        from ray import serve

        from cluster.metrics import WorkerMetrics

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        config = engine_config.model_copy(update={"replica_id": self.replica_id})
        self.publisher: Publisher | None = None
        proposer = None
        if draft is not None:
            proposer = RemoteDraftProposer(_draft_call(draft, draft_timeout_s), torch.device("cpu"))
        self.engine = Engine(config, kv_event_sink=self._publish, proposer=proposer)
        if proposer is not None:
            proposer.device = self.engine.device
        if index_config is not None:
            index = PageIndex(index_config, self.engine.model_id)
            self.publisher = Publisher(index, self.replica_id, self._load).start()
        self.metrics = WorkerMetrics(self.engine.model_id, self.replica_id)
        self._metrics_period_s = metrics_period_s
        self._metrics_task: asyncio.Task | None = None
        logger.info("TargetWorker %s serves %s", self.replica_id, self.engine.model_id)

    async def generate(
        self, request: GenerateRequest, page_hashes: list[PageHash] | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Stream the engine's deltas. `page_hashes` (the prompt's, from the ingress) are for the
        request router; the engine hashes its own pages. Cancelling the call aborts the request."""
        self._ensure_metrics_task()
        first = True
        async for delta in self.engine.generate(request):
            if first:  # name the replica at once, so a client knows where its request runs
                delta.replica_id = self.replica_id
                first = False
            yield delta

    async def stats(self) -> EngineStats:
        return self.engine.stats()

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
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        await self.engine.shutdown()
        if self.publisher is not None:
            self.publisher.close()
            with contextlib.suppress(Exception):
                self.publisher.index.leave(self.replica_id)
            self.publisher.index.close()

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

    async def _report_metrics(self) -> None:
        while True:
            self.metrics.update(self.engine.stats(), self.publisher.metrics if self.publisher else None)
            await asyncio.sleep(self._metrics_period_s)


def _draft_call(handle, timeout_s: float):
    """A blocking call to the draft replicas (the engine makes it off its event loop)."""

    def call(batch: DraftBatch) -> list[DraftReply]:
        response = handle.propose.remote(batch)
        try:
            return response.result(timeout_s=timeout_s)
        except BaseException:
            response.cancel()
            raise

    return call


class DraftWorker:
    """A draft replica: one draft model with its own paged KV cache and prefix caching
    (workers/draft.py), answering each target step's batched proposal call. Calls run one at a
    time on the replica's event loop; sessions of requests that ended are released by the next
    call (`DraftBatch.released`) or evicted when its pool runs short."""

    def __init__(self, engine_config: EngineConfig, num_speculative_tokens: int):
        from workers.draft import DraftModel

        self.model = DraftModel.standalone(engine_config, num_speculative_tokens)
        logger.info("DraftWorker serves %s (%d pages)", self.model.model_id, self.model.pool.num_pages)

    async def propose(self, batch: DraftBatch) -> list[DraftReply]:
        return self.model.serve(batch)

    def check_health(self) -> None:
        pass
