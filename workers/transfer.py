"""The Ray side of pulls between TargetWorker replicas: the `PageTransport` over Serve calls, and
where the holders are (the page index).

`RayPageTransport.fetch` calls `TargetWorker.export_pages` on the named replica straight through
its actor (workers/replica_actors.py: no routing decision, the payload's buffer out of band as in
a plain actor call), or, when that actor cannot be found, through a handle to the replica's own
deployment, pinned by the `pin_replica` keyword (router/prefix_router.py honours it). The reply
names the replica that answered; an answer from another (the holder has gone, so the call was
routed elsewhere) is refused. On a deadline the call is cancelled.

`IndexLocator` answers "who holds how many of these leading pages" from the shared page index:
the live replicas (a SCAN of heartbeats, re-read every `replicas_refresh_s` off the event loop)
and one lookup with tiers (device run + host tier). None when the index does not answer. Each
re-read hands the other live replicas to `on_live` on a worker thread: the deployment passes
`RayPageTransport.resolve`, which looks up their actors there (a blocking call to the cluster's
control store, and the handle's own check with the Serve controller), so a pull finds them cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvstore.hashing import PageHash
from kvstore.index import AsyncPageIndex, IndexConfig, PageIndex
from kvstore.transport import PagePayload, PullFailure, TransportError
from workers.replica_actors import ReplicaActors

logger = logging.getLogger(__name__)

PIN_REPLICA_KWARG = "pin_replica"  # router/prefix_router.py reads the same keyword


class RayPageTransport:
    def __init__(self, handle_factory):
        """`handle_factory()`: a DeploymentHandle to the TargetWorker deployment (made on first use:
        a replica cannot get a handle to its own deployment while it is being constructed)."""
        self._factory = handle_factory
        self._handle = None
        self._actors: ReplicaActors | None = None
        self._lock = threading.Lock()  # the handle is made on the loop or on `resolve`'s thread

    def _ensure_handle(self) -> None:
        if self._handle is None:
            with self._lock:
                if self._handle is None:
                    handle = self._factory()
                    self._actors = ReplicaActors(handle.app_name, handle.deployment_name)
                    self._handle = handle

    def resolve(self, replica_ids: Sequence[str]) -> None:
        """Look up the actors of `replica_ids` now (blocking: call it off the event loop), so that
        a pull from one of them does not pay for a lookup in the cluster's control store."""
        self._ensure_handle()
        for r in replica_ids:
            self._actors.actor(r)

    async def warm(self, replica_id: str) -> None:
        """Make the handle and send one empty export to `replica_id` (this replica), so that the
        first pull does not pay for the handle's and its router's start (hundreds of ms)."""
        with contextlib.suppress(Exception):
            await self.fetch(replica_id, [], 60.0)

    async def fetch(self, replica_id: str, hashes: Sequence[PageHash], timeout_s: float) -> PagePayload:
        self._ensure_handle()
        direct = self._actors.call(replica_id, "export_pages", list(hashes))
        if direct is not None:
            response, pending = direct, direct.ref
        else:
            response = self._handle.export_pages.remote(list(hashes), **{PIN_REPLICA_KWARG: replica_id})
            pending = _await(response)
        try:
            payload = await asyncio.wait_for(pending, timeout_s)
        except TimeoutError:
            response.cancel()
            raise
        except Exception as e:
            raise TransportError(PullFailure.ERROR, f"export_pages on {replica_id} failed: {e!r}") from e
        if not isinstance(payload, PagePayload) or payload.replica_id != replica_id:
            got = getattr(payload, "replica_id", type(payload).__name__)
            raise TransportError(PullFailure.ERROR, f"asked {replica_id} for pages, {got} answered (holder gone?)")
        return payload

    async def raw_call_s(self, replica_id: str, num_bytes: int, timeout_s: float) -> float:
        """Wall time of one plain call to `replica_id` returning `num_bytes` bytes as a payload's
        data travels (`probe_bytes`: a uint8 array), through the path a pull's fetch takes (the
        replica's actor, its request wrapper, the object store): the raw transport a pull of as
        many bytes is measured against. Its first call at a size also makes the array there."""
        self._ensure_handle()
        call = self._actors.call(replica_id, "probe_bytes", num_bytes)
        if call is None:
            raise TransportError(PullFailure.ERROR, f"no actor for {replica_id}: nothing to probe")
        t0 = time.perf_counter()
        await asyncio.wait_for(call.ref, timeout_s)
        return time.perf_counter() - t0

    async def probe(self, replica_id: str, hashes: Sequence[PageHash], repeats: int, timeout_s: float) -> dict:
        """The pull path against the raw transport, replica to replica, back to back: `repeats`
        fetches of `hashes` from `replica_id` (the export a pull makes), each followed by a plain
        call through the same actor path returning as many bytes (`probe_bytes`). Medians, s."""
        import statistics

        self._ensure_handle()
        fetch_s, raw_s, size = [], [], 0
        for i in range(repeats + 1):  # the first round warms both paths
            t0 = time.perf_counter()
            payload = await self.fetch(replica_id, hashes, timeout_s)
            t1 = time.perf_counter()
            size = memoryview(payload.data).nbytes
            call = self._actors.call(replica_id, "probe_bytes", size)
            if call is None:
                raise TransportError(PullFailure.ERROR, f"no actor for {replica_id}: nothing to probe")
            await asyncio.wait_for(call.ref, timeout_s)
            t2 = time.perf_counter()
            if i:
                fetch_s.append(t1 - t0)
                raw_s.append(t2 - t1)
        return dict(
            bytes=size, pages=payload.num_pages, fetch_s=statistics.median(fetch_s), raw_s=statistics.median(raw_s)
        )


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # only a warm-up: the pull itself looks up what it needs
        logger.debug("%s failed: %r", getattr(fn, "__name__", fn), e)


async def _await(response):
    return await response


class IndexLocator:
    def __init__(
        self,
        index_config: IndexConfig,
        model_id: str,
        replica_id: str,
        refresh_s: float,
        on_live: Callable[[list[str]], None] | None = None,
    ):
        """`on_live(replica_ids)`: called with the other live replicas each time they are re-read,
        off the event loop (the transport resolves their actors there)."""
        self._on_live = on_live
        self._sync = PageIndex(index_config, model_id)
        self._async: AsyncPageIndex | None = None
        self._config = index_config
        self._model_id = model_id
        self._replica_id = replica_id
        self._refresh_s = refresh_s
        self._replicas: list[str] = []
        self._read_at = -1e9
        self._resolving: asyncio.Task | None = None

    async def __call__(self, hashes: Sequence[PageHash]) -> dict[str, int] | None:
        if time.monotonic() - self._read_at > self._refresh_s:
            try:
                live = await asyncio.to_thread(self._sync.live_replicas)
            except Exception as e:  # Redis down: nobody known to hold anything
                logger.debug("live replicas unreadable: %r", e)
                return None
            self._replicas = [r for r in live if r != self._replica_id]
            if self._on_live is not None and (self._resolving is None or self._resolving.done()):
                resolve = asyncio.to_thread(_quietly, self._on_live, list(self._replicas))
                self._resolving = asyncio.create_task(resolve)
            self._read_at = time.monotonic()
        if not self._replicas:
            return {}
        if self._async is None:  # its connections belong to this event loop
            # A routing lookup must answer in 20 ms; this one saves a recompute of many ms: more budget.
            budget = self._config.model_copy(update={"timeout_ms": max(self._config.timeout_ms, 200.0)})
            self._async = AsyncPageIndex(budget, self._model_id)
        matches = await self._async.try_lookup_with_load(hashes, self._replicas, with_tiers=True)
        if matches is None:
            return None
        return {r: m.matched_pages + m.host_pages for r, m in matches.items()}

    def close(self) -> None:
        self._sync.close()
