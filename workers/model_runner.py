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
from workers.sampling import Sampler, SamplingInputs, make_generator, upload
from workers.scheduler import SchedulerOutput
from workers.spec_decode import verify

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[int | list[int] | None]  # per scheduled entry: a token, a verification's tokens, or None
    logprobs: list[StepLogprobs | None]


@dataclass
class DecodePlan:
    """Decode steps whose every input but the tokens is known before the first one runs (see
    `ModelRunner.plan_decodes`), one row per sequence. The draft's steps feed
    each step's drawn tokens (on the device) into the next, so nothing waits on the host."""

    num_rows: int
    bucket: int | None  # the graph replayed for each step; None: eager
    meta: torch.Tensor  # [steps, 3, rows or bucket] int64 on the device: positions, slots, seq_lens
    tables: torch.Tensor  # [rows, width] int32 on the device
    seq_lens: list[list[int]]  # per step, for an eager step's metadata


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
    num_speculative_tokens: int = 0  # most proposed tokens a sequence verifies in one step

    @property
    def max_num_rows(self) -> int:
        """Attention rows of a step: a verification takes one per token (k + 1 per sequence)."""
        rows = self.max_num_seqs * (1 + self.num_speculative_tokens)
        return max(self.max_num_seqs, min(rows, self.max_num_batched_tokens))


_HEADER = 8  # op, tokens, seqs, table width, decodes, max query len, decode splits, logit rows
_STEP, _STOP = 1, 0


def kv_page_bytes(model_config: ModelConfig, page_size: int, num_kv_heads: int, dtype: torch.dtype) -> int:
    """Bytes of one KV page (keys and values of every layer) for `num_kv_heads` heads."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_layers * page_size * num_kv_heads * model_config.head_dim * elem


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
        n, s = cfg.max_num_batched_tokens, cfg.max_num_rows
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
        # greedy decode loops (`decode_loop`), captured on first use: (bucket, steps) -> graph,
        # its metadata input [steps, 3, bucket] and its tokens [steps + 1, bucket]
        self._loops: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._loop_pool = None
        if cfg.cuda_graphs and cfg.device.type == "cuda" and self.ops.name == "triton" and self.tp.size == 1:
            self._capture_decode_graphs()

    # ---------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        return kv_page_bytes(self.model_config, self.page_size, self.num_kv_heads, self.cfg.dtype)

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
        self._loops.clear()
        self._graph_sizes = []
        self._allocate_kv_cache(0)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- graphs
    def graph_buckets(self) -> list[int]:
        top = min(self.cfg.max_graph_batch_size, self.cfg.max_num_rows)
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
        """Run a step and choose its tokens: sample the plain entries, verify the speculative ones
        (workers/spec_decode.py), in one pass over the logits."""
        scheduled = out.scheduled
        logits, entry_rows = self.forward(out)
        sampled: list[int | list[int] | None] = [None] * len(scheduled)
        logprobs: list[StepLogprobs | None] = [None] * len(scheduled)
        if logits is None:
            return StepResult(sampled, logprobs)
        for i, rows in enumerate(entry_rows):
            seq = scheduled[i].seq
            if rows and seq.sampling.seed is not None and seq.generator is None:
                seq.generator = make_generator(seq.sampling.seed, self.device)
        plain = [i for i, rows in enumerate(entry_rows) if rows and not scheduled[i].draft_token_ids]
        spec = [i for i, rows in enumerate(entry_rows) if rows and scheduled[i].draft_token_ids]
        if plain:
            plain_rows = [entry_rows[i][0] for i in plain]
            in_order = plain_rows == list(range(logits.shape[0]))
            plain_logits = logits if in_order else logits[upload(plain_rows, torch.int64, self.device)]
            seqs = [scheduled[i].seq for i in plain]
            result = self.sampler(
                plain_logits,
                SamplingInputs(
                    params=[seq.sampling for seq in seqs],
                    generators=[seq.generator for seq in seqs],
                    token_history=[seq.token_ids for seq in seqs],
                ),
            )
            for row, i in enumerate(plain):
                sampled[i] = result.token_ids[row]
                logprobs[i] = result.logprobs[row]
        if spec:
            verified = verify(self.sampler, logits, [scheduled[i] for i in spec], [entry_rows[i] for i in spec])
            for i, tokens in zip(spec, verified, strict=True):
                sampled[i] = tokens
        return StepResult(sampled, logprobs)

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[list[int]]]:
        """Run the model over a step; returns the logits of the tokens that need them and, per
        scheduled entry, its rows of those logits: the last token's if it samples, every token's
        for a verification (k proposed tokens + 1)."""
        scheduled = out.scheduled
        order = [i for i, s in enumerate(scheduled) if s.is_decode]
        num_decode_entries = len(order)
        order += [i for i, s in enumerate(scheduled) if not s.is_decode]
        num_decode_rows = sum(scheduled[i].num_tokens for i in order[:num_decode_entries])
        only_decodes = num_decode_entries == len(scheduled)
        bucket = self._bucket(num_decode_rows) if only_decodes else None
        token_rows, entry_rows, num_tokens, meta = self._prepare(out, order, num_decode_entries, bucket)
        if bucket is not None:
            graph, graph_logits = self.graphs[bucket]
            graph.replay()
            if not token_rows:
                return None, entry_rows
            if len(token_rows) == num_tokens:  # every row's logits: rows 0..n-1
                logits = graph_logits[:num_tokens]
            else:
                logits = graph_logits[upload(token_rows, torch.int64, self.device)]
        else:
            if self.tp.size > 1:
                rows = torch.tensor(token_rows, dtype=torch.int64, device=self.device)
                self._broadcast_plan(num_tokens, meta, rows)
            hidden = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)
            if not token_rows:
                return None, entry_rows
            if len(token_rows) != num_tokens:
                hidden = hidden[upload(token_rows, torch.int64, self.device)]
            logits = self.model.compute_logits(hidden)
        return logits, entry_rows

    # ---------------------------------------------------------------- device-fed decodes
    def plan_decodes(
        self, starts: list[int], num_steps: list[int], steps: int, block_tables: list[list[int]]
    ) -> DecodePlan:
        """Upload, once, the metadata of `steps` decode steps over one row per page table: row r
        computes positions starts[r], starts[r] + 1, ... for num_steps[r] steps, then sits out
        (writes no KV, attends to the context it has; its logits mean nothing). The tokens
        before starts[r] must be computed."""
        ps = self.page_size
        rows = len(starts)
        bucket = self._bucket(rows) if self.tp.size == 1 else None
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
        dev = self.device
        return DecodePlan(rows, bucket, upload(meta, torch.int64, dev), upload(tables, torch.int32, dev), host_lens)

    @torch.inference_mode()
    def decode_step(self, plan: DecodePlan, step: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Step `step` of `plan` on `input_ids` ([rows] int64, on the device); returns the rows'
        logits (a graph's output buffer: read it before the next step). Device-to-device copies
        and a graph replay only: no host sync."""
        n = plan.num_rows
        meta = plan.meta[step]
        width = meta.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:width].copy_(meta[0])
        self.slot_mapping[:width].copy_(meta[1])
        self.seq_lens[:width].copy_(meta[2])
        tw = plan.tables.shape[1]
        if step == 0:  # the plan's steps are consecutive: nothing else uses the runner between them
            self.block_tables[:n, :tw].copy_(plan.tables)
        if plan.bucket is not None:
            graph, graph_logits = self.graphs[plan.bucket]
            graph.replay()
            return graph_logits[:n]
        self.query_start_loc[: n + 1].copy_(torch.arange(n + 1, dtype=torch.int32), non_blocking=True)
        lens = plan.seq_lens[step]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n, :tw],
            seq_lens=self.seq_lens[:n],
            query_start_loc=self.query_start_loc[: n + 1],
            num_decodes=n,
            max_query_len=1,
            num_splits=self.ops.decode_splits(n, self.num_kv_heads, max(lens)),
            seq_lens_cpu=lens,
            query_start_loc_cpu=list(range(n + 1)),
        )
        return self.model.compute_logits(self.model(self.input_ids[:n], self.positions[:n], meta))

    @torch.inference_mode()
    def decode_loop(self, plan: DecodePlan, first: torch.Tensor) -> torch.Tensor | None:
        """All of `plan`'s steps as one graph replay, each step's input the argmax of the step
        before (greedy drafting), the first step's `first` ([rows] int64 on the device). Returns
        the tokens the steps drew, [steps, rows] on the device, or None where no graph serves
        (CPU, eager, tensor parallelism): then `decode_step` per step. One launch instead of
        five per step: on a small model each launch costs about as much as its kernel."""
        if plan.bucket is None or self.device.type != "cuda":
            return None
        steps = plan.meta.shape[0]
        key = (plan.bucket, steps)
        if key not in self._loops:
            self._capture_loop(*key)
        graph, meta, tokens = self._loops[key]
        n = plan.num_rows
        meta.copy_(plan.meta)
        tokens[0, :n].copy_(first)
        self.block_tables[:n, : plan.tables.shape[1]].copy_(plan.tables)
        graph.replay()
        return tokens[1:, :n]

    def _capture_loop(self, bucket: int, steps: int) -> None:
        meta = torch.zeros(steps, 3, bucket, dtype=torch.int64, device=self.device)
        meta[:, 1] = -1  # until a plan fills it: padding rows (the warm-up writes no KV)
        tokens = torch.zeros(steps + 1, bucket, dtype=torch.int64, device=self.device)
        attn = self._decode_meta(bucket, self.ops.decode_splits(bucket, self.num_kv_heads, self.cfg.max_model_len))

        def body():
            for j in range(steps):
                self.input_ids[:bucket].copy_(tokens[j])
                self.positions[:bucket].copy_(meta[j, 0])
                self.slot_mapping[:bucket].copy_(meta[j, 1])
                self.seq_lens[:bucket].copy_(meta[j, 2])
                hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], attn)
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
        self._loops[(bucket, steps)] = (graph, meta, tokens)
        logger.debug("captured a %d-step greedy decode loop for %d rows", steps, bucket)

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
        """The smallest captured batch size that holds `batch` decode rows, if any."""
        i = bisect.bisect_left(self._graph_sizes, batch)
        return self._graph_sizes[i] if i < len(self._graph_sizes) else None

    def _prepare(self, out: SchedulerOutput, order: list[int], num_decode_entries: int, bucket: int | None):
        """Fill the step buffers, decode rows first (one per token of a decode or verification
        entry: each attends to the context up to and including itself, through the same page
        table, so k + 1 tokens verify in one decode-kernel pass), then prefill chunks; padded to
        the graph's `bucket` if one replays. Returns (tokens whose logits are needed, their
        indices per scheduled entry, number of tokens, eager metadata or None)."""
        ps = self.page_size
        scheduled = out.scheduled
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        token_rows: list[int] = []
        entry_rows: list[list[int]] = [[] for _ in scheduled]
        tables = self._host_tables
        width = 0
        row = 0  # attention rows: one per decode token, one per prefill chunk
        for j, i in enumerate(order):
            s = scheduled[i]
            seq = s.seq
            table = seq.block_table
            width = max(width, len(table))
            if j < num_decode_entries:
                for p in range(s.start, s.end):
                    tables[row, : len(table)] = table
                    input_ids.append(s.token_at(p))
                    positions.append(p)
                    slots.append(table[p // ps] * ps + p % ps)
                    query_start_loc.append(query_start_loc[-1] + 1)
                    seq_lens.append(p + 1)
                    if s.draft_token_ids or (s.sample and p == s.end - 1):
                        entry_rows[i].append(len(token_rows))
                        token_rows.append(row)
                    row += 1
                continue
            tables[row, : len(table)] = table
            pos = np.arange(s.start, s.end)
            input_ids += seq.token_ids[s.start : s.end]
            positions += pos.tolist()
            slots += (np.asarray(table)[pos // ps] * ps + pos % ps).tolist()
            query_start_loc.append(query_start_loc[-1] + s.num_tokens)
            seq_lens.append(s.end)
            if s.sample:
                entry_rows[i].append(len(token_rows))
                token_rows.append(query_start_loc[-1] - 1)
            row += 1
        batch = row
        num_decodes = sum(scheduled[i].num_tokens for i in order[:num_decode_entries])
        n = len(input_ids)
        pad = (bucket or batch) - batch  # padding rows of a graph replay: no KV write, empty context
        self.input_ids[: n + pad].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[: n + pad].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[: n + pad].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[: batch + pad].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.query_start_loc[: batch + 1].copy_(torch.tensor(query_start_loc, dtype=torch.int32), non_blocking=True)
        self.block_tables[:batch, :width].copy_(torch.from_numpy(tables[:batch, :width]), non_blocking=True)
        if bucket is not None:
            return token_rows, entry_rows, n, None
        num_splits = self.ops.decode_splits(num_decodes, self.num_kv_heads, max(seq_lens))
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:batch, : max(width, 1)],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            num_decodes=num_decodes,
            max_query_len=max([1, *(scheduled[i].num_tokens for i in order[num_decode_entries:])]),
            num_splits=num_splits,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        return token_rows, entry_rows, n, meta
