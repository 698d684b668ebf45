"""Pages between replicas: what travels (`PagePayload`), how it is checked, and the transport seam.

A replica that lacks leading pages of a prompt another replica holds asks the holder for them
through a `PageTransport` (the Ray implementation lives with the Serve deployments,
workers/transfer.py; a GPU-direct one can slot in). The holder answers with the leading run of
the asked pages it still holds, each with its chained hash, under its model id and its page
layout; the receiver checks all three (`check_payload`) before it inserts a single page, so a page
of another model, another layout, or another prefix never enters its cache.

Plain data only: the page bytes travel as one buffer (layers x k/v x pages x page_size x heads x
head_dim, in the layout's dtype), never a pickle of a tensor.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.hashing import PageHash


@dataclass(frozen=True)
class PageLayout:
    """How one page's KV is laid out; two replicas can exchange pages only if theirs are equal."""

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"

    @property
    def element_size(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}[self.dtype]

    @property
    def page_bytes(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.element_size


@dataclass(frozen=True)
class PagePayload:
    """The leading run of asked pages a holder sent: `hashes[i]` is page i's chained hash; `data`
    holds the pages' KV, `len(hashes) * layout.page_bytes` bytes: any bytes-like buffer (`bytes`,
    or a flat uint8 numpy array, which Ray moves out of band, without pickling or extra copies)."""

    replica_id: str
    model_id: str
    layout: PageLayout
    hashes: tuple[PageHash, ...]
    data: object  # a bytes-like buffer
    # When the holder began reading the pages (its `time.time()`) and for how long it read them:
    # the receiver splits a pull's time with them (figures only, never checked).
    read_at: float = 0.0
    read_s: float = 0.0
    # ... and of `read_s`, the gather of the pages into one buffer and its making into `data`
    # (the rest is the lookup and pinning of the pages): the pull's phases (figures only).
    gather_s: float = 0.0
    serialize_s: float = 0.0

    @property
    def num_pages(self) -> int:
        return len(self.hashes)


class PullFailure(enum.StrEnum):
    """Why pages a holder was asked for were recomputed instead (the pull-fallback metric's reason)."""

    NOT_WORTH = "not_worth"  # the cost model predicted recomputing them faster than moving them
    TIMEOUT = "timeout"  # the holder did not answer within the deadline
    ERROR = "error"  # the call failed (holder dead, transport error)
    MISMATCH = "mismatch"  # the payload's model, layout, hashes or size did not match what was asked
    EVICTED = "evicted"  # the holder no longer held (all of) them
    INDEX_DOWN = "index_down"  # the page index did not answer: nobody known to hold them


class TransportError(RuntimeError):
    """A transfer failed; `reason` says how (one of `PullFailure`)."""

    def __init__(self, reason: PullFailure, message: str):
        super().__init__(message)
        self.reason = reason


class PageTransport(Protocol):
    async def fetch(self, replica_id: str, hashes: Sequence[PageHash], timeout_s: float) -> PagePayload:
        """The leading run of `hashes` that replica `replica_id` holds (possibly empty), within
        `timeout_s`; raises `TransportError` (or `TimeoutError`) when it cannot get an answer."""
        ...


def payload_bytes(payload: PagePayload) -> int:
    """Bytes of `payload.data` (-1 if it is not a buffer)."""
    try:
        return memoryview(payload.data).nbytes
    except TypeError:
        return -1


def check_payload(
    payload: PagePayload, model_id: str, layout: PageLayout, asked: Sequence[PageHash]
) -> PullFailure | None:
    """None if `payload` is a valid answer to asking for `asked` (pages of `model_id` in `layout`),
    else why not. A shorter run than asked is valid (the holder evicted the rest)."""
    n = payload.num_pages
    if payload.model_id != model_id or payload.layout != layout:
        return PullFailure.MISMATCH
    if n > len(asked) or tuple(asked[:n]) != payload.hashes:
        return PullFailure.MISMATCH
    if payload_bytes(payload) != n * layout.page_bytes:
        return PullFailure.MISMATCH
    return None
