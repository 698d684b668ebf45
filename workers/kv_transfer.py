"""Pulls of KV pages between replicas: ask the holder, or recompute, before a request is admitted.

    puller = KVPuller(engine, transport, locate, config)
    await puller.prepare(request)          # then engine.generate(request) finds the pages cached

`prepare` runs in the deployment's generate path, on the replica's event loop, before the request
reaches the engine's scheduler: the step loop never waits on a remote call. It finds the leading
run of the prompt's pages this replica holds (device or host tier); asks `locate` (the page index,
one round trip) which live replica holds more of them; and, if the cost model says moving the
missing pages beats computing them, fetches them through the `PageTransport` (kvstore/transport.py)
under a deadline, checks them, and hands them to the engine to insert as cached pages.

The cost model (`PullCostModel`): predicted pull time = a fixed latency + bytes / bandwidth, both
measured (the latency first from an empty call to the transport at start, then both fitted to the
pulls' sizes and wall times; `assumed_latency_ms` and `assumed_bandwidth_gib_s` before) against
predicted recompute time = tokens / measured prefill rate (the engine's prompt tokens over the
time of its prefill steps; `assumed_prefill_tokens_s` before it has one). The latency term keeps
pulls of a page or three, which cannot pay for a round trip, from being attempted; when even
all the missing pages would not pay, the page index is not asked either.

Nothing here raises for the user: a holder that is slow, dead, answers with other pages, or
evicted them, or an index that does not answer, leaves the pages to be recomputed, and
`PullStats.fallbacks` counts why (`PullFailure`). The holder references the pages only while
reading them (KVCacheManager.export); the receiver makes room for them as soon as the request is
out, while they travel, on a worker thread (KVCacheManager.reserve: the evictions, and their
copies into the host tier, leave the pull's path and the event loop, which takes the payload as
soon as it arrives), and inserts them as unreferenced cached pages, releasing what it did not
use, also when the pull fails or is cancelled before the reservation is made (it is released
once made); so nothing stays held on either side whatever happens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kvstore.hashing import PageHash
from kvstore.transport import PageTransport, PullFailure, TransportError, check_payload, payload_bytes
from workers.config import KVTransferConfig
from workers.request import GenerateRequest

logger = logging.getLogger(__name__)

# page hashes -> {replica id: leading pages it holds (device + host tier)}, or None: no answer
Locate = Callable[[Sequence[PageHash]], Awaitable[dict[str, int] | None]]

_EWMA = 0.3  # weight of the newest measurement in the bandwidth average

# The phases of a pull, in order (`PullStats.phase_s`, the kvfleet_kv_pull_phase_seconds_total
# metric): the index round trip; on the holder, finding and pinning the pages, gathering them into
# one buffer, making that the payload's data; the wire (request sent to payload in hand, less the
# holder's read: the calls' way there and back, the object store, the event loops' waits); here,
# checking the payload, viewing it as a tensor, writing the pages, and the pool's bookkeeping;
# and, while the request is out (overlapping the holder's phases and the wire, so not in the sum
# of the others), reserving room for the pages here: `reserve`.
PULL_PHASES = (
    "locate",
    "holder_lookup",
    "holder_gather",
    "holder_serialize",
    "wire",
    "check",
    "deserialize",
    "scatter",
    "insert",
    "reserve",
)


@dataclass
class PullStats:
    num_pulls: int = 0  # pulls that inserted at least one page
    num_pages: int = 0  # pages inserted from pulls
    num_bytes: int = 0
    time_s: float = 0.0  # wall time of those pulls (fetch + check + insert)
    fetch_time_s: float = 0.0  # of which the transport's: request sent to payload in hand
    # ... and of that: request sent to the holder reading (the call's way there and the holder's
    # wait for its event loop), the holder's read, and the reply (read done to payload in hand)
    request_time_s: float = 0.0
    read_time_s: float = 0.0
    reply_time_s: float = 0.0
    fallbacks: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in PullFailure})
    # seconds per phase (PULL_PHASES) of the pulls that inserted pages
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PULL_PHASES, 0.0))

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.num_bytes / self.time_s if self.time_s else 0.0


class PullCostModel:
    """Predicted wall time of a pull of `b` bytes: `latency_s + b / bandwidth`. Each pull's (bytes,
    seconds) updates an exponentially weighted least-squares fit of the line (weight `_EWMA` for the
    newest); while the pulls seen so far are too alike in size to tell latency from bandwidth, the
    latency stays as measured (`observe_latency`: a call that moves nothing) and the bandwidth takes
    the rest of the time. Pure arithmetic: unit-tested as such."""

    def __init__(self, latency_s: float, bandwidth_bytes_s: float):
        self.latency_s = latency_s
        self.bandwidth = bandwidth_bytes_s
        self._n = 0
        self._s = [0.0] * 5  # weighted sums of 1, x, y, x*x, x*y (x: bytes, y: seconds)

    def predict(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bandwidth

    def observe_latency(self, seconds: float) -> None:
        """The wall time of a call that moved no pages: the fixed part of every pull."""
        self.latency_s = seconds if self._n == 0 else (1 - _EWMA) * self.latency_s + _EWMA * seconds

    def observe(self, num_bytes: int, seconds: float) -> None:
        self._n += 1
        x, y = float(num_bytes), seconds
        self._s = [(1 - _EWMA) * a + _EWMA * b for a, b in zip(self._s, (1.0, x, y, x * x, x * y), strict=True)]
        w, sx, sy, sxx, sxy = self._s
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        if self._n >= 3 and var > (0.25 * mx) ** 2:  # sizes spread enough (CV > 25%) to fit the line
            slope = (sxy / w - mx * my) / var
            if slope > 0:
                self.latency_s = max(my - slope * mx, 0.0)
                self.bandwidth = 1.0 / slope
                return
        rest = seconds - self.latency_s
        if rest > 0 and num_bytes:
            self.bandwidth = (1 - _EWMA) * self.bandwidth + _EWMA * num_bytes / rest
        else:  # faster than the latency alone: the latency was overestimated
            self.latency_s = max((1 - _EWMA) * self.latency_s + _EWMA * seconds, 0.0)

    def worth(self, num_pages: int, page_bytes: int, page_size: int, prefill_tokens_s: float) -> bool:
        """Moving `num_pages` pages is predicted faster than computing them."""
        return self.predict(num_pages * page_bytes) < num_pages * page_size / prefill_tokens_s


def _timed(fn, *args):
    """(fn(*args), its seconds)."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


class KVPuller:
    def __init__(self, engine, transport: PageTransport, locate: Locate, config: KVTransferConfig):
        self.engine = engine
        self.transport = transport
        self.locate = locate
        self.config = config
        self.stats = PullStats()
        self.cost = PullCostModel(config.assumed_latency_ms / 1e3, config.assumed_bandwidth_gib_s * 2**30)
        # reservations are made here, beside the event loop (KVCacheManager's lock orders them)
        self._reserve_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvfleet-reserve")

    async def warm(self, replica_id: str) -> None:
        """Start the transport (`warm`), then time a call that moves nothing: the cost model's
        first measure of a pull's fixed latency."""
        warm = getattr(self.transport, "warm", None)
        if warm is not None:
            await warm(replica_id)
        try:
            t0 = time.perf_counter()
            await asyncio.wait_for(self.transport.fetch(replica_id, [], self.config.timeout_s), self.config.timeout_s)
            self.cost.observe_latency(time.perf_counter() - t0)
        except Exception as e:  # only a first estimate: the pulls measure it too
            logger.debug("timing an empty pull failed: %r", e)

    def prefill_tokens_s(self) -> float:
        st = self.engine.stats()
        if st.prefill_time_s > 0 and st.num_prefill_tokens >= 64:
            return st.num_prefill_tokens / st.prefill_time_s
        return self.config.assumed_prefill_tokens_s

    def worth_pulling(self, num_pages: int) -> bool:
        """The cost model: moving `num_pages` pages is predicted faster than computing them."""
        layout = self.engine.page_io.layout
        return self.cost.worth(num_pages, layout.page_bytes, self.engine.kv_cache.page_size, self.prefill_tokens_s())

    async def prepare(self, request: GenerateRequest) -> int:
        """Pull the leading pages of `request`'s prompt that another replica holds and this one
        lacks, if worth it. Returns the pages inserted (0 when none: they will be computed)."""
        kv = self.engine.kv_cache
        ps = kv.page_size
        hashes = list(request.page_hashes or ())[: (len(request.prompt_token_ids) - 1) // ps]
        local = kv.held_run(hashes)
        if len(hashes) - local < self.config.min_pages:
            return 0
        if not self.worth_pulling(len(hashes) - local):  # not even all of them: no need to ask the index
            return self._fallback(PullFailure.NOT_WORTH)
        t_locate = time.perf_counter()
        holders = await self.locate(hashes)
        locate_s = time.perf_counter() - t_locate
        if holders is None:
            return self._fallback(PullFailure.INDEX_DOWN)
        holders.pop(self.engine.config.replica_id, None)
        holder, held = max(holders.items(), key=lambda kv_: kv_[1], default=("", 0))
        if held - local < self.config.min_pages:
            return 0  # nobody holds more than we do: nothing to pull
        if not self.worth_pulling(held - local):
            return self._fallback(PullFailure.NOT_WORTH)
        asked = hashes[local:held]
        t0, sent_at = time.perf_counter(), time.time()
        fetch = asyncio.ensure_future(self.transport.fetch(holder, asked, self.config.timeout_s))
        try:
            await asyncio.sleep(0)  # the request leaves (the fetch's first step sends it) ...
        except BaseException:
            fetch.cancel()
            raise
        # ... and while the holder reads and the pages travel, room is made for them here, on a
        # worker thread (the evictions that takes, and their copies into the host tier, leave both
        # the pull's path and this event loop, which takes the payload as soon as it arrives)
        reserving = self._reserve_pool.submit(_timed, self.engine.reserve_pages, hashes[:held], local)
        try:
            try:
                payload = await asyncio.wait_for(fetch, self.config.timeout_s)
            except TimeoutError:
                return self._fallback(PullFailure.TIMEOUT, holder)
            except TransportError as e:
                return self._fallback(e.reason, holder, e)
            except Exception as e:  # a dead holder surfaces as whatever its transport raises
                return self._fallback(PullFailure.ERROR, holder, e)
            fetched, fetched_at = time.perf_counter(), time.time()
            bad = check_payload(payload, self.engine.model_id, self.engine.page_io.layout, asked)
            checked = time.perf_counter()
            if bad is not None:
                return self._fallback(bad, holder)
            if payload.num_pages < len(asked):
                self._fallback(PullFailure.EVICTED, holder)  # the rest is recomputed
            if not payload.num_pages:
                return 0
            # (shielded: a cancelled pull leaves the reservation to the release below, not lost)
            reservation, reserve_s = await asyncio.shield(asyncio.wrap_future(reserving))
            phases = dict.fromkeys(PULL_PHASES, 0.0)
            inserted = await self.engine.insert_pages(payload, hashes, local, phases, reservation)
        finally:
            # whatever the insert did not use (none if it ran): now, or once the reservation is made
            reserving.add_done_callback(self._release_reserved)
            if not reserving.done():  # a failed pull: the room is back before this returns
                await asyncio.wait([asyncio.wrap_future(reserving)])
        dt = time.perf_counter() - t0
        phases["reserve"] = reserve_s
        st = self.stats
        phases["locate"] = locate_s
        phases["check"] = checked - fetched
        phases["wire"] = fetched - t0
        if payload.read_s:
            phases["holder_gather"] = payload.gather_s
            phases["holder_serialize"] = payload.serialize_s
            phases["holder_lookup"] = max(payload.read_s - payload.gather_s - payload.serialize_s, 0.0)
            phases["wire"] = max(fetched - t0 - payload.read_s, 0.0)
        for k, v in phases.items():
            st.phase_s[k] += v
        st.num_pulls += 1
        st.num_pages += inserted
        size = payload_bytes(payload)
        st.num_bytes += size
        st.time_s += dt
        st.fetch_time_s += fetched - t0
        if payload.read_at:  # the holder's clock: the same machine's, or a synchronised one
            st.request_time_s += max(payload.read_at - sent_at, 0.0)
            st.read_time_s += payload.read_s
            st.reply_time_s += max(fetched_at - payload.read_at - payload.read_s, 0.0)
        self.cost.observe(size, dt)
        return inserted

    def _release_reserved(self, reserving: concurrent.futures.Future) -> None:
        """Give back a reservation's rest (idempotent), on whichever thread made it, or here."""
        if not reserving.cancelled() and reserving.exception() is None:
            self.engine.release_pages(reserving.result()[0])

    def close(self) -> None:
        self._reserve_pool.shutdown(wait=True)

    def _fallback(self, reason: PullFailure, holder: str = "", exc: BaseException | None = None) -> int:
        self.stats.fallbacks[reason.value] += 1
        if reason not in (PullFailure.NOT_WORTH, PullFailure.INDEX_DOWN):
            logger.info("pull from %s: %s (%s); recomputing those pages", holder, reason.value, exc or "")
        return 0
