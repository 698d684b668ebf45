"""`StepBuffers`: the persistent device tensors a step's inputs are copied into.

Allocated once per runner at the largest step's size; a step fills a prefix of each. CUDA graphs
capture these tensors' addresses, so they are never reallocated: every step, eager or replayed,
and every rank of a tensor-parallel group reads its inputs from here.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.layers.attention import AttentionMetadata


class StepBuffers:
    def __init__(self, max_num_tokens: int, max_num_rows: int, max_pages_per_seq: int, device: torch.device):
        n, s = max_num_tokens, max_num_rows
        dev = dict(device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, **dev)
        self.positions = torch.zeros(n, dtype=torch.int64, **dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, **dev)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, **dev)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, **dev)
        self.block_tables = torch.zeros(s, max_pages_per_seq, dtype=torch.int32, **dev)
        self.host_block_tables = np.zeros((s, max_pages_per_seq), dtype=np.int32)  # staging for uploads

    def decode_meta(self, batch: int, num_splits: int) -> AttentionMetadata:
        """Metadata of a pure-decode step of `batch` rows (one token each) over these buffers, as a
        CUDA graph captures it (no host-side lists: a replay cannot read them)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            num_decodes=batch,
            max_query_len=1,
            num_splits=num_splits,
        )

    def pad_for_capture(self) -> None:
        """Fill every row as a padding row: no KV write, empty context, one query token each."""
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        self.positions.zero_()
        self.input_ids.zero_()
        self.query_start_loc.copy_(torch.arange(self.query_start_loc.numel(), dtype=torch.int32))
