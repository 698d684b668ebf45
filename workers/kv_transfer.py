"""Pulls of KV pages between replicas: ask the holder, or recompute, before a request is admitted.

    puller = KVPuller(engine, transport, locate, config)
    await puller.prepare(request)          # then engine.generate(request) finds the pages cached

`prepare` runs in the deployment's generate path, on the replica's event loop, before the request
reaches the engine's scheduler: the step loop never waits on a remote call. It finds the leading
run of the prompt's pages this replica holds (device or host tier); asks `locate` (the page index,
one round trip) which live replica holds more of them; and, if the cost model says moving the
missing pages beats computing them, fetches them through the `PageTransport` (kvstore/transport.py)
under a deadline, checks them, and hands them to the engine to insert as cached pages.

The cost model: predicted transfer time = bytes / measured bandwidth (bytes over wall time of
the pulls so far, an exponential average; `assumed_bandwidth_gib_s` before the first) against
predicted recompute time = tokens / measured prefill rate (the engine's prompt tokens over the
time of its prefill steps; `assumed_prefill_tokens_s` before it has one).

Nothing here raises for the user: a holder that is slow, dead, answers with other pages, or
evicted them, or an index that does not answer, leaves the pages to be recomputed, and
`PullStats.fallbacks` counts why (`PullFailure`). The holder references the pages only while
reading them (KVCacheManager.export), and the receiver inserts them as unreferenced cached pages,
so nothing stays held on either side whatever happens.
"""

from __future__ import annotations

import asyncio
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
# checking the payload, viewing it as a tensor, writing the pages, and the pool's bookkeeping.
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


class KVPuller:
    def __init__(self, engine, transport: PageTransport, locate: Locate, config: KVTransferConfig):
        self.engine = engine
        self.transport = transport
        self.locate = locate
        self.config = config
        self.stats = PullStats()
        self._bandwidth = config.assumed_bandwidth_gib_s * 2**30  # bytes/s

    def prefill_tokens_s(self) -> float:
        st = self.engine.stats()
        if st.prefill_time_s > 0 and st.num_prefill_tokens >= 64:
            return st.num_prefill_tokens / st.prefill_time_s
        return self.config.assumed_prefill_tokens_s

    def worth_pulling(self, num_pages: int) -> bool:
        """The cost model: moving `num_pages` pages is predicted faster than computing them."""
        transfer_s = num_pages * self.engine.page_io.layout.page_bytes / self._bandwidth
        recompute_s = num_pages * self.engine.kv_cache.page_size / self.prefill_tokens_s()
        return transfer_s < recompute_s

    async def prepare(self, request: GenerateRequest) -> int:
        """Pull the leading pages of `request`'s prompt that another replica holds and this one
        lacks, if worth it. Returns the pages inserted (0 when none: they will be computed)."""
        kv = self.engine.kv_cache
        ps = kv.page_size
        hashes = list(request.page_hashes or ())[: (len(request.prompt_token_ids) - 1) // ps]
        local = kv.held_run(hashes)
        if len(hashes) - local < self.config.min_pages:
            return 0
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
        try:
            payload = await asyncio.wait_for(
                self.transport.fetch(holder, asked, self.config.timeout_s), self.config.timeout_s
            )
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
        phases = dict.fromkeys(PULL_PHASES, 0.0)
        inserted = await self.engine.insert_pages(payload, hashes, local, phases)
        dt = time.perf_counter() - t0
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
        self._bandwidth = (1 - _EWMA) * self._bandwidth + _EWMA * size / max(dt, 1e-6)
        return inserted

    def _fallback(self, reason: PullFailure, holder: str = "", exc: BaseException | None = None) -> int:
        self.stats.fallbacks[reason.value] += 1
        if reason not in (PullFailure.NOT_WORTH, PullFailure.INDEX_DOWN):
            logger.info("pull from %s: %s (%s); recomputing those pages", holder, reason.value, exc or "")
        return 0
