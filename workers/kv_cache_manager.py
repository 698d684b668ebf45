"""The KV-cache manager: the only code that keeps a sequence's pages, over the page pool.

    hit = kv.lookup(seq, max_pages)        where the sequence's leading full pages are cached
    kv.allocate(seq, num_tokens, hit)      pages for its first num_tokens tokens (the hit's first)
    kv.commit(seq, num_tokens)             register the full pages among them in the prefix cache
    kv.trim(seq, num_tokens)               give back the pages past them (rejected speculation)
    kv.free(seq)                           give back every page

The scheduler and the draft model call only this; the page pool (kvstore/page_pool.py) keeps the
pages themselves, this object a sequence's view of them: its `block_table`, how many of its pages
are committed (`num_committed_pages`), and its chained page hashes (`page_hashes`: the ones the
request brought from the ingress, extended here as tokens are generated: the one place the engine
hashes pages).

A lookup answers page by page where each page is: on this GPU (in the pool), in this replica's
host memory (workers/kv_tiers.py), or nowhere (where the answer stops). `allocate` reuses the
GPU pages by reference and restores the host pages into fresh device pages, which are cached
again; the scheduler computes the rest. Pages on other replicas are pulled before a request
reaches the scheduler (workers/kv_transfer.py) and `insert`ed here as cached pages, so by the
time it is admitted they are GPU pages like any other; `export` reads pages for such a pull.

Threads: the engine loop calls this between steps, and also while a step runs on the step thread
(an export or an insert for a pull must not wait for the step); the step thread allocates a
speculative step's draft pages. Every change to the pools therefore happens under `lock`. An
export holds the lock only to take and to drop its references: the copy runs outside it, on
pages that no eviction can take meanwhile (referenced) and no step writes (cached pages are
full and final).

Invariants (beside the pool's):
- a sequence's `block_table` holds one page per `page_size` tokens of its first tokens, and its
  first `num_committed_pages` pages are registered in the prefix cache under its page hashes;
- `allocate` is all or nothing: it returns False and changes nothing when the pool is short.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.hashing import PageHash, page_hashes
from kvstore.page_pool import PagePool
from workers.sequence import Sequence

if TYPE_CHECKING:
    from workers.kv_tiers import HostTier


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b: pages that hold a tokens of b each."""
    return -(-a // b)


class PageLocation(enum.Enum):
    GPU = "gpu"  # in this replica's page pool: reused by reference, nothing to compute or copy
    HOST = "host"  # in this replica's host-memory tier: restored by a copy
    REMOTE = "remote"  # on another replica: pulled before admission (workers/kv_transfer.py)


@dataclass
class PrefixHit:
    """Where the leading full pages of a sequence are cached, from its first page on: page i is at
    `locations[i]`, as `pages[i]` (a pool page for GPU, a host-tier page for HOST); the run stops
    at the first page cached nowhere."""

    locations: list[PageLocation] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)

    @property
    def num_pages(self) -> int:
        return len(self.locations)

    @property
    def gpu_pages(self) -> list[int]:
        return [p for p, loc in zip(self.pages, self.locations, strict=True) if loc is PageLocation.GPU]

    @property
    def host_pages(self) -> list[int]:
        return [p for p, loc in zip(self.pages, self.locations, strict=True) if loc is PageLocation.HOST]


@dataclass
class Reservation:
    """Room for a pull's pages, taken before they arrive (`KVCacheManager.reserve`): `held`, the
    run of the prompt held here (referenced), and `pages`, fresh pages for the pulled ones
    (referenced, uncommitted). `done` once inserted or released."""

    held: list[int]
    pages: list[int]
    done: bool = False


class KVCacheManager:
    def __init__(self, pool: PagePool, model_id: str, host: HostTier | None = None):
        self.pool = pool
        self.page_size = pool.page_size
        self.model_id = model_id
        self.host = host
        # restore_worth(num_host_pages): whether restoring them beats computing them (None: always)
        self.restore_worth: Callable[[int], bool] | None = None
        self.lock = threading.RLock()  # guards the pools (device and host): see the module docstring
        self.num_reservations = 0  # made by `reserve` and not yet inserted or released
        if host is not None:
            pool.on_evict = host.store

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    # ---------------------------------------------------------------- lookups
    def lookup(self, seq: Sequence, max_pages: int) -> PrefixHit:
        """Where the first (up to) `max_pages` full pages of `seq` are cached. Takes no references."""
        hashes = self.hashes(seq, max_pages)
        if self.host is None or not self.pool.enable_prefix_caching:
            pages = self.pool.lookup_prefix(hashes)
            return PrefixHit([PageLocation.GPU] * len(pages), pages)
        if self.host.num_stores_in_flight:
            with self.lock:
                self.host.poll()  # stores that have arrived are found from now on
        hit = PrefixHit()
        for h in hashes:
            page = self.pool.cached_page(h)
            loc = PageLocation.GPU
            if page is None:
                page, loc = self.host.lookup(h), PageLocation.HOST
                if page is None:
                    break
            hit.locations.append(loc)
            hit.pages.append(page)
        num_host = hit.locations.count(PageLocation.HOST)
        if num_host and self.restore_worth is not None and not self.restore_worth(num_host):
            # computing the host pages is predicted faster than copying them: the hit stops before them
            first = hit.locations.index(PageLocation.HOST)
            del hit.locations[first:], hit.pages[first:]
            self.host.num_skipped_restores += 1
        return hit

    def hashes(self, seq: Sequence, num_pages: int) -> list[PageHash]:
        """The chained hashes of the first `num_pages` full pages of `seq`, extending its chain as needed."""
        have = seq.page_hashes
        if num_pages > len(have):
            ps = self.page_size
            parent = have[-1] if have else None
            have.extend(page_hashes(seq.token_ids[len(have) * ps : num_pages * ps], ps, self.model_id, parent))
        return have[:num_pages]

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Fresh pages `seq` lacks to hold its first `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.page_size) - len(seq.block_table))

    # ---------------------------------------------------------------- changes
    def allocate(self, seq: Sequence, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give `seq` pages for its first `num_tokens` tokens: a sequence that holds none starts
        with the pages of `hit` (a GPU page by reference, a host page restored into a fresh
        page and cached again; all count as committed), then fresh pages. Returns False,
        changing nothing, if the pool has too few free pages."""
        if hit is not None and hit.num_pages and seq.block_table:
            raise AssertionError(f"{seq!r} already holds pages: a prefix hit starts an empty block table")
        with self.lock:
            return self._allocate(seq, num_tokens, hit)

    def _allocate(self, seq: Sequence, num_tokens: int, hit: PrefixHit | None) -> bool:
        reused = hit.gpu_pages if hit is not None else []
        slots = hit.host_pages if hit is not None else []
        need = max(0, cdiv(num_tokens, self.page_size) - len(seq.block_table) - len(reused))
        if need + (self.pool.num_pages_to_acquire(reused) if reused else 0) > self.pool.num_free_pages:
            return False
        if reused:
            self.pool.acquire(reused)  # before allocating: eviction must not take them
        if slots:
            self.host.pin(slots)  # the device's evictions go to the host tier: it must not take them
        fresh = self.pool.allocate(need) if need else []
        if hit is not None and hit.num_pages:
            restored = fresh[: len(slots)]
            if slots:
                self.host.restore(slots, restored)
                self.host.unpin(slots)
            it_gpu, it_new = iter(reused), iter(restored)
            table = [next(it_gpu) if loc is PageLocation.GPU else next(it_new) for loc in hit.locations]
            self.pool.commit(table, self.hashes(seq, hit.num_pages))  # caches the restored pages
            seq.block_table = table
            seq.num_committed_pages = hit.num_pages
            fresh = fresh[len(slots) :]
        seq.block_table.extend(fresh)
        return True

    # ---------------------------------------------------------------- pages between replicas
    def held_run(self, hashes: list[PageHash]) -> int:
        """How many leading pages of `hashes` this replica holds (device or host)."""
        n = 0
        for h in hashes:
            if self.pool.cached_page(h) is None and (self.host is None or self.host.lookup(h) is None):
                break
            n += 1
        return n

    def export(
        self, hashes: list[PageHash], read: Callable[[list[int], list[int], list[bool]], object]
    ) -> tuple[int, object]:
        """The leading run of `hashes` held here (device or host), read by `read(device_pages,
        host_pages, on_device)` (`on_device[i]`: page i of the run is the next device page, else
        the next host page) under a reference that keeps them from eviction for the time of the
        read. The lock is held only to take and drop the references, so `read` may run while a
        step does (on another thread). Returns (pages, bytes)."""
        with self.lock:
            device, host, order = [], [], []
            for h in hashes:
                p = self.pool.cached_page(h)
                if p is not None:
                    device.append(p)
                    order.append(True)
                    continue
                s = self.host.lookup(h) if self.host is not None else None
                if s is None:
                    break
                host.append(s)
                order.append(False)
            if not order:
                return 0, b""
            self.pool.acquire(device)
            if host:
                self.host.pin(host)
        try:
            return len(order), read(device, host, order)
        finally:
            with self.lock:
                self.pool.free(device)
                if host:
                    self.host.unpin(host)

    def reserve(self, hashes: list[PageHash], start: int) -> Reservation:
        """Room for an insert of `hashes[start:]` (pages another replica is sending), taken
        before they arrive so that the pull's wait covers it: the run `hashes[:start]` held here
        is referenced (making room never evicts it) and a fresh page is allocated for each page
        of `hashes[start:]` not cached here (fewer when the pool is short), evicting cached pages
        as any allocation does. The pages are referenced and uncommitted: no step reads or
        writes them. `insert` uses it; `release` gives it back unused (idempotent)."""
        with self.lock:
            if not self.pool.enable_prefix_caching:
                return Reservation([], [], done=True)
            held = [p for h in hashes[:start] if (p := self.pool.cached_page(h)) is not None]
            self.pool.acquire(held)
            todo = sum(1 for h in hashes[start:] if self.pool.cached_page(h) is None)
            n = min(todo, self.pool.num_free_pages)
            self.num_reservations += 1
            return Reservation(held, self.pool.allocate(n) if n else [])

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's references and its unused pages (as empty pages)."""
        with self.lock:
            if not reservation.done:
                reservation.done = True
                self.num_reservations -= 1
                self.pool.free(reservation.pages)
                self.pool.free(reservation.held)

    def insert(
        self,
        hashes: list[PageHash],
        start: int,
        write: Callable[[list[int], list[int]], None],
        reservation: Reservation | None = None,
    ) -> int:
        """Cache pages pulled from another replica: `hashes[start:]` continue a run `hashes[:start]`
        held here; `write(pages, payload_pages)` fills device `pages` with the payload's pages
        `payload_pages` (page i of the payload is `hashes[start + i]`). Pages already cached
        here are skipped; when the pool (or `reservation`, taken by `reserve` while the pages
        travelled) is short only the leading ones go in. `write` runs outside the lock (into
        referenced, uncommitted pages no step touches), so a step's allocation never waits for
        the copy. Returns how many pages were inserted (as cached, unreferenced pages, most
        recently used). The reservation is released whatever happens."""
        res = reservation if reservation is not None else self.reserve(hashes, start)
        try:
            with self.lock:
                if res.done or not self.pool.enable_prefix_caching:
                    return 0
                todo = [i for i in range(start, len(hashes)) if self.pool.cached_page(hashes[i]) is None]
                n = min(len(todo), len(res.pages))
                pages, write_at = res.pages[:n], todo[:n]
            if not n:
                return 0
            write(pages, [i - start for i in write_at])
            with self.lock:
                self.pool.commit(pages, [hashes[i] for i in write_at])  # a twin cached meanwhile is swapped in
                self.pool.free(pages)  # the committed pages, as cached (or their twins' extra references)
                res.pages = res.pages[n:]
            return n
        finally:
            self.release(res)  # the held run, and unused pages (all of them on a failed write) back as empty

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full pages among the first `num_tokens` tokens of `seq` (their KV computed
        and final) in the prefix cache. A page whose hash another page already caches is swapped
        for that page (the pool's `commit`)."""
        with self.lock:
            full = num_tokens // self.page_size
            done = seq.num_committed_pages
            if full <= done:
                return
            hashes = self.hashes(seq, full)
            pages = seq.block_table[done:full]
            self.pool.commit(pages, hashes[done:full])
            seq.block_table[done:full] = pages
            seq.num_committed_pages = full

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the pages of `seq` past its first `num_tokens` tokens (rejected drafts' KV)."""
        with self.lock:
            keep = cdiv(num_tokens, self.page_size)
            if len(seq.block_table) > keep:
                self.pool.free(seq.block_table[keep:])
                del seq.block_table[keep:]
                seq.num_committed_pages = min(seq.num_committed_pages, keep)

    def free(self, seq: Sequence) -> None:
        """Give back every page of `seq` (full committed ones stay in the prefix cache)."""
        with self.lock:
            self.pool.free(seq.block_table)
            seq.block_table = []
            seq.num_committed_pages = 0
