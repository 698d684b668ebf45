"""The per-step attention metadata that the model runner builds and every layer reads.

The batch is ordered decodes first: sequences [0, num_decodes) have exactly one new token each,
at rows 0..num_decodes-1; the rest are prefill chunks. Device tensors serve the Triton kernels
(and stay at fixed addresses inside a captured CUDA graph); the host lists serve the pure-torch
reference, which loops over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = padding, write nothing
    block_tables: torch.Tensor  # [num_seqs, max_pages] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after the step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    num_decodes: int
    max_query_len: int
    num_splits: int  # context splits of the decode kernel
    seq_lens_cpu: list[int] | None = None
    query_start_loc_cpu: list[int] | None = None

    def host_lists(self) -> tuple[list[int], list[int]]:
        if self.seq_lens_cpu is None:
            self.seq_lens_cpu = self.seq_lens.tolist()
            self.query_start_loc_cpu = self.query_start_loc.tolist()
        return self.query_start_loc_cpu, self.seq_lens_cpu
