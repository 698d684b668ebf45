"""The model runner: turns a `SchedulerOutput` into tensors, runs the forward, samples.

It owns the device state: the weights, the KV cache (runner/memory.py), the persistent step inputs
(`StepBuffers`) and on CUDA the captured decode graphs (runner/graphs.py). It reads sequences but
never changes them, except for lazily creating a seeded sequence's generator.

Each step's batch is laid out decode rows first (one per token of a decode or a verification),
then prefill chunks, as the attention kernels expect. A step made only of decode rows replays the
CUDA graph of the smallest bucket that holds it; anything else runs eagerly.

In a tensor-parallel group (`TPInfo.size` > 1) every rank holds a runner over its shard of the
weights and KV heads; rank 0 sends each eager step's plan to the others (runner/tp.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from workers.config import EngineConfig
from workers.kernels.ops import get_ops
from workers.kv_cache_manager import cdiv
from workers.layers.attention import AttentionMetadata
from workers.layers.parallel import TPInfo
from workers.models.config import ModelConfig
from workers.models.loader import load_model
from workers.request import StepLogprobs
from workers.runner import tp as tp_protocol
from workers.runner.buffers import StepBuffers
from workers.runner.config import RunnerConfig, runner_config
from workers.runner.graphs import DecodeGraphs, graph_buckets
from workers.runner.memory import allocate_kv_cache, kv_page_bytes, num_pages_for
from workers.sampling import Sampler, SamplingInputs, make_generator, upload
from workers.scheduler import SchedulerOutput
from workers.spec.verify import verify

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[int | list[int] | None]  # per scheduled entry: a token, a verification's tokens, or None
    logprobs: list[StepLogprobs | None]


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
            cfg.quantization,
            cfg.quantization_group_size,
            # quantized matmuls: aten on CPU, Triton on CUDA; `kernels: torch` on a GPU runs their reference
            "reference" if cfg.device.type == "cuda" and self.ops.name == "torch" else "auto",
        )
        self.num_kv_heads = self.model.num_local_kv_heads
        self.sampler = Sampler(cfg.device, seed=cfg.seed)
        self.max_pages_per_seq = cdiv(cfg.max_model_len, cfg.page_size)
        self.buffers = StepBuffers(cfg.max_num_batched_tokens, cfg.max_num_rows, self.max_pages_per_seq, cfg.device)
        self.num_pages = cfg.num_pages or num_pages_for(
            cfg, self.page_bytes, self._allocate_kv_cache, self._profile_step
        )
        if self.tp.size > 1:  # every rank's pool has the same pages: the smallest any rank can hold
            import torch.distributed as dist

            n = torch.tensor([self.num_pages], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.tp.group)
            self.num_pages = int(n.item())
        self._allocate_kv_cache(self.num_pages)
        self.graphs = DecodeGraphs(self.model, self.buffers, self.ops, self.num_kv_heads, cfg.max_model_len, cfg.device)
        if cfg.cuda_graphs and cfg.device.type == "cuda" and self.ops.name == "triton" and self.tp.size == 1:
            self.graphs.capture(graph_buckets(cfg.max_graph_rows))
        # decode-only steps that ran eagerly although graphs are captured (none fit their rows)
        self.num_eager_decode_steps = 0

    # ---------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        return kv_page_bytes(self.model_config, self.page_size, self.num_kv_heads, self.cfg.kv_dtype)

    def _allocate_kv_cache(self, num_pages: int) -> None:
        shape = (num_pages, self.page_size, self.num_kv_heads, self.model_config.head_dim)
        allocate_kv_cache(self.model, shape, self.cfg.kv_dtype, self.device)

    @torch.inference_mode()
    def _profile_step(self, num_tokens: int) -> None:
        b = self.buffers
        pages = cdiv(num_tokens, self.page_size)
        b.block_tables[0, :pages] = torch.arange(pages, dtype=torch.int32, device=self.device)
        b.seq_lens[0] = num_tokens
        b.query_start_loc[:2] = torch.tensor([0, num_tokens], dtype=torch.int32)
        b.slot_mapping[:num_tokens] = torch.arange(num_tokens, device=self.device)
        b.positions[:num_tokens] = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:num_tokens],
            block_tables=b.block_tables[:1],
            seq_lens=b.seq_lens[:1],
            query_start_loc=b.query_start_loc[:2],
            num_decodes=0,
            max_query_len=num_tokens,
            num_splits=1,
            seq_lens_cpu=[num_tokens],
            query_start_loc_cpu=[0, num_tokens],
        )
        hidden = self.model(b.input_ids[:num_tokens], b.positions[:num_tokens], meta)
        rows = min(self.cfg.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.sort(logits, dim=-1)  # the sampler's top-p sort is its largest temporary

    def release(self) -> None:
        """Drop the graphs, the KV cache and the weights (e.g. before another model uses the GPU)."""
        self.graphs.clear()
        self._allocate_kv_cache(0)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- steps
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run a step and choose its tokens: sample the plain entries, verify the speculative ones
        (workers/spec/verify.py), in one pass over the logits."""
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
        bucket = self.graphs.bucket(num_decode_rows) if only_decodes else None
        if only_decodes and bucket is None and len(self.graphs):
            self.num_eager_decode_steps += 1
        token_rows, entry_rows, num_tokens, meta = self._prepare(out, order, num_decode_entries, bucket)
        if bucket is not None:
            graph_logits = self.graphs.replay(bucket)
            if not token_rows:
                return None, entry_rows
            if len(token_rows) == num_tokens:  # every row's logits: rows 0..n-1
                logits = graph_logits[:num_tokens]
            else:
                logits = graph_logits[upload(token_rows, torch.int64, self.device)]
        else:
            if self.tp.size > 1:
                rows = torch.tensor(token_rows, dtype=torch.int64, device=self.device)
                tp_protocol.broadcast_step(self.buffers, num_tokens, meta, rows, self.tp.group)
            hidden = self.model(self.buffers.input_ids[:num_tokens], self.buffers.positions[:num_tokens], meta)
            if not token_rows:
                return None, entry_rows
            if len(token_rows) != num_tokens:
                hidden = hidden[upload(token_rows, torch.int64, self.device)]
            logits = self.model.compute_logits(hidden)
        return logits, entry_rows

    # ---------------------------------------------------------------- tensor parallelism
    def stop_ranks(self) -> None:
        """Rank 0: release the other ranks from `serve_ranks`."""
        if self.tp.size > 1 and self.tp.rank == 0:
            tp_protocol.stop_ranks(self.device, self.tp.group)

    def serve_ranks(self) -> None:
        """Ranks 1..n-1: run rank 0's steps on this shard until rank 0 stops the group."""
        tp_protocol.serve_ranks(self.model, self.buffers, self.tp.group)

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
        b = self.buffers
        tables = b.host_block_tables
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
        b.input_ids[: n + pad].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        b.positions[: n + pad].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        b.slot_mapping[: n + pad].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        b.seq_lens[: batch + pad].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        b.query_start_loc[: batch + 1].copy_(torch.tensor(query_start_loc, dtype=torch.int32), non_blocking=True)
        b.block_tables[:batch, :width].copy_(torch.from_numpy(tables[:batch, :width]), non_blocking=True)
        if bucket is not None:
            return token_rows, entry_rows, n, None
        num_splits = self.ops.decode_splits(num_decodes, self.num_kv_heads, max(seq_lens))
        meta = AttentionMetadata(
            slot_mapping=b.slot_mapping[:n],
            block_tables=b.block_tables[:batch, : max(width, 1)],
            seq_lens=b.seq_lens[:batch],
            query_start_loc=b.query_start_loc[: batch + 1],
            num_decodes=num_decodes,
            max_query_len=max([1, *(scheduled[i].num_tokens for i in order[num_decode_entries:])]),
            num_splits=num_splits,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        return token_rows, entry_rows, n, meta


def build_runner(config: EngineConfig, model_config: ModelConfig, device: torch.device, tp=None) -> ModelRunner:
    """The model runner of one rank (the whole model without tensor parallelism)."""
    return ModelRunner(runner_config(config, model_config, device), model_config, tp)
