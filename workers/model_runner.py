"""The model runner: turns a `SchedulerOutput` into tensors, runs the forward, samples.

It owns the device state: the weights, the KV cache (one k and one v tensor per layer, shape
[num_pages, page_size, num_kv_heads, head_dim]) and preallocated step-input buffers (so that a
graph-captured decode can later replay over the same addresses). It reads sequences but never
changes them, except for lazily creating a seeded sequence's generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers.layers.attention import AttentionMetadata, get_backend
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
    attention_backend: str
    num_pages: int | None
    gpu_memory_utilization: float
    cpu_kv_cache_gib: float


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, model_config: ModelConfig):
        self.cfg = cfg
        self.model_config = model_config
        self.device = cfg.device
        self.page_size = cfg.page_size
        self.model = load_model(
            cfg.model_dir, model_config, cfg.dtype, cfg.device, cfg.max_model_len, cfg.load_format, cfg.seed
        )
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        self.sampler = Sampler(cfg.device, seed=cfg.seed)
        n = cfg.max_num_batched_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=cfg.device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=cfg.device)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=cfg.device)
        self.num_pages = cfg.num_pages or self._num_pages_from_memory()
        self._allocate_kv_cache(self.num_pages)

    # ---------------------------------------------------------------- memory
    @property
    def page_bytes(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.cfg.dtype).element_size()
        return 2 * mc.num_layers * self.page_size * mc.num_kv_heads * mc.head_dim * elem

    def _allocate_kv_cache(self, num_pages: int) -> None:
        mc = self.model_config
        shape = (num_pages, self.page_size, mc.num_kv_heads, mc.head_dim)
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
        tokens = self.cfg.max_num_batched_tokens
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
        ps = self.page_size
        positions = torch.arange(num_tokens, device=self.device) % self.cfg.max_model_len
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=torch.arange(-(-num_tokens // ps), device=self.device, dtype=torch.int32)[None, :],
            query_start_loc=[0, num_tokens],
            seq_lens=[num_tokens],
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        hidden = self.model(
            torch.zeros(num_tokens, dtype=torch.int64, device=self.device), positions, meta, self.backend
        )
        rows = min(self.cfg.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.sort(logits, dim=-1)  # the sampler's top-p sort is its largest temporary

    # ---------------------------------------------------------------- steps
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        meta, logits_rows, num_tokens = self._prepare(out)
        hidden = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta, self.backend)
        sampled: list[int | None] = [None] * len(out.scheduled)
        logprobs: list[StepLogprobs | None] = [None] * len(out.scheduled)
        sampling = [i for i, s in enumerate(out.scheduled) if s.sample]
        if not sampling:
            return StepResult(sampled, logprobs)
        logits = self.model.compute_logits(hidden[logits_rows])
        seqs = [out.scheduled[i].seq for i in sampling]
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
        for row, i in enumerate(sampling):
            sampled[i] = result.token_ids[row]
            logprobs[i] = result.logprobs[row]
        return StepResult(sampled, logprobs)

    def _prepare(self, out: SchedulerOutput) -> tuple[AttentionMetadata, torch.Tensor, int]:
        ps = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        max_pages = max(len(s.seq.page_table) for s in out.scheduled)
        block_tables = []
        for s in out.scheduled:
            seq = s.seq
            table = seq.page_table
            input_ids += seq.token_ids[s.start : s.end]
            positions += range(s.start, s.end)
            slots += [table[p // ps] * ps + p % ps for p in range(s.start, s.end)]
            query_start_loc.append(query_start_loc[-1] + s.num_tokens)
            seq_lens.append(s.end)
            block_tables.append(table + [0] * (max_pages - len(table)))
            if s.sample:
                logits_rows.append(query_start_loc[-1] - 1)
        n = len(input_ids)
        self.input_ids[:n].copy_(torch.tensor(input_ids, dtype=torch.int64), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=torch.tensor(block_tables, dtype=torch.int32, device=self.device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            max_query_len=max(s.num_tokens for s in out.scheduled),
            max_seq_len=max(seq_lens),
        )
        return meta, torch.tensor(logits_rows, dtype=torch.int64, device=self.device), n
