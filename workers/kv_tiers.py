"""The host-memory tier: KV pages evicted from the device pool live on in host memory.

A `HostTier` is a second page pool (kvstore/page_pool.py, tier HOST: its own LRU, keyed by the
pages' chained hashes, its own KV events) over host tensors of the device cache's layout
(workers/runner/kv_pages.py; pinned on CUDA). The device pool calls `store` as it evicts cached
pages (its `on_evict` hook, before the pages are reused): each one not already in host memory is
copied into a host page, evicting the host tier's least recently used pages as needed. A prefix
hit on a host page (the KV-cache manager's lookup) is restored by `restore`: copied back into a
fresh device page, which is then cached on the device again. The host copy stays (the tier is
inclusive), so evicting that page again costs no copy.

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

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.hashing import PageHash
from kvstore.page_pool import KVEvent, KVTier, PagePool
from workers.runner.kv_pages import KVPages, copy_pages


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

    @classmethod
    def build(cls, device: KVPages, gib: float, page_size: int, replica_id: str) -> HostTier | None:
        """A tier of `gib` GiB beside `device` (None for 0: no tier)."""
        if gib <= 0:
            return None
        return cls(device, max(1, int(gib * 2**30) // device.page_bytes()), page_size, replica_id)

    def lookup(self, h: PageHash) -> int | None:
        """The host page holding hash `h`, if any."""
        return self.pool.cached_page(h)

    def store(self, pages: Sequence[int], hashes: Sequence[PageHash]) -> None:
        """Copy evicted device `pages` (cached under `hashes`) into host memory; a page already
        there is only made most recently used."""
        new_pages, new_hashes = [], []
        for p, h in zip(pages, hashes, strict=True):
            held = self.pool.cached_page(h)
            if held is not None:
                self.pool.touch([held])
            else:
                new_pages.append(p)
                new_hashes.append(h)
        n = min(len(new_pages), self.pool.num_free_pages)  # pinned pages are not free
        if not n:
            return
        slots = self.pool.allocate(n)
        copy_pages(self.device, new_pages[:n], self.host, slots)
        self.pool.commit(slots, new_hashes[:n])  # fresh hashes: no twin to swap
        self.pool.free(slots)
        self.num_stored_pages += n

    def pin(self, slots: Sequence[int]) -> None:
        self.pool.acquire(slots)

    def unpin(self, slots: Sequence[int]) -> None:
        self.pool.free(slots)

    def restore(self, slots: Sequence[int], pages: Sequence[int]) -> None:
        """Copy host pages `slots` into device `pages` (pinned by the caller)."""
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
