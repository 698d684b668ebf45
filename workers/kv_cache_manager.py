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
host memory, on another replica, or nowhere (where the answer stops). Only the GPU tier exists
today; the host-memory tier and pages pulled from other replicas plug in here, and the scheduler
decides from the answer what to reuse, what to fetch and what to compute.

Invariants (beside the pool's):
- a sequence's `block_table` holds one page per `page_size` tokens of its first tokens, and its
  first `num_committed_pages` pages are registered in the prefix cache under its page hashes;
- `allocate` is all or nothing: it returns False and changes nothing when the pool is short.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvstore.hashing import PageHash, page_hashes
from kvstore.page_pool import PagePool
from workers.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b: pages that hold a tokens of b each."""
    return -(-a // b)


class PageLocation(enum.Enum):
    GPU = "gpu"  # in this replica's page pool: reused by reference, nothing to compute or copy
    HOST = "host"  # in this replica's host-memory tier (not yet built): restored by a copy
    REMOTE = "remote"  # on another replica (not yet built): fetched over the page transport


@dataclass
class PrefixHit:
    """Where the leading full pages of a sequence are cached, from its first page on: page i is at
    `locations[i]`; the run stops at the first page cached nowhere. `gpu_pages` are the pool's
    pages of the leading run that is on this GPU (today: the whole run)."""

    locations: list[PageLocation] = field(default_factory=list)
    gpu_pages: list[int] = field(default_factory=list)

    @property
    def num_pages(self) -> int:
        return len(self.locations)


class KVCacheManager:
    def __init__(self, pool: PagePool, model_id: str):
        self.pool = pool
        self.page_size = pool.page_size
        self.model_id = model_id

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    # ---------------------------------------------------------------- lookups
    def lookup(self, seq: Sequence, max_pages: int) -> PrefixHit:
        """Where the first (up to) `max_pages` full pages of `seq` are cached. Takes no references."""
        pages = self.pool.lookup_prefix(self.hashes(seq, max_pages))
        return PrefixHit([PageLocation.GPU] * len(pages), pages)

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
        with the GPU pages of `hit` (a reference taken on each; they count as committed), then
        fresh pages. Returns False, changing nothing, if the pool has too few free pages."""
        reused = hit.gpu_pages if hit is not None else []
        if reused and seq.block_table:
            raise AssertionError(f"{seq!r} already holds pages: a prefix hit starts an empty block table")
        need = max(0, cdiv(num_tokens, self.page_size) - len(seq.block_table) - len(reused))
        if need + (self.pool.num_pages_to_acquire(reused) if reused else 0) > self.pool.num_free_pages:
            return False
        if reused:
            self.pool.acquire(reused)  # before allocating: eviction must not take them
            seq.block_table = list(reused)
            seq.num_committed_pages = len(reused)
        if need:
            seq.block_table.extend(self.pool.allocate(need))
        return True

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full pages among the first `num_tokens` tokens of `seq` (their KV computed
        and final) in the prefix cache. A page whose hash another page already caches is swapped
        for that page (the pool's `commit`)."""
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
        keep = cdiv(num_tokens, self.page_size)
        if len(seq.block_table) > keep:
            self.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]
            seq.num_committed_pages = min(seq.num_committed_pages, keep)

    def free(self, seq: Sequence) -> None:
        """Give back every page of `seq` (full committed ones stay in the prefix cache)."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_committed_pages = 0
