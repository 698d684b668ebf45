"""The tensor-parallel step protocol: rank 0 tells ranks 1..n-1 what to compute each step.

Rank 0 schedules and samples; the other ranks hold shards of the weights and KV heads and must run
the same forward (its all-reduces and logit gather need them). Each step rank 0 broadcasts a
`StepPlan`: first its sizes (one int64 tensor of the plan's named fields), then its inputs (one
int64 tensor: token ids, positions, slot mapping, sequence lengths, query starts, block tables and
the rows that need logits). A plan with `op` STOP releases the ranks. Steps run eagerly there
(no CUDA graphs yet).
"""

from __future__ import annotations

import enum
from dataclasses import astuple, dataclass, fields

import torch

from workers.layers.attention import AttentionMetadata
from workers.runner.buffers import StepBuffers


class StepOp(enum.IntEnum):
    STOP = 0
    STEP = 1


@dataclass(frozen=True)
class StepPlan:
    """The sizes of one step, as rank 0 broadcasts them ahead of its inputs."""

    op: StepOp
    num_tokens: int = 0
    num_seqs: int = 0  # attention rows: one per decode token, one per prefill chunk
    table_width: int = 0  # pages per row of the block tables sent
    num_decodes: int = 0
    max_query_len: int = 0
    num_splits: int = 0  # the decode kernel's split-K
    num_logit_rows: int = 0  # tokens whose logits are computed

    SIZE = 8  # fields, i.e. elements of the packed tensor

    def pack(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.int64, device=device)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> StepPlan:
        op, *sizes = packed.tolist()
        return cls(StepOp(op), *sizes)

    @property
    def input_sizes(self) -> list[int]:
        """Elements of each input in the second broadcast, in order."""
        n, s = self.num_tokens, self.num_seqs
        return [n, n, n, s, s + 1, s * self.table_width, self.num_logit_rows]


assert len(fields(StepPlan)) == StepPlan.SIZE


def broadcast_step(buffers: StepBuffers, num_tokens: int, meta: AttentionMetadata, logit_rows: torch.Tensor, group):
    """Rank 0: send a step's plan and inputs (already in `buffers`) to the other ranks."""
    import torch.distributed as dist

    num_seqs, width = meta.block_tables.shape
    plan = StepPlan(
        StepOp.STEP,
        num_tokens,
        num_seqs,
        width,
        meta.num_decodes,
        meta.max_query_len,
        meta.num_splits,
        logit_rows.numel(),
    )
    device = buffers.input_ids.device
    dist.broadcast(plan.pack(device), src=0, group=group)
    inputs = torch.cat(
        [
            buffers.input_ids[:num_tokens],
            buffers.positions[:num_tokens],
            buffers.slot_mapping[:num_tokens],
            meta.seq_lens.to(torch.int64),
            meta.query_start_loc.to(torch.int64),
            meta.block_tables.reshape(-1).to(torch.int64),
            logit_rows.to(torch.int64),
        ]
    )
    dist.broadcast(inputs, src=0, group=group)


def stop_ranks(device: torch.device, group) -> None:
    """Rank 0: release the other ranks from `serve_ranks`."""
    import torch.distributed as dist

    dist.broadcast(StepPlan(StepOp.STOP).pack(device), src=0, group=group)


@torch.inference_mode()
def serve_ranks(model, buffers: StepBuffers, group) -> None:
    """Ranks 1..n-1: run rank 0's steps on this shard until rank 0 stops the group."""
    import torch.distributed as dist

    b = buffers
    device = b.input_ids.device
    packed = torch.empty(StepPlan.SIZE, dtype=torch.int64, device=device)
    while True:
        dist.broadcast(packed, src=0, group=group)
        plan = StepPlan.unpack(packed)
        if plan.op is StepOp.STOP:
            return
        sizes = plan.input_sizes
        inputs = torch.empty(sum(sizes), dtype=torch.int64, device=device)
        dist.broadcast(inputs, src=0, group=group)
        ids, pos, slots, seq_lens, qsl, tables, logit_rows = inputs.split(sizes)
        n, s, w = plan.num_tokens, plan.num_seqs, plan.table_width
        b.input_ids[:n].copy_(ids)
        b.positions[:n].copy_(pos)
        b.slot_mapping[:n].copy_(slots)
        b.seq_lens[:s].copy_(seq_lens)
        b.query_start_loc[: s + 1].copy_(qsl)
        b.block_tables[:s, :w].copy_(tables.view(s, w))
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:n],
            block_tables=b.block_tables[:s, :w],
            seq_lens=b.seq_lens[:s],
            query_start_loc=b.query_start_loc[: s + 1],
            num_decodes=plan.num_decodes,
            max_query_len=plan.max_query_len,
            num_splits=plan.num_splits,
            seq_lens_cpu=seq_lens.tolist(),
            query_start_loc_cpu=qsl.tolist(),
        )
        hidden = model(b.input_ids[:n], b.positions[:n], meta)
        if plan.num_logit_rows:
            model.compute_logits(hidden[logit_rows])
