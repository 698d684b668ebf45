"""The host-memory tier: KV pages evicted from the device pool live on in host memory.

A `HostTier` is a second page pool (kvstore/page_pool.py, tier HOST: its own LRU, keyed by the
pages' chained hashes, its own KV events) over host tensors of the device cache's layout
(workers/runner/kv_pages.py; pinned on CUDA). The device pool calls `store` as it evicts cached
pages (its `on_evict` hook, before the pages are reused): each one not already in host memory is
copied into a host page, evicting the host tier's least recently used pages as needed. A prefix
hit on a host page (the KV-cache manager's lookup) is restored by `restore`: copied back into a
fresh device page, which is then cached on the device again. The host copy stays (the tier is
inclusive), so evicting that page again costs no copy.

On CUDA a store does not block: the evicted pages are gathered on the device (on the step's stream,
so the step that reuses them runs after), copied on a side stream into a pinned staging buffer
(`KVPages.gather_to_host`), and written into their host pages by the tier's own thread once that copy
is done. The host pages are allocated at once (not evictable, not yet found) and cached by `poll`,
run at the tier's next store and at the KV-cache manager's next lookup (under its lock). A page
evicted again while its store is in flight is not stored twice. At most `MAX_STORES_IN_FLIGHT`
stores travel at once (each holds a staging buffer); a store beyond that waits for the oldest. On
CPU a store is a synchronous copy (nothing to overlap).

A restore is worth it only when the copy is predicted cheaper than recomputing the pages: the
tier measures its restores (bytes over wall time, an exponential average: `restore_s`) and the
KV-cache manager's lookup stops at the first host page when the engine's `restore_worth` says no
(the pages are then computed, as without a tier). On CUDA a restore's copy to the device runs on a
side stream (workers/runner/kv_pages.py: `KVPages.load`), the next step waiting for it on the GPU.

Invariants: a host page's ref_count is the number of restores in progress that read it (`pin`
before the device allocates, `unpin` after the copy), so host eviction never takes a page being
restored; every host page is otherwise free (cached, or empty).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvstore.hashing import PageHash
from kvstore.page_pool import KVEvent, KVTier, PagePool
from workers.runner.kv_pages import KVPages, copy_pages

logger = logging.getLogger(__name__)

MAX_STORES_IN_FLIGHT = 4


@dataclass
class _Store:
    """A CUDA store in flight: host `slots` (allocated, uncommitted) filled from `staging` by the
    tier's thread once the device-to-host copy is done (`done`)."""

    slots: list[int]
    hashes: list[PageHash]
    staging: torch.Tensor  # the pinned buffer (returned to the free list when committed)
    done: Future


@dataclass
class HostTierStats:
    num_pages: int = 0  # host pages in the tier
    num_cached_pages: int = 0  # of those, holding a page's KV
    num_stored_pages: int = 0  # pages copied in on eviction, since start
    num_restored_pages: int = 0  # pages copied back to the device on a prefix hit, since start
    num_skipped_restores: int = 0  # prefix hits on host pages recomputed: the copy was predicted slower


class HostTier:
    def __init__(self, device: KVPages, num_pages: int, page_size: int, replica_id: str = ""):
        self.device = device
        self.host = KVPages.host(device, num_pages)
        self.pool = PagePool(num_pages, page_size, True, replica_id, KVTier.HOST)
        self.num_stored_pages = 0
        self.num_restored_pages = 0
        self.num_skipped_restores = 0
        self._restore_bw = 0.0  # bytes/s of the restores so far (0: none measured yet)
        # CUDA stores in flight (module docstring), oldest first; what they store; idle pinned buffers
        self._async = device.device.type == "cuda" and device.stacked is not None and self.host.stacked.is_pinned()
        self._in_flight: deque[_Store] = deque()
        self._in_flight_hashes: set[PageHash] = set()
        self._buffers: list[torch.Tensor] = []
        self._writer: ThreadPoolExecutor | None = None

    @classmethod
    def build(cls, device: KVPages, gib: float, page_size: int, replica_id: str) -> HostTier | None:
        """A tier of `gib` GiB beside `device` (None for 0: no tier)."""
        if gib <= 0:
            return None
        return cls(device, max(1, int(gib * 2**30) // device.page_bytes()), page_size, replica_id)

    def lookup(self, h: PageHash) -> int | None:
        """The host page holding hash `h`, if any."""
        return self.pool.cached_page(h)

    @property
    def num_stores_in_flight(self) -> int:
        return len(self._in_flight)

    def store(self, pages: Sequence[int], hashes: Sequence[PageHash]) -> None:
        """Copy evicted device `pages` (cached under `hashes`) into host memory; a page already
        there is only made most recently used."""
        self.poll()
        new_pages, new_hashes = [], []
        for p, h in zip(pages, hashes, strict=True):
            held = self.pool.cached_page(h)
            if held is not None:
                self.pool.touch([held])
            elif h not in self._in_flight_hashes:
                new_pages.append(p)
                new_hashes.append(h)
        n = min(len(new_pages), self.pool.num_free_pages)  # pinned pages are not free
        if not n:
            return
        slots = self.pool.allocate(n)
        if self._async:
            self._store_async(new_pages[:n], slots, new_hashes[:n])
            return
        copy_pages(self.device, new_pages[:n], self.host, slots)
        self._commit(slots, new_hashes[:n])

    def _commit(self, slots: list[int], hashes: list[PageHash]) -> None:
        self.pool.commit(slots, hashes)  # fresh hashes: no twin to swap
        self.pool.free(slots)
        self.num_stored_pages += len(slots)

    def _store_async(self, pages: list[int], slots: list[int], hashes: list[PageHash]) -> None:
        if len(self._in_flight) >= MAX_STORES_IN_FLIGHT:
            self._in_flight[0].done.result()  # let the oldest finish (its buffer is reused below)
            self.poll()
        d = self.device.stacked
        need = d.shape[0] * 2 * len(pages) * d[0, 0, 0].numel()
        fit = [b for b in self._buffers if b.numel() >= need]
        buf = min(fit, key=torch.Tensor.numel) if fit else None
        if buf is None:  # pinned memory: allocated rarely, kept for the next stores
            buf = torch.empty(max(need, 64 * need // len(pages)), dtype=d.dtype, pin_memory=True)
        else:
            self._buffers.remove(buf)
        staging = buf[:need].view(d.shape[0], 2, len(pages), *d.shape[3:])
        copied = self.device.gather_to_host(pages, staging)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="host-tier-store")
        done = self._writer.submit(_write_host_pages, copied, staging, self.host.stacked, slots)
        self._in_flight.append(_Store(slots, hashes, buf, done))
        self._in_flight_hashes.update(hashes)

    def poll(self) -> None:
        """Cache the host pages of the CUDA stores that have arrived, oldest first (under the
        KV-cache manager's lock); a store that failed gives its pages back uncached, and says why."""
        while self._in_flight and self._in_flight[0].done.done():
            store = self._in_flight.popleft()
            self._in_flight_hashes.difference_update(store.hashes)
            self._buffers.append(store.staging)
            try:
                store.done.result()
            except Exception:
                logger.exception("a host-tier store of %d pages failed; they are not kept", len(store.slots))
                self.pool.free(store.slots)
                continue
            self._commit(store.slots, store.hashes)

    def drain(self) -> None:
        """Wait for the stores in flight and cache their pages (under the KV-cache manager's lock)."""
        while self._in_flight:
            self._in_flight[0].done.exception()
            self.poll()

    def close(self) -> None:
        """Finish the stores in flight and stop the tier's thread (the engine's shutdown)."""
        self.drain()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def pin(self, slots: Sequence[int]) -> None:
        self.pool.acquire(slots)

    def unpin(self, slots: Sequence[int]) -> None:
        self.pool.free(slots)

    def restore(self, slots: Sequence[int], pages: Sequence[int]) -> None:
        """Copy host pages `slots` into device `pages` (pinned by the caller)."""
        if self._async:
            self.device.reserve_staging(len(slots))  # not part of what a restore costs
        t0 = time.perf_counter()
        copy_pages(self.host, slots, self.device, pages)
        dt = time.perf_counter() - t0
        self.num_restored_pages += len(slots)
        if slots and dt > 0:
            bw = len(slots) * self.device.page_bytes() / dt
            self._restore_bw = bw if not self._restore_bw else 0.7 * self._restore_bw + 0.3 * bw

    def restore_s(self, num_pages: int) -> float | None:
        """Predicted time to restore `num_pages` pages (None before the first restore)."""
        if not self._restore_bw:
            return None
        return num_pages * self.device.page_bytes() / self._restore_bw

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> HostTierStats:
        return HostTierStats(
            self.pool.num_pages,
            self.pool.num_cached_pages,
            self.num_stored_pages,
            self.num_restored_pages,
            self.num_skipped_restores,
        )

    def engine_stats(self) -> dict[str, int]:
        """The tier's fields of `EngineStats`."""
        h = self.stats()
        return dict(
            num_host_pages=h.num_pages,
            num_host_cached_pages=h.num_cached_pages,
            num_host_stored_pages=h.num_stored_pages,
            num_host_restored_pages=h.num_restored_pages,
            num_host_skipped_restores=h.num_skipped_restores,
        )


def _write_host_pages(copied: torch.cuda.Event, staging: torch.Tensor, host: torch.Tensor, slots: list[int]) -> None:
    """The tier's thread: once the device-to-host copy into `staging` is done, write it into the
    host pages `slots` (one pass over the bytes; the engine's thread goes on meanwhile)."""
    copied.synchronize()
    host.index_copy_(2, torch.tensor(slots, dtype=torch.long), staging)
