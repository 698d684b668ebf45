"""Page bytes in and out of an engine's KV cache: the engine side of pulls between replicas.

`PageIO.export` answers a pull: the leading run of asked page hashes this replica holds, on the
device or in its host tier, as a `PagePayload` (kvstore/transport.py) under this replica's model
id and page layout, read while the KV-cache manager holds a reference on every page (so no
eviction can take one mid-read), into a buffer reused once the payload that had it is gone.
`PageIO.insert` takes a checked payload and caches its pages in the device pool, as if computed
here, into pages reserved while they travelled (KVCacheManager.reserve). All run on the engine's event loop,
also while a step computes on the step thread: the KV-cache manager's lock orders their pool
changes with the step's, an export reads only referenced cached pages (full, final: no step
writes them), and an insert writes only pages it has reserved (no step reads them).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
import weakref

import numpy as np
import torch

from kvstore.hashing import PageHash
from kvstore.transport import PageLayout, PagePayload
from workers.kv_cache_manager import KVCacheManager, Reservation
from workers.kv_tiers import HostTier
from workers.runner.kv_pages import KVPages, page_runs


class PageIO:
    def __init__(
        self, kv_cache: KVCacheManager, device: KVPages, host: HostTier | None, model_id: str, replica_id: str
    ):
        self.kv_cache = kv_cache
        self.device = device
        self.host = host
        self.model_id = model_id
        self.replica_id = replica_id
        self.layout: PageLayout = device.layout(kv_cache.page_size)
        self.num_exported_pages = 0
        self.num_inserted_pages = 0
        self._buffers = _Buffers()

    def export(self, hashes: list[PageHash]) -> PagePayload:
        phase = [0.0, 0.0]  # gather, serialize

        def read(device_pages: list[int], host_pages: list[int], on_device: list[bool]) -> bytes:
            t_gather = time.perf_counter()
            lay, t = self.layout, self.device.k[0]
            shape = (lay.num_layers, 2, len(on_device), *t.shape[1:])
            # on the host (pinned when the pages are on CUDA: the device's copy lands there directly)
            data = self._buffers.take(shape, t.dtype, pin=t.device.type == "cuda")
            d = h = 0
            for tier, start, stop in _runs(on_device):  # each tier's pages straight into place
                if tier:
                    self.device.gather(device_pages[d : d + stop - start], out=data[:, :, start:stop])
                    d += stop - start
                else:
                    self.host.host.gather(host_pages[h : h + stop - start], out=data[:, :, start:stop])
                    h += stop - start
            t_serialize = time.perf_counter()
            buf = self._buffers.lend(data)
            phase[0], phase[1] = t_serialize - t_gather, time.perf_counter() - t_serialize
            return buf

        read_at, t0 = time.time(), time.perf_counter()
        n, data = self.kv_cache.export(hashes, read)
        self.num_exported_pages += n
        read_s = time.perf_counter() - t0
        return PagePayload(
            self.replica_id, self.model_id, self.layout, tuple(hashes[:n]), data, read_at, read_s, *phase
        )

    def insert(
        self,
        payload: PagePayload,
        hashes: list[PageHash],
        start: int,
        phases: dict[str, float] | None = None,
        reservation: Reservation | None = None,
    ) -> int:
        """Cache `payload`'s pages (checked: they are `hashes[start:start + n]`) after the run
        `hashes[:start]`, into `reservation`'s pages if given (`reserve`: released here whatever
        happens). Returns how many went in. `phases`: where to add the seconds spent viewing the
        payload as a tensor (deserialize), writing pages (scatter) and the pool's bookkeeping
        around them (insert)."""
        n = payload.num_pages
        if not n:
            if reservation is not None:
                self.kv_cache.release(reservation)
            return 0
        t0 = time.perf_counter()
        lay = self.layout
        shape = (lay.num_layers, 2, n, lay.page_size, lay.num_kv_heads, lay.head_dim)
        data = _from_buffer(payload.data, self.device.k[0].dtype, shape)
        t1 = time.perf_counter()
        scatter_s = 0.0

        def write(pages: list[int], payload_pages: list[int]) -> None:
            nonlocal scatter_s
            ts = time.perf_counter()
            # each run of consecutive payload pages straight from the payload's buffer (one run
            # unless some were cached here already): one copy per page, no picking into a tensor
            for at, first, n in page_runs(payload_pages):
                self.device.scatter(pages[at : at + n], data[:, :, first : first + n])
            scatter_s += time.perf_counter() - ts

        inserted = self.kv_cache.insert(list(hashes[: start + n]), start, write, reservation)
        self.num_inserted_pages += inserted
        if phases is not None:
            t2 = time.perf_counter()
            phases["deserialize"] = phases.get("deserialize", 0.0) + t1 - t0
            phases["scatter"] = phases.get("scatter", 0.0) + scatter_s
            phases["insert"] = phases.get("insert", 0.0) + t2 - t1 - scatter_s
        return inserted


class _Buffers:
    """Host buffers for exports' payloads, reused: a fresh 10 MB buffer per export costs the
    kernel's zeroing and a page fault per 4 KiB on its first write, as much again as the gather
    under load. A buffer lent as a payload's data (`lend`: a flat uint8 numpy view of it) comes
    back (`weakref.finalize`) only once the last reference to that array is gone, i.e. when the
    transport has copied it out (Ray: into its object store) and nobody else holds it; so no
    export ever writes into bytes still being read. At most `keep` wait for reuse."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # finalizers run on whichever thread drops the last reference

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
        """A buffer of `shape` (pinned if `pin`: a device-to-host copy into it is one DMA)."""
        numel = math.prod(shape)
        with self._lock:
            for i, b in enumerate(self._free):
                if b.dtype == dtype and b.numel() >= numel and b.is_pinned() == pin:
                    return self._free.pop(i)[:numel].view(shape)
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def lend(self, data: torch.Tensor) -> np.ndarray:
        """`data` (from `take`) as a payload's buffer; its memory is reused after the last
        reference to the returned array is gone."""
        buf = _to_buffer(data)
        base = data if data._base is None else data._base
        weakref.finalize(buf, self._give, base)
        return buf

    def _give(self, base: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(base.reshape(-1))


def _runs(flags: list[bool]) -> list[tuple[bool, int, int]]:
    """`flags` as maximal runs of equal values: (value, start, stop)."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((flags[start], start, i))
            start = i
    return runs


def _to_buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array sharing its memory: Ray moves a numpy array
    without pickling it (out of band, into the object store), so a payload costs one copy there."""
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


def _from_buffer(data, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only view of a payload's bytes (a Ray object-store buffer, or bytes) as a tensor."""
    with warnings.catch_warnings():  # the buffer is read-only, and only ever read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
    return raw.view(dtype).view(shape)
