"""The draft's device-fed decode: k decode steps whose inputs, but the tokens, are known up front.

A draft model proposes k tokens per sequence: k decode steps in which each step's input is the
token the step before drew. The positions, slots and block tables of all steps are known before
the first one runs (`plan`), so they go to the device once, and each step's tokens stay on the
device as the next step's input: the host waits once per proposal, not once per token. A greedy
batch runs all its steps as one graph replay (`loop`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.layers.attention import AttentionMetadata
from workers.runner.model_runner import ModelRunner
from workers.sampling import upload


@dataclass
class DecodePlan:
    """Decode steps over one row per sequence, their metadata on the device."""

    num_rows: int
    bucket: int | None  # the graph replayed for each step; None: eager
    meta: torch.Tensor  # [steps, 3, rows or bucket] int64 on the device: positions, slots, seq_lens
    tables: torch.Tensor  # [rows, width] int32 on the device
    seq_lens: list[list[int]]  # per step, for an eager step's metadata


class DeviceFedDecoder:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def plan(self, starts: list[int], num_steps: list[int], steps: int, block_tables: list[list[int]]) -> DecodePlan:
        """Upload, once, the metadata of `steps` decode steps over one row per block table: row r
        computes positions starts[r], starts[r] + 1, ... for num_steps[r] steps, then sits out
        (writes no KV, attends to the context it has; its logits mean nothing). The tokens
        before starts[r] must be computed."""
        runner = self.runner
        ps = runner.page_size
        rows = len(starts)
        bucket = runner.graphs.bucket(rows) if runner.tp.size == 1 else None
        width = bucket or rows
        meta = np.zeros((steps, 3, width), dtype=np.int64)
        meta[:, 1, :] = -1  # padding rows: no KV write, empty context
        host_lens = [[0] * rows for _ in range(steps)]
        for r, (start, n, table) in enumerate(zip(starts, num_steps, block_tables, strict=True)):
            for j in range(steps):
                if j < n:
                    p = start + j
                    slot = table[p // ps] * ps + p % ps
                else:
                    p, slot = start + n - 1, -1
                meta[j, :, r] = (p, slot, p + 1)
                host_lens[j][r] = p + 1
        tw = max(1, max(len(t) for t in block_tables))
        tables = np.zeros((rows, tw), dtype=np.int32)
        for r, table in enumerate(block_tables):
            tables[r, : len(table)] = table
        dev = runner.device
        return DecodePlan(rows, bucket, upload(meta, torch.int64, dev), upload(tables, torch.int32, dev), host_lens)

    @torch.inference_mode()
    def step(self, plan: DecodePlan, step: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Step `step` of `plan` on `input_ids` ([rows] int64, on the device); returns the rows'
        logits (a graph's output buffer: read it before the next step). Device-to-device copies
        and a graph replay only: no host sync."""
        runner = self.runner
        b = runner.buffers
        n = plan.num_rows
        meta = plan.meta[step]
        width = meta.shape[1]
        b.input_ids[:n].copy_(input_ids)
        b.positions[:width].copy_(meta[0])
        b.slot_mapping[:width].copy_(meta[1])
        b.seq_lens[:width].copy_(meta[2])
        tw = plan.tables.shape[1]
        if step == 0:  # the plan's steps are consecutive: nothing else uses the runner between them
            b.block_tables[:n, :tw].copy_(plan.tables)
        if plan.bucket is not None:
            return runner.graphs.replay(plan.bucket)[:n]
        b.query_start_loc[: n + 1].copy_(torch.arange(n + 1, dtype=torch.int32), non_blocking=True)
        lens = plan.seq_lens[step]
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:n],
            block_tables=b.block_tables[:n, :tw],
            seq_lens=b.seq_lens[:n],
            query_start_loc=b.query_start_loc[: n + 1],
            num_decodes=n,
            max_query_len=1,
            num_splits=runner.ops.decode_splits(n, runner.num_kv_heads, max(lens)),
            seq_lens_cpu=lens,
            query_start_loc_cpu=list(range(n + 1)),
        )
        model = runner.model
        return model.compute_logits(model(b.input_ids[:n], b.positions[:n], meta))

    @torch.inference_mode()
    def loop(self, plan: DecodePlan, first: torch.Tensor) -> torch.Tensor | None:
        """All of `plan`'s steps as one graph replay, each step's input the argmax of the step
        before (greedy drafting), the first step's `first` ([rows] int64 on the device). Returns
        the tokens the steps drew, [steps, rows] on the device, or None where no graph serves
        (CPU, eager, tensor parallelism): then `step` per step. One launch instead of five per
        step: on a small model each launch costs about as much as its kernel."""
        runner = self.runner
        if plan.bucket is None or runner.device.type != "cuda":
            return None
        graph, meta, tokens = runner.graphs.loop(plan.bucket, plan.meta.shape[0])
        n = plan.num_rows
        meta.copy_(plan.meta)
        tokens[0, :n].copy_(first)
        runner.buffers.block_tables[:n, : plan.tables.shape[1]].copy_(plan.tables)
        graph.replay()
        return tokens[1:, :n]
