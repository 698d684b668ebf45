"""A replica's writer to the shared page index, off the engine's hot path.

The engine hands its page pool's KV events to `submit`, which never blocks on Redis: it appends
to a bounded in-memory queue (bounded in page hashes; when full, the oldest queued events are
dropped and counted, since fresh facts route better than stale ones) and returns. A daemon
thread drains the queue in batches of up to `max_batch_pages` hashes, one script call each,
sends the heartbeat every `heartbeat_interval_s` with the load that `load_fn` reports, and trims
expired entries every `trim_interval_s`.

Before anything else the thread clears what the index holds under this replica id (left by an
earlier life of the replica), retrying until Redis answers; events wait in the queue meanwhile.
On a Redis error the thread drops the batch in hand, counts it, waits `retry_after_s`, and goes on:
it recovers by itself when Redis returns. A dropped `removed` event leaves a stale entry that
expires within `ttl_s`; a dropped `stored` one is written again at the page's next hit.

The publisher also keeps the set of pages the replica's prefix cache holds (`stored`/`touched`
add a page, `removed` drops it, as submitted, so dropped events do not matter). When a heartbeat
finds that its previous one is gone (Redis restarted empty, or the replica was silent past
`heartbeat_ttl_s` and its entries may have expired), the queue is replaced by one `stored`
event for that whole set: the index learns again everything the replica holds, without waiting
for each page's next hit. It costs one hash per cached page (8 bytes in the set, 16 on the wire).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from kvstore.index import PageIndex, ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind, KVTier

logger = logging.getLogger(__name__)


@dataclass
class PublisherMetrics:
    submitted_events: int = 0
    published_events: int = 0  # events (or parts of events) written to Redis
    published_pages: int = 0
    dropped_events: int = 0  # by a full queue or a failed write
    dropped_pages: int = 0
    publish_errors: int = 0  # failed writes of a batch, a heartbeat, a trim or the first clear
    heartbeats: int = 0
    resyncs: int = 0  # times the whole cached set was republished after the index forgot the replica


class Publisher:
    """Publishes one replica's KV events and heartbeats. `start()`, then `submit()` from the
    engine, `close()` at shutdown. `load_fn` is called on the publisher thread: it must be
    cheap and safe to call from there (reading a few ints is)."""

    def __init__(self, index: PageIndex, replica_id: str, load_fn: Callable[[], ReplicaLoad] | None = None):
        self.index = index
        self.replica_id = replica_id
        self.load_fn = load_fn or ReplicaLoad
        self.metrics = PublisherMetrics()
        cfg = index.config
        self._max_queued = cfg.max_queued_pages
        self._max_batch = cfg.max_batch_pages
        self._lock = threading.Lock()
        self._queue: deque[KVEvent] = deque()
        self._queued_pages = 0
        # page hashes the replica holds, per tier (device pool, host tier), as submitted
        self._cached: dict[KVTier, set[int]] = {t: set() for t in KVTier}
        self._wake = threading.Event()
        self._idle = threading.Event()  # set when the queue is empty and nothing is in flight
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # the last write failed (logged once per outage)

    # ------------------------------------------------------------------ engine side
    def submit(self, events: Iterable[KVEvent]) -> None:
        """Queue events for the index; never blocks on Redis and never raises for it."""
        dropped = dropped_pages = 0
        with self._lock:
            for ev in events:
                if ev.replica_id != self.replica_id:
                    raise ValueError(
                        f"event of replica {ev.replica_id!r} submitted to the publisher of {self.replica_id!r}"
                    )
                self._queue.append(ev)
                self._queued_pages += len(ev.hashes)
                if ev.kind == KVEventKind.REMOVED:
                    self._cached[ev.tier].difference_update(ev.hashes)
                else:
                    self._cached[ev.tier].update(ev.hashes)
                self.metrics.submitted_events += 1
            while self._queued_pages > self._max_queued:
                old = self._queue.popleft()
                self._queued_pages -= len(old.hashes)
                dropped += 1
                dropped_pages += len(old.hashes)
            self.metrics.dropped_events += dropped
            self.metrics.dropped_pages += dropped_pages
            if self._queue:
                self._idle.clear()
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Publisher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kv-publisher-{self.replica_id}", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted event has been written (or dropped). True if it got there."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 1.0) -> None:
        """Write what is queued (for up to `timeout_s`), withdraw the heartbeat, stop the thread."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stopping.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + self.index.config.publish_timeout_ms / 1000)
        self._thread = None

    # ------------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        cfg = self.index.config
        while not self._stopping.is_set():
            if self._try(self.index.clear, self.replica_id):
                break
            self._stopping.wait(cfg.retry_after_s)
        next_heartbeat = next_trim = time.monotonic()
        first_heartbeat = True
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + cfg.heartbeat_interval_s
                still_there = self._try(self.index.heartbeat, self.replica_id, self.load_fn())
                if still_there is None:
                    self._stopping.wait(cfg.retry_after_s)
                    continue
                self.metrics.heartbeats += 1
                if not still_there and not first_heartbeat:
                    self._resync()
                first_heartbeat = False
            if now >= next_trim:
                next_trim = now + cfg.trim_interval_s
                self._try(self.index.trim, self.replica_id)
            batch, pages = self._take_batch()
            if batch:
                if self._try(self.index.publish, batch):
                    self.metrics.published_events += len(batch)
                    self.metrics.published_pages += pages
                else:
                    with self._lock:
                        self.metrics.dropped_events += len(batch)
                        self.metrics.dropped_pages += pages
                    self._mark_idle_if_empty()
                    self._stopping.wait(cfg.retry_after_s)
                continue  # more may be queued: drain before sleeping
            self._mark_idle_if_empty()
            self._wake.wait(max(0.0, next_heartbeat - time.monotonic()))
            self._wake.clear()
        self._try(self.index.leave, self.replica_id)

    def _resync(self) -> None:
        """The index forgot this replica: queue everything it holds, in place of what was queued
        (the set already reflects every queued event)."""
        logger.warning(
            "page index lost this replica's entries (Redis restarted, or heartbeats stopped for over %.1fs): "
            "republishing its %d cached pages",
            self.index.config.heartbeat_ttl_s,
            sum(map(len, self._cached.values())),
        )
        with self._lock:
            self._queue.clear()
            self._queued_pages = 0
            for tier, cached in self._cached.items():
                if cached:
                    self._queue.append(KVEvent(KVEventKind.STORED, tuple(cached), self.replica_id, tier))
                    self._queued_pages += len(cached)
                    self._idle.clear()
            self.metrics.resyncs += 1

    def _take_batch(self) -> tuple[list[KVEvent], int]:
        batch: list[KVEvent] = []
        pages = 0
        with self._lock:
            while self._queue and pages < self._max_batch:
                ev = self._queue.popleft()
                room = self._max_batch - pages
                if len(ev.hashes) > room:  # split: the rest goes back to the front, in order
                    self._queue.appendleft(KVEvent(ev.kind, ev.hashes[room:], ev.replica_id, ev.tier))
                    ev = KVEvent(ev.kind, ev.hashes[:room], ev.replica_id, ev.tier)
                batch.append(ev)
                pages += len(ev.hashes)
            self._queued_pages -= pages
        return batch, pages

    def _mark_idle_if_empty(self) -> None:
        with self._lock:
            if not self._queue:
                self._idle.set()

    def _try(self, fn, *args):
        """fn's result (True when it returns None), or None when Redis failed it."""
        try:
            out = fn(*args)
        except (redis.RedisError, OSError) as e:
            self.metrics.publish_errors += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "page index write failed (%s: %s): dropping events until Redis answers", type(e).__name__, e
                )
            return None
        if self._failing:
            self._failing = False
            logger.info("page index writes succeed again")
        return True if out is None else out
