"""CUDA graphs of decode steps: capture once at start-up, replay per step.

A step made only of decode rows (plain decodes and verifications, one row per token) replays the
graph captured for the smallest bucket (row count) that holds it; its padding rows write no KV and
attend to nothing. The graphs read their inputs from the runner's `StepBuffers` and write their
logits to an output buffer that the next replay overwrites.

The draft's greedy decode loops (k steps, each feeding its argmax to the next, as one graph) are
captured on first use, per (bucket, steps), in a memory pool of their own.
"""

from __future__ import annotations

import bisect
import logging

import torch

from workers.runner.buffers import StepBuffers

logger = logging.getLogger(__name__)


def graph_buckets(max_graph_rows: int) -> list[int]:
    """The row counts captured: 1, 2, 4, every multiple of 8, and `max_graph_rows` itself, so that
    every decode-only step of up to `max_graph_rows` rows finds a bucket (a verification of one
    sequence with k = 4 has 5 rows: it must not fall off a set that stops at 4)."""
    return sorted({b for b in [1, 2, 4, *range(8, max_graph_rows + 1, 8)] if b <= max_graph_rows} | {max_graph_rows})


class DecodeGraphs:
    def __init__(self, model, buffers: StepBuffers, ops, num_kv_heads: int, max_model_len: int, device: torch.device):
        self.model = model
        self.buffers = buffers
        self.ops = ops
        self.num_kv_heads = num_kv_heads
        self.max_model_len = max_model_len
        self.device = device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # rows -> graph, its logits
        self.sizes: list[int] = []
        # greedy decode loops: (bucket, steps) -> graph, its metadata input [steps, 3, bucket] and
        # its tokens [steps + 1, bucket]
        self._loops: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._loop_pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return self.graphs[rows]

    def bucket(self, rows: int) -> int | None:
        """The smallest captured row count that holds `rows` decode rows, if any."""
        i = bisect.bisect_left(self.sizes, rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay a captured graph on the buffers' current contents; returns its logits buffer."""
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits

    def clear(self) -> None:
        self.graphs.clear()
        self._loops.clear()
        self.sizes = []

    def _splits(self, rows: int) -> int:
        return self.ops.decode_splits(rows, self.num_kv_heads, self.max_model_len)

    @torch.inference_mode()
    def capture(self, buckets: list[int]) -> None:
        b = self.buffers
        b.pad_for_capture()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for rows in reversed(buckets):
                meta = b.decode_meta(rows, self._splits(rows))
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self.model.compute_logits(self.model(b.input_ids[:rows], b.positions[:rows], meta))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self.model.compute_logits(self.model(b.input_ids[:rows], b.positions[:rows], meta))
                self.graphs[rows] = (graph, logits)
        self.sizes = sorted(self.graphs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", buckets)

    def loop(self, bucket: int, steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """The greedy `steps`-step decode loop over `bucket` rows (captured on first use): its graph,
        its metadata input [steps, 3, bucket] (positions, slots, seq_lens) and its tokens
        [steps + 1, bucket] (row 0 the input, row j + 1 step j's argmax)."""
        key = (bucket, steps)
        if key not in self._loops:
            self._loops[key] = self._capture_loop(bucket, steps)
        return self._loops[key]

    def _capture_loop(self, bucket: int, steps: int):
        b = self.buffers
        meta = torch.zeros(steps, 3, bucket, dtype=torch.int64, device=self.device)
        meta[:, 1] = -1  # until a plan fills it: padding rows (the warm-up writes no KV)
        tokens = torch.zeros(steps + 1, bucket, dtype=torch.int64, device=self.device)
        attn = b.decode_meta(bucket, self._splits(bucket))

        def body():
            for j in range(steps):
                b.input_ids[:bucket].copy_(tokens[j])
                b.positions[:bucket].copy_(meta[j, 0])
                b.slot_mapping[:bucket].copy_(meta[j, 1])
                b.seq_lens[:bucket].copy_(meta[j, 2])
                hidden = self.model(b.input_ids[:bucket], b.positions[:bucket], attn)
                tokens[j + 1].copy_(self.model.compute_logits(hidden).argmax(dim=-1))

        if self._loop_pool is None:  # its own pool: the decode graphs' outputs live in theirs
            self._loop_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            body()  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._loop_pool, stream=stream, capture_error_mode="thread_local"):
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.debug("captured a %d-step greedy decode loop for %d rows", steps, bucket)
        return graph, meta, tokens
