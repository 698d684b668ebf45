"""The model runner: turns a `SchedulerOutput` into tensors, runs the forward, samples.

It owns the device state: the weights, the KV cache (one k and one v tensor per layer, shape
[num_pages, page_size, num_kv_heads, head_dim]), persistent step-input buffers, and on CUDA the
captured decode graphs. It reads sequences but never changes them, except for lazily creating a
seeded sequence's generator.

Each step's batch is laid out decodes first (sequences with one new token, then prefill chunks),
as the attention kernels expect. A step made only of decodes replays the CUDA graph captured for
the smallest batch-size bucket that holds it (padding rows write no KV and attend to nothing);
anything else runs eagerly.

In a tensor-parallel group (`TPInfo.size` > 1) every rank holds a runner over its shard of the
weights and KV heads. Rank 0 schedules and samples: each step it broadcasts the step's plan (token
ids, positions, slot mapping, sequence lengths, query starts, page tables, the rows that need
logits) as one packed int64 tensor after an 8-int header; the other ranks (`serve_ranks`) fill
their buffers from it and run the same forward, whose all-reduces and logit gather need them.
Steps run eagerly there (no CUDA graphs yet).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from workers.kernels.ops import get_ops
from workers.layers.attention import AttentionMetadata
from workers.layers.parallel import TPInfo
from workers.models.config import ModelConfig
from workers.models.loader import load_model
from workers.request import StepLogprobs
from workers.sampling import Sampler, SamplingInputs, make_generator
from workers.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[int | None]  # one per scheduled sequence; None where it did not sample
    logprobs: list[StepLogprobs | None]


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    load_format: str
    seed: int
    page_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kernels: str
    num_pages: int | None
    gpu_memory_utilization: float
    cpu_kv_cache_gib: float
    cuda_graphs: bool
    max_graph_batch_size: int


_HEADER = 8  # op, tokens, seqs, table width, decodes, max query len, decode splits, logit rows
_STEP, _STOP = 1, 0


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, model_config: ModelConfig, tp: TPInfo | None = None):
        self.cfg = cfg
        self.model_config = model_config
        self.tp = tp or TPInfo()
        self.device = cfg.device
        self.page_size = cfg.page_size
        self.ops = get_ops(cfg.kernels, cfg.device)
        self.model = load_model(
            cfg.model_dir,
            model_config,
            cfg.dtype,
            cfg.device,
            cfg.max_model_len,
            self.ops,
            cfg.load_format,
            cfg.seed,
            self.tp,
        )
        self.num_kv_heads = self.model.num_local_kv_heads
        self.sampler = Sampler(cfg.device, seed=cfg.seed)
        n, s = cfg.max_num_batched_tokens, cfg.max_num_seqs
        self.max_pages_per_seq = -(-cfg.max_model_len // cfg.page_size)
        dev = dict(device=cfg.device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, **dev)
        self.positions = torch.zeros(n, dtype=torch.int64, **dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, **dev)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, **dev)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, **dev)
        self.block_tables = torch.zeros(s, self.max_pages_per_seq, dtype=torch.int32, **dev)
        self._host_tables = np.zeros((s, self.max_pages_per_seq), dtype=np.int32)
        self.num_pages = cfg.num_pages or self._num_pages_from_memory()
        if self.tp.size > 1:  # every rank's pool has the same pages: the smallest any rank can hold
            import torch.distributed as dist

            n = torch.tensor([self.num_pages], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.tp.group)
            self.num_pages = int(n.item())
        self._allocate_kv_cache(self.num_pages)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_sizes: list[int] = []
        if cfg.cuda_graphs and cfg.device.type == "cuda" and self.ops.name == "triton" and self.tp.size == 1:
            self._capture_decode_graphs()

    # ---------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.cfg.dtype).element_size()
        return 2 * mc.num_layers * self.page_size * self.num_kv_heads * mc.head_dim * elem

    def _allocate_kv_cache(self, num_pages: int) -> None:
        mc = self.model_config
        shape = (num_pages, self.page_size, self.num_kv_heads, mc.head_dim)
        for attn in self.model.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=self.cfg.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.cfg.dtype, device=self.device)

    def _num_pages_from_memory(self) -> int:
        if self.device.type != "cuda":
            return max(1, int(self.cfg.cpu_kv_cache_gib * 2**30) // self.page_bytes)
        # Measure the peak of the largest step (a full token budget of prefill plus logits for
        # max_num_seqs rows) with just enough pages for it, then give the pool what is left
        # of gpu_memory_utilization.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = min(self.cfg.max_num_batched_tokens, self.cfg.max_model_len)
        pages = -(-tokens // self.page_size)
        self._allocate_kv_cache(pages)
        self._profile_step(tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - pages * self.page_bytes
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cfg.gpu_memory_utilization - peak - others
        num_pages = int(budget // self.page_bytes)
        logger.info(
            "KV pool: %d pages (%.2f GiB); step peak %.2f GiB; GPU %.1f GiB x %.2f",
            num_pages,
            num_pages * self.page_bytes / 2**30,
            peak / 2**30,
            total / 2**30,
            self.cfg.gpu_memory_utilization,
        )
        if num_pages < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: the weights and a {tokens}-token step take "
                f"{peak / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return num_pages

    @torch.inference_mode()
    def _profile_step(self, num_tokens: int) -> None:
        pages = -(-num_tokens // self.page_size)
        self.block_tables[0, :pages] = torch.arange(pages, dtype=torch.int32, device=self.device)
        self.seq_lens[0] = num_tokens
        self.query_start_loc[:2] = torch.tensor([0, num_tokens], dtype=torch.int32)
        self.slot_mapping[:num_tokens] = torch.arange(num_tokens, device=self.device)
        self.positions[:num_tokens] = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:1],
            seq_lens=self.seq_lens[:1],
            query_start_loc=self.query_start_loc[:2],
            num_decodes=0,
            max_query_len=num_tokens,
            num_splits=1,
            seq_lens_cpu=[num_tokens],
            query_start_loc_cpu=[0, num_tokens],
        )
        hidden = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)
        rows = min(self.cfg.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.sort(logits, dim=-1)  # the sampler's top-p sort is its largest temporary

    def release(self) -> None:
        """Drop the graphs, the KV cache and the weights (e.g. before another model uses the GPU)."""
        self.graphs.clear()
        self._graph_sizes = []
        self._allocate_kv_cache(0)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- graphs
    def graph_buckets(self) -> list[int]:
        top = min(self.cfg.max_graph_batch_size, self.cfg.max_num_seqs)
        return [b for b in [1, 2, 4, *range(8, top + 1, 8)] if b <= top]

    def _decode_meta(self, batch: int, num_splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            num_decodes=batch,
            max_query_len=1,
            num_splits=num_splits,
        )

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        buckets = self.graph_buckets()
        # padding rows: no KV write, empty context
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        self.positions.zero_()
        self.input_ids.zero_()
        self.query_start_loc.copy_(torch.arange(self.query_start_loc.numel(), dtype=torch.int32))
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for batch in reversed(buckets):
                meta = self._decode_meta(
                    batch, self.ops.decode_splits(batch, self.num_kv_heads, self.cfg.max_model_len)
                )
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self.model.compute_logits(self.model(self.input_ids[:batch], self.positions[:batch], meta))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self.model.compute_logits(self.model(self.input_ids[:batch], self.positions[:batch], meta))
                self.graphs[batch] = (graph, logits)
        self._graph_sizes = sorted(self.graphs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", buckets)

    # ---------------------------------------------------------------- steps
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        scheduled = out.scheduled
        order = [i for i, s in enumerate(scheduled) if s.num_tokens == 1]
        num_decodes = len(order)
        order += [i for i, s in enumerate(scheduled) if s.num_tokens != 1]
        bucket = self._bucket(len(scheduled)) if num_decodes == len(scheduled) else None
        sample_rows, num_tokens, meta = self._prepare(out, order, num_decodes, bucket)
        sampled: list[int | None] = [None] * len(scheduled)
        logprobs: list[StepLogprobs | None] = [None] * len(scheduled)
        if bucket is not None:
            graph, graph_logits = self.graphs[bucket]
            graph.replay()
            if len(sample_rows) == len(scheduled):  # every decode samples: rows 0..batch-1
                logits = graph_logits[: len(scheduled)]
            else:
                logits = graph_logits[torch.tensor(sample_rows, device=self.device)] if sample_rows else None
        else:
            token_rows = self._token_rows(sample_rows, meta)
            if self.tp.size > 1:
                self._broadcast_plan(num_tokens, meta, token_rows)
            hidden = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)
            logits = self.model.compute_logits(hidden[token_rows]) if sample_rows else None
        if logits is None:
            return StepResult(sampled, logprobs)
        # the sequences that sample, in batch order
        positions_sampling = [order[b] for b in sample_rows]
        seqs = [scheduled[i].seq for i in positions_sampling]
        for seq in seqs:
            if seq.sampling.seed is not None and seq.generator is None:
                seq.generator = make_generator(seq.sampling.seed, self.device)
        result = self.sampler(
            logits,
            SamplingInputs(
                params=[seq.sampling for seq in seqs],
                generators=[seq.generator for seq in seqs],
                token_history=[seq.token_ids for seq in seqs],
            ),
        )
        for row, i in enumerate(positions_sampling):
            sampled[i] = result.token_ids[row]
            logprobs[i] = result.logprobs[row]
        return StepResult(sampled, logprobs)

    # ---------------------------------------------------------------- tensor parallelism
    def _broadcast_plan(self, num_tokens: int, meta: AttentionMetadata, token_rows: torch.Tensor) -> None:
        import torch.distributed as dist

        batch, width = meta.block_tables.shape
        header = [_STEP, num_tokens, batch, width, meta.num_decodes, meta.max_query_len, meta.num_splits]
        header.append(token_rows.numel())
        dist.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device), src=0, group=self.tp.group)
        payload = torch.cat(
            [
                self.input_ids[:num_tokens],
                self.positions[:num_tokens],
                self.slot_mapping[:num_tokens],
                meta.seq_lens.to(torch.int64),
                meta.query_start_loc.to(torch.int64),
                meta.block_tables.reshape(-1).to(torch.int64),
                token_rows.to(torch.int64),
            ]
        )
        dist.broadcast(payload, src=0, group=self.tp.group)

    def stop_ranks(self) -> None:
        """Rank 0: release the other ranks from `serve_ranks`."""
        if self.tp.size > 1 and self.tp.rank == 0:
            import torch.distributed as dist

            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            dist.broadcast(header, src=0, group=self.tp.group)

    @torch.inference_mode()
    def serve_ranks(self) -> None:
        """Ranks 1..n-1: run rank 0's steps on this shard until rank 0 stops the group."""
        import torch.distributed as dist

        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        while True:
            dist.broadcast(header, src=0, group=self.tp.group)
            op, n, batch, width, num_decodes, max_query_len, num_splits, rows = header.tolist()
            if op == _STOP:
                return
            sizes = [n, n, n, batch, batch + 1, batch * width, rows]
            payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
            dist.broadcast(payload, src=0, group=self.tp.group)
            ids, pos, slots, seq_lens, qsl, tables, token_rows = payload.split(sizes)
            self.input_ids[:n].copy_(ids)
            self.positions[:n].copy_(pos)
            self.slot_mapping[:n].copy_(slots)
            self.seq_lens[:batch].copy_(seq_lens)
            self.query_start_loc[: batch + 1].copy_(qsl)
            self.block_tables[:batch, :width].copy_(tables.view(batch, width))
            meta = AttentionMetadata(
                slot_mapping=self.slot_mapping[:n],
                block_tables=self.block_tables[:batch, :width],
                seq_lens=self.seq_lens[:batch],
                query_start_loc=self.query_start_loc[: batch + 1],
                num_decodes=num_decodes,
                max_query_len=max_query_len,
                num_splits=num_splits,
                seq_lens_cpu=seq_lens.tolist(),
                query_start_loc_cpu=qsl.tolist(),
            )
            hidden = self.model(self.input_ids[:n], self.positions[:n], meta)
            if rows:
                self.model.compute_logits(hidden[token_rows])

    def _bucket(self, batch: int) -> int | None:
        """The smallest captured batch size that holds `batch` decodes, if any."""
        i = bisect.bisect_left(self._graph_sizes, batch)
        return self._graph_sizes[i] if i < len(self._graph_sizes) else None

    def _token_rows(self, sample_rows: list[int], meta: AttentionMetadata) -> torch.Tensor:
        """Rows of the flat token batch whose logits are needed: each sampling sequence's last."""
        qsl = meta.query_start_loc_cpu
        return torch.tensor([qsl[b + 1] - 1 for b in sample_rows], dtype=torch.int64, device=self.device)

    def _prepare(self, out: SchedulerOutput, order: list[int], num_decodes: int, bucket: int | None):
        """Fill the step buffers in batch order, padded to the graph's `bucket` if one replays;
        returns (batch rows that sample, number of tokens, eager metadata or None)."""
        ps = self.page_size
        scheduled = out.scheduled
        batch = len(order)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        tables = self._host_tables
        width = 0
        for row, i in enumerate(order):
            s = scheduled[i]
            seq = s.seq
            table = seq.page_table
            tables[row, : len(table)] = table
            width = max(width, len(table))
            if s.num_tokens == 1:
                p = s.start
                input_ids.append(seq.token_ids[p])
                positions.append(p)
                slots.append(table[p // ps] * ps + p % ps)
            else:
                pos = np.arange(s.start, s.end)
                input_ids += seq.token_ids[s.start : s.end]
                positions += pos.tolist()
                slots += (np.asarray(table)[pos // ps] * ps + pos % ps).tolist()
            query_start_loc.append(query_start_loc[-1] + s.num_tokens)
            seq_lens.append(s.end)
            if s.sample:
                sample_rows.append(row)
        n = len(input_ids)
        pad = (bucket or batch) - batch  # padding rows of a graph replay: no KV write, empty context
        self.input_ids[: n + pad].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[: n + pad].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[: n + pad].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[: batch + pad].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.query_start_loc[: batch + 1].copy_(torch.tensor(query_start_loc, dtype=torch.int32), non_blocking=True)
        self.block_tables[:batch, :width].copy_(torch.from_numpy(tables[:batch, :width]), non_blocking=True)
        if bucket is not None:
            return sample_rows, n, None
        num_splits = self.ops.decode_splits(num_decodes, self.num_kv_heads, max(seq_lens))
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:batch, : max(width, 1)],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            num_decodes=num_decodes,
            max_query_len=max(s.num_tokens for s in scheduled),
            num_splits=num_splits,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        return sample_rows, n, meta
