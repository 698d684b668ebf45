"""KV pages as tensors: read and write whole pages of a set of per-layer k/v caches.

`KVPages` wraps the k and v tensors of every attention layer (shape [num_pages, page_size,
num_kv_heads, head_dim] each): the model's device cache (`KVPages.of_model`), or a host-memory
copy of the same layout (`KVPages.host`, pinned on CUDA so copies to and from it can run
asynchronously). Pages move between two of them by index (`copy_pages`), or leave as one
contiguous tensor [num_layers, 2, n, page_size, num_kv_heads, head_dim] (`gather`) and come back
from one (`scatter`): the layout a page travels in between replicas (kvstore/transport.py).

When the per-layer tensors are views of one tensor [num_layers, 2, num_pages, ...] (`stacked`:
the model's cache as workers/runner/memory.py allocates it, and every host pool), a set of pages
of every layer moves in one index_select / index_copy_ along dim 2, not 2 x num_layers of them:
the cost of a pull's gather and scatter and of a host-tier copy is then one op, whatever the depth.

An export's `gather` may run while a step computes on another thread. On CUDA it reads on its own
stream, so it does not queue behind the step's kernels; that stream first waits for the last
write into these pages that may still be in flight (a restore or an insert: `mark_written`);
pages a step computed are complete once the step returned (its sampled tokens synchronize).

Writes from outside a step (a host-tier restore, a pull's insert) run on CUDA on one write stream,
in order, each recording `_written` after it: a restore gathers the host pages into a pinned
staging buffer on the CPU (so the host pages are free again when it returns) and copies that to
the device asynchronously, overlapping whatever the GPU is doing; the next step waits for it on
the GPU (`wait_written`, a stream wait: the host never blocks), as does any later read of the pages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.transport import PageLayout


class KVPages:
    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], stacked: torch.Tensor | None = None):
        """`stacked`: the tensor [num_layers, 2, num_pages, ...] of which k[i] and v[i] are the
        views [i, 0] and [i, 1] (checked), if there is one."""
        if not k or len(k) != len(v):
            raise ValueError("KVPages needs one k and one v tensor per layer")
        self.k = k
        self.v = v
        self.device = k[0].device
        if stacked is not None and not _views_of(stacked, k, v):
            stacked = None
        self.stacked = stacked
        self._read_stream = None  # CUDA: the stream exports read on
        self._write_stream = None  # CUDA: the stream restores and inserts write on
        self._store_stream = None  # CUDA: the stream host-tier stores copy to the host on
        self._written = None  # CUDA: an event after the last restore or insert into these pages
        self._staging = None  # CUDA: pinned host buffer of a restore's pages (flat)
        self._staged = None  # CUDA: an event after the last copy out of `_staging`

    @classmethod
    def of(cls, stacked: torch.Tensor) -> KVPages:
        """Pages of a tensor [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]."""
        return cls([t[0] for t in stacked], [t[1] for t in stacked], stacked)

    @classmethod
    def of_model(cls, model) -> KVPages:
        layers = list(model.attention_layers())
        return cls([a.k_cache for a in layers], [a.v_cache for a in layers], getattr(model, "kv_cache", None))

    @classmethod
    def host(cls, like: KVPages, num_pages: int) -> KVPages:
        """A host-memory pool of `num_pages` pages in the layout of `like` (pinned when `like` is on CUDA)."""
        pin = like.device.type == "cuda"
        shape = (len(like.k), 2, num_pages, *like.k[0].shape[1:])
        return cls.of(torch.empty(shape, dtype=like.k[0].dtype, pin_memory=pin))

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    def layout(self, page_size: int) -> PageLayout:
        t = self.k[0]
        return PageLayout(len(self.k), page_size, t.shape[2], t.shape[3], str(t.dtype).removeprefix("torch."))

    def page_bytes(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * t[0].numel() * t.element_size()

    def _index(self, pages: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(pages), dtype=torch.long, device=self.device)

    def gather(self, pages: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Pages `pages` as one CPU tensor [num_layers, 2, n, page_size, num_kv_heads, head_dim],
        written into `out` when given (a CPU tensor of that shape whose [layer, k/v] slices are
        contiguous, e.g. a slice along the pages of a larger one): one copy on CPU; from CUDA a
        gather on the device, then one device-to-host copy (a DMA when `out` is pinned)."""
        if self.device.type != "cuda":
            return self._gather(pages, out)
        if self._read_stream is None:
            self._read_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._read_stream):
            if self._written is not None:
                self._read_stream.wait_event(self._written)
            data = self._gather(pages)
            if out is None:
                return data.cpu()  # waits for this stream only
            if not out.is_pinned():
                return out.copy_(data)  # likewise (into pageable host memory: synchronous)
            out.copy_(data, non_blocking=True)  # into pinned memory: one DMA, straight into place ...
            self._read_stream.synchronize()  # ... complete when this returns
            return out

    def _gather(self, pages: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        idx = self._index(pages)
        if self.stacked is not None:
            if out is None:
                return self.stacked.index_select(2, idx)
            if out.is_contiguous():
                return torch.index_select(self.stacked, 2, idx, out=out)
            # a slice of a larger buffer (a run of a mixed-tier export): per layer, still one copy
        t = self.k[0]
        if out is None:
            out = torch.empty((len(self.k), 2, len(idx), *t.shape[1:]), dtype=t.dtype, device=self.device)
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):  # one copy, into place
            torch.index_select(k, 0, idx, out=out[i, 0])
            torch.index_select(v, 0, idx, out=out[i, 1])
        return out

    def gather_to_host(self, pages: Sequence[int], out: torch.Tensor) -> torch.cuda.Event:
        """CUDA, stacked: copy pages `pages` into pinned `out` [num_layers, 2, n, ...] without
        blocking the host. The pages are gathered into a device buffer on this thread's stream
        (after the restores and inserts queued so far), so whatever is queued after this call,
        on this stream or on the write stream (which waits for it), reuses them only once read;
        the device-to-host copy runs on a side stream, overlapping the next steps. `out` holds the
        pages once the returned event has completed."""
        self.wait_written()
        data = self._gather(pages)
        if self._store_stream is None:
            self._store_stream = torch.cuda.Stream(self.device)
        self._store_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._store_stream):
            out.copy_(data, non_blocking=True)
            data.record_stream(self._store_stream)  # the caching allocator keeps it until the copy is done
            done = torch.cuda.Event()
            done.record()
        return done

    def mark_written(self) -> None:
        """Pages were just written on this thread's stream (CUDA: later gathers wait for it)."""
        if self.device.type == "cuda":
            if self._written is None:
                self._written = torch.cuda.Event()
            self._written.record()

    def wait_written(self) -> None:
        """CUDA: make this thread's stream wait (on the GPU) for the restores and inserts queued
        so far; a step calls it before it runs. Nothing on CPU, where writes are synchronous."""
        if self._written is not None:
            torch.cuda.current_stream(self.device).wait_event(self._written)

    def _writing(self):
        """CUDA: the write stream as the current stream, after what this thread queued so far
        (a page freed by a step and written now must not be written under that step's feet)."""
        if self._write_stream is None:
            self._write_stream = torch.cuda.Stream(self.device)
        self._write_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._write_stream)

    def scatter(self, pages: Sequence[int], data: torch.Tensor) -> None:
        """Write `data` (as `gather` returns it) into pages `pages`."""
        if self.device.type == "cuda":
            with self._writing():
                self._scatter(pages, data)
                self.mark_written()  # (from pageable memory the copy has read `data` when it returns)
            return
        self._scatter(pages, data)

    def _scatter(self, pages: Sequence[int], data: torch.Tensor) -> None:
        idx = self._index(pages)
        data = data.to(self.device)
        if self.stacked is not None:
            self.stacked.index_copy_(2, idx, data)
        else:
            for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
                k.index_copy_(0, idx, data[i, 0])
                v.index_copy_(0, idx, data[i, 1])

    def reserve_staging(self, n: int) -> None:
        """CUDA, stacked: make the pinned buffer `load` stages restores in hold `n` pages (a
        pinned allocation takes long enough that a restore timed with it looks several times
        slower than restores are: the host tier calls this outside its measurement)."""
        page_elems = self.stacked[:, :, 0].numel()
        if self._staging is None or self._staging.numel() < n * page_elems:
            if self._staged is not None:
                self._staged.synchronize()  # the old buffer may still be read
            self._staging = torch.empty(max(n, 64) * page_elems, dtype=self.stacked.dtype, pin_memory=True)

    def load(self, host: KVPages, slots: Sequence[int], pages: Sequence[int]) -> None:
        """CUDA, both stacked: copy `host` pages `slots` (pinned host memory) into pages `pages`
        asynchronously (see the module docstring); `host`'s pages are read when this returns."""
        n = len(slots)
        page_elems = self.stacked[:, :, 0].numel()
        if self._staging is None or self._staging.numel() < n * page_elems:
            self.reserve_staging(n)
        elif self._staged is not None:
            self._staged.synchronize()  # the last restore's copy out of it is done (a step ago, mostly)
        staged = self._staging[: n * page_elems].view(self.stacked.shape[0], 2, n, *self.stacked.shape[3:])
        torch.index_select(host.stacked, 2, torch.tensor(list(slots), dtype=torch.long), out=staged)
        with self._writing():
            idx = torch.tensor(list(pages), dtype=torch.long).to(self.device, non_blocking=True)
            self.stacked.index_copy_(2, idx, staged.to(self.device, non_blocking=True))
            self.mark_written()
            if self._staged is None:
                self._staged = torch.cuda.Event()
            self._staged.record()


def copy_pages(src: KVPages, src_pages: Sequence[int], dst: KVPages, dst_pages: Sequence[int]) -> None:
    """Copy pages `src_pages` of `src` into pages `dst_pages` of `dst`, layer by layer.

    A copy to the host is synchronous: complete when this returns, before the step that reuses
    the device pages overwrites them. A copy from pinned host memory to CUDA (a restore) is not:
    `KVPages.load`, which the next step waits for on the GPU."""
    if not src_pages:
        return
    both = src.stacked is not None and dst.stacked is not None
    if both and dst.device.type == "cuda" and src.device.type == "cpu" and src.stacked.is_pinned():
        dst.load(src, src_pages, dst_pages)  # a restore: asynchronous
        return
    src.wait_written()  # pages restored or inserted a moment ago, evicted now
    di = torch.tensor(list(dst_pages), dtype=torch.long, device=dst.device)
    runs = page_runs(src_pages)
    if both and src.device.type == dst.device.type == "cpu" and len(runs) <= max(4, len(src_pages) // 8):
        # few runs of consecutive pages (a sequence's pages, evicted together): each run is read in
        # place, one pass over the bytes instead of a gather and a scatter (a host-tier store on CPU)
        for start, first, n in runs:
            dst.stacked.index_copy_(2, di[start : start + n], src.stacked[:, :, first : first + n])
        return
    si = torch.tensor(list(src_pages), dtype=torch.long, device=src.device)
    if both and src.device.type == dst.device.type == "cpu":
        _copy_scattered_cpu(src.stacked, si, dst.stacked, di)
        return
    if both:  # every layer in one op each way
        dst.stacked.index_copy_(2, di, src.stacked.index_select(2, si).to(dst.device))
        dst.mark_written()
        return
    for s, d in ((src.k, dst.k), (src.v, dst.v)):
        for a, b in zip(s, d, strict=True):
            b.index_copy_(0, di, a.index_select(0, si).to(dst.device))
    dst.mark_written()


# Pages per part of a scattered CPU copy: a layer's k and v of that many pages (1 MiB at the
# bench's 8 KiB per layer and page) stay in cache between the gather and the scatter.
_CPU_COPY_PART_BYTES = 1 << 20


def _copy_scattered_cpu(src: torch.Tensor, si: torch.Tensor, dst: torch.Tensor, di: torch.Tensor) -> None:
    """dst[:, :, di] = src[:, :, si] for stacked CPU pools, in parts of a layer and at most
    `_CPU_COPY_PART_BYTES`: each part is gathered into a small buffer, reused and still in cache
    when it is scattered, so the bytes cross memory once each way, instead of also through a
    temporary of the whole copy (a pass more, and a fresh allocation as large)."""
    page = src[0, 0, 0].numel() * src.element_size() * 2  # a layer's k and v of one page
    step = max(1, _CPU_COPY_PART_BYTES // page)
    n, rest = len(si), src.shape[3:]
    buf = torch.empty(2 * min(step, n) * src[0, 0, 0].numel(), dtype=src.dtype)
    for lo in range(0, n, step):
        s, d = si[lo : lo + step], di[lo : lo + step]
        part = buf[: 2 * len(s) * src[0, 0, 0].numel()].view(2, len(s), *rest)
        for layer in range(src.shape[0]):
            torch.index_select(src[layer], 1, s, out=part)
            dst[layer].index_copy_(1, d, part)


def page_runs(pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """`pages` as maximal runs of consecutive page numbers: (index in `pages`, first page, length)."""
    runs, start = [], 0
    for i in range(1, len(pages) + 1):
        if i == len(pages) or pages[i] != pages[i - 1] + 1:
            runs.append((start, pages[start], i - start))
            start = i
    return runs


def _views_of(stacked: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> bool:
    """Whether k[i], v[i] are the views stacked[i, 0], stacked[i, 1]."""
    if stacked.dim() != k[0].dim() + 2 or stacked.shape[:2] != (len(k), 2):
        return False
    return all(
        a.data_ptr() == s.data_ptr() and a.shape == s.shape and a.stride() == s.stride()
        for i, pair in enumerate(zip(k, v, strict=True))
        for j, a in enumerate(pair)
        for s in (stacked[i, j],)
    )
