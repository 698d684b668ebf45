"""Megatron-style tensor parallelism: which shard of each weight a rank owns, and the layers that
compute on shards (Shoeybi et al. 2019; as in gpt-fast's tp.py and vLLM's parallel layers).

- Column-parallel (QKV, gate/up): each rank holds a slice of the output rows: its query heads, its
  KV heads (split when tp <= num_kv_heads; replicated, one per rank, when tp > num_kv_heads), its
  slice of the MLP's intermediate size. No communication.
- Row-parallel (o_proj, down_proj): each rank holds the matching slice of the input columns and
  produces a partial sum; one all-reduce makes it whole (the bias is added once, after it).
- Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary
  (padded to a multiple of tp). Embedding rows outside a rank's slice are zero and one all-reduce
  sums them; LM-head logits are gathered to rank 0, which samples.

Weights are cut while loading (`ShardedReader`): a rank reads only its slice of each checkpoint
tensor (safetensors slices), so no rank ever holds the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TPInfo:
    """This rank's place in its tensor-parallel group (size 1: no parallelism, no communication)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dimension on rank 0 (None elsewhere)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


@dataclass(frozen=True)
class HeadShard:
    """The attention heads of one rank: query heads [q_start, q_start + num_heads) and KV heads
    [kv_start, kv_start + num_kv_heads) of the checkpoint."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def shard_heads(num_heads: int, num_kv_heads: int, tp: TPInfo) -> HeadShard:
    if num_heads % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} does not divide the {num_heads} attention heads")
    local = num_heads // tp.size
    if tp.size <= num_kv_heads:
        if num_kv_heads % tp.size:
            raise ValueError(f"tensor_parallel_size {tp.size} does not divide the {num_kv_heads} KV heads")
        local_kv = num_kv_heads // tp.size
        return HeadShard(local, local_kv, tp.rank * local, tp.rank * local_kv)
    if tp.size % num_kv_heads:
        raise ValueError(
            f"with more ranks ({tp.size}) than KV heads ({num_kv_heads}), the KV heads must divide the ranks"
        )
    # Each KV head is replicated on tp / num_kv_heads ranks: the one its query heads attend with.
    return HeadShard(local, 1, tp.rank * local, tp.rank * num_kv_heads // tp.size)


def split(total: int, tp: TPInfo) -> tuple[int, int]:
    """(start, size) of this rank's even share of `total` rows."""
    if total % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} does not divide {total}")
    size = total // tp.size
    return tp.rank * size, size


def read_rows(tensor, start: int, size: int) -> torch.Tensor:
    """Rows [start, start + size) of a checkpoint tensor or a safetensors slice (read lazily)."""
    if isinstance(tensor, torch.Tensor):
        return tensor if (start, size) == (0, tensor.shape[0]) else tensor.narrow(0, start, size)
    return tensor[start : start + size]


def read_cols(tensor, start: int, size: int) -> torch.Tensor:
    if isinstance(tensor, torch.Tensor):
        return tensor if (start, size) == (0, tensor.shape[-1]) else tensor.narrow(-1, start, size)
    return tensor[:, start : start + size]


def full(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def shape_of(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b: x arrives split along features (a column-parallel
    layer's output); the bias lives on every rank and is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.in_start, self.in_size = split(in_features, tp)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load(self, name: str, tensor) -> None:
        if name == "weight":
            self.weight.data.copy_(read_cols(tensor, self.in_start, self.in_size))
        else:
            self.bias.data.copy_(full(tensor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class _VocabShard(nn.Module):
    """Rows [start, start + shard) of the vocabulary (padded to a multiple of tp) on each rank."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))

    def load(self, name: str, tensor) -> None:
        rows = max(0, min(self.shard, self.vocab_size - self.start))
        self.weight.data.zero_()
        if rows:
            self.weight.data[:rows].copy_(read_rows(tensor, self.start, rows))


class VocabParallelEmbedding(_VocabShard):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(x)


class ParallelLMHead(_VocabShard):
    """Logits of this rank's vocabulary slice (the model gathers them to rank 0)."""
