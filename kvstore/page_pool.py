"""The page pool: which KV pages are free, who holds each page, and the local prefix cache.

Pure Python bookkeeping over page ids 0..num_pages-1; the tensors live in the model runner.

Invariants:
- a page's `ref_count` is the number of live sequences whose page table holds it;
- a page is in the free queue iff its ref_count is 0; free pages are allocated
  least-recently-freed first, so unreferenced cached pages are evicted in LRU order;
- a page has a hash iff it is full and registered in the prefix cache (`_cached`), and a hash
  maps to at most one page;
- `num_free_pages` counts cached-but-unreferenced pages too: they are reusable at once.

Every page that enters the prefix cache emits a `stored` KVEvent, every prefix hit a `touched`
one for the pages it reuses, and every page that leaves the cache (evicted for reuse, or the
cache cleared) a `removed` one; `take_events()` hands them, in order, to whoever publishes them
to the shared index (the engine after each step, a draft replica after each call).

A pool may have an `on_evict` hook: `allocate` calls it with the (page, hash) pairs it takes from
the cache, before handing the pages out (so before anything overwrites them): the host-memory
tier copies them out there (workers/kv_tiers.py). A pool is one tier: its events carry it.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvstore.hashing import PageHash


class KVTier(enum.StrEnum):
    GPU = "gpu"  # the replica's device page pool (its main pool, whatever the device)
    HOST = "host"  # the replica's host-memory tier


class KVEventKind(enum.StrEnum):
    STORED = "stored"  # pages entered the prefix cache
    TOUCHED = "touched"  # cached pages were reused by a prefix hit (refreshes their index entries)
    REMOVED = "removed"  # pages left the prefix cache


@dataclass(frozen=True)
class KVEvent:
    kind: KVEventKind
    hashes: tuple[PageHash, ...]
    replica_id: str
    tier: KVTier = KVTier.GPU


class NoFreePagesError(RuntimeError):
    """Raised by `allocate` when fewer pages are free than asked for (callers check first)."""


class PagePool:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool = True,
        replica_id: str = "",
        tier: KVTier = KVTier.GPU,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.replica_id = replica_id
        self.tier = tier
        self.on_evict: Callable[[list[int], list[PageHash]], None] | None = None
        self.ref_counts = [0] * num_pages
        self.page_hash: list[PageHash | None] = [None] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._cached: dict[PageHash, int] = {}
        self._events: list[KVEvent] = []

    # ---------------------------------------------------------------- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    def lookup_prefix(self, hashes: Sequence[PageHash]) -> list[int]:
        """Pages holding the longest leading run of `hashes` (references unchanged)."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def cached_page(self, h: PageHash) -> int | None:
        """The page caching hash `h`, if any (references unchanged)."""
        return self._cached.get(h) if self.enable_prefix_caching else None

    def touch(self, pages: Iterable[int]) -> None:
        """Make unreferenced cached pages the most recently used (last to be evicted)."""
        for p in pages:
            if p in self._free:
                self._free.move_to_end(p)

    def num_pages_to_acquire(self, pages: Iterable[int]) -> int:
        """How many of `pages` are free now, i.e. would leave the free queue if acquired."""
        return sum(1 for p in pages if self.ref_counts[p] == 0)

    # ---------------------------------------------------------------- changes
    def acquire(self, pages: Iterable[int]) -> None:
        """Take a reference to cached pages found by `lookup_prefix`."""
        touched = []
        for p in pages:
            if self.ref_counts[p] == 0:
                del self._free[p]
            self.ref_counts[p] += 1
            if self.page_hash[p] is not None:
                touched.append(self.page_hash[p])
        if touched:
            self._emit(KVEventKind.TOUCHED, touched)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, evicting least-recently-used cached pages as needed."""
        if n > len(self._free):
            raise NoFreePagesError(f"asked for {n} pages, {len(self._free)} free")
        out = []
        removed = []
        evicted = []
        for _ in range(n):
            p, _ = self._free.popitem(last=False)
            h = self.page_hash[p]
            if h is not None:
                del self._cached[h]
                self.page_hash[p] = None
                removed.append(h)
                evicted.append(p)
            self.ref_counts[p] = 1
            out.append(p)
        if removed:
            self._emit(KVEventKind.REMOVED, removed)
            if self.on_evict is not None:
                self.on_evict(evicted, removed)
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page. Pages are released last-first, so that when the
        cache must evict, a sequence's tail goes before its (more shareable) head."""
        for p in reversed(pages):
            rc = self.ref_counts[p] - 1
            if rc < 0:
                raise AssertionError(f"page {p} freed more often than held")
            self.ref_counts[p] = rc
            if rc == 0:
                if self.page_hash[p] is None:
                    # Uncached pages hold nothing worth keeping: reuse them first.
                    self._free[p] = None
                    self._free.move_to_end(p, last=False)
                else:
                    self._free[p] = None

    def commit(self, pages: list[int], hashes: Sequence[PageHash]) -> None:
        """Register full, computed pages in the prefix cache under their hashes.

        Where another page already caches a hash (the same prefix computed twice: two sequences
        at once, or a fully cached prompt whose last page is recomputed for its logits), the
        caller's copy is swapped in `pages` for the cached page: a reference is taken on that
        page and the copy is freed. So a sequence never holds an uncached twin of a cached page,
        and its cached ancestors stay referenced as long as it runs."""
        if not self.enable_prefix_caching:
            return
        stored = []
        for i, (p, h) in enumerate(zip(pages, hashes, strict=True)):
            if self.page_hash[p] is not None:
                continue
            cached = self._cached.get(h)
            if cached is not None:
                self.acquire([cached])
                self.free([p])
                pages[i] = cached
                continue
            self.page_hash[p] = h
            self._cached[h] = p
            stored.append(h)
        if stored:
            self._emit(KVEventKind.STORED, stored)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page that no sequence holds (e.g. after weights change)."""
        removed = []
        for p in list(self._free):
            h = self.page_hash[p]
            if h is not None:
                del self._cached[h]
                self.page_hash[p] = None
                removed.append(h)
        if removed:
            self._emit(KVEventKind.REMOVED, removed)

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def _emit(self, kind: KVEventKind, hashes: list[PageHash]) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last.kind == kind:
            self._events[-1] = KVEvent(kind, last.hashes + tuple(hashes), self.replica_id, self.tier)
        else:
            self._events.append(KVEvent(kind, tuple(hashes), self.replica_id, self.tier))
