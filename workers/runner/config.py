"""`RunnerConfig`: what a model runner needs to know, resolved from an `EngineConfig` on a device.

The engine, the ranks of a tensor-parallel group (workers/group.py) and the draft models
(workers/spec/draft_model.py) all build their runners from here, so a value is resolved one way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import EngineConfig
from workers.models.config import ModelConfig


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
    max_num_spec_seqs: int = 0  # most sequences that speculate in one step (0: none)
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype

    quantization: str = "none"  # workers/quant/: none, fp8, fp8-gptq, int8, int4, int4-awq, gguf
    quantization_group_size: int = 128

    @property
    def max_num_rows(self) -> int:
        """Attention rows of a step: a verification takes one per token (k + 1 per sequence)."""
        rows = self.max_num_seqs * (1 + self.num_speculative_tokens)
        return max(self.max_num_seqs, min(rows, self.max_num_batched_tokens))

    @property
    def max_graph_rows(self) -> int:
        """Rows of the largest decode-only step replayed as a CUDA graph: a decode batch of up to
        `max_graph_batch_size` rows, or a verification of as many of those sequences as may
        speculate, k + 1 rows each; so a verification never runs eagerly where its decodes would
        replay a graph."""
        decode_rows = min(self.max_graph_batch_size, self.max_num_rows)
        spec_seqs = min(self.max_graph_batch_size, self.max_num_seqs, self.max_num_spec_seqs)
        return min(self.max_num_rows, max(decode_rows, spec_seqs * (1 + self.num_speculative_tokens)))


def runner_config(config: EngineConfig, model_config: ModelConfig, device: torch.device, **overrides) -> RunnerConfig:
    """The runner settings an engine config implies on `device`; `overrides` replace single fields
    (a draft replica's model sizes its steps for its catch-ups and proposals)."""
    fields = dict(
        model_dir=config.model,
        device=device,
        dtype=resolve_dtype(config.dtype, model_config.dtype, device),
        load_format=config.load_format,
        seed=config.seed,
        page_size=config.page_size,
        max_model_len=resolve_max_model_len(config, model_config),
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        kernels=config.kernels,
        num_pages=config.num_pages,
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_kv_cache_gib=config.cpu_kv_cache_gib,
        cuda_graphs=not config.enforce_eager,
        max_graph_batch_size=config.max_graph_batch_size,
        num_speculative_tokens=config.speculative.num_speculative_tokens if config.speculative else 0,
        max_num_spec_seqs=config.speculative.max_batch_size if config.speculative else 0,
        kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, device),
        quantization=config.quantization,
        quantization_group_size=config.quantization_group_size,
    )
    return RunnerConfig(**{**fields, **overrides})


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    wanted = config.max_model_len or limit
    if wanted > limit:
        raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings ({limit})")
    if config.max_num_batched_tokens < wanted and not config.enable_chunked_prefill:
        raise ValueError("with chunked prefill off, max_num_batched_tokens must be >= max_model_len")
    return wanted


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available")
    return device


def resolve_kv_cache_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'fp8' is float8 E4M3 pages; the Triton kernels convert to and from it in registers, which
    needs fp8 support (compute capability >= 8.9). None: the model's dtype."""
    if name == "auto":
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"kv_cache_dtype 'fp8' needs a GPU with fp8 support (compute capability >= 8.9: Ada, Hopper or "
            f"later); {device} has {major}.{minor}: use kv_cache_dtype 'auto'"
        )
    return torch.float8_e4m3fn


def apply_cpu_threads(num_threads: int | None) -> None:
    """Give this process's torch `num_threads` CPU threads (None: leave torch's default). Process-wide:
    a replica is one process, and its reserved cores are what its CPU kernels should use."""
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(torch, checkpoint_dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
