"""What this router sent where a moment ago: the pages of prompts still being computed.

The page index learns a prompt's pages only once a replica has computed and published them: for
the length of a prefill (seconds under load), a second request with the same new prefix looks
unheld and goes to the least-loaded replica, which computes the prefix again (the bench's
`missed_in_flight_elsewhere`). SGLang's cache-aware router avoids that by inserting a request's
prefix into its tree when it routes it, not when it is computed; `RecentRoutes` is that memory:
the page hashes of the prompts this router sent in the last `ttl_s` seconds, each with the replica
it went to. The router counts a replica's leading run of them as held (the index's answer when
larger), so a prefix sticks to the replica computing it until the index knows it.

Pure (a clock is passed in), bounded (`max_pages` entries, the oldest dropped first); one per
router process: ingress replicas do not share it (each still sees the index).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.hashing import PageHash


class RecentRoutes:
    def __init__(self, ttl_s: float, max_pages: int = 200_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_pages = max_pages
        self._clock = clock
        self._pages: OrderedDict[PageHash, tuple[str, float]] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._pages)

    def record(self, hashes: Sequence[PageHash], replica_id: str) -> None:
        """`hashes` (a prompt's page hashes) were just sent to `replica_id`."""
        if self.ttl_s <= 0:
            return
        now = self._clock()
        pages = self._pages
        for h in hashes:
            pages[h] = (replica_id, now)
            pages.move_to_end(h)
        while pages and (len(pages) > self.max_pages or next(iter(pages.values()))[1] < now - self.ttl_s):
            pages.popitem(last=False)

    def leading(self, hashes: Sequence[PageHash]) -> dict[str, int]:
        """{replica: how many leading pages of `hashes` were sent to it within ttl_s} (the replica
        the first page went to last; {} when none)."""
        if not hashes or self.ttl_s <= 0:
            return {}
        oldest = self._clock() - self.ttl_s
        first = self._pages.get(hashes[0])
        if first is None or first[1] < oldest:
            return {}
        replica, n = first[0], 0
        for h in hashes:
            entry = self._pages.get(h)
            if entry is None or entry[0] != replica or entry[1] < oldest:
                break
            n += 1
        return {replica: n}
