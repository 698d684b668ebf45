"""`EngineConfig`: every knob of one engine, validated once (pydantic), with vLLM-like defaults.

The cluster config (cluster/config.py) nests this model rather than repeating its fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """Speculative decoding (workers/spec/): a proposer guesses, the target verifies exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft", "replicas"] = Field(
        "ngram",
        description="'ngram': prompt lookup, no model; 'draft': an in-process draft model (draft_model); "
        "'replicas': DraftWorker replicas (the cluster's draft section sets this).",
    )
    draft_model: str | None = Field(None, description="Draft model directory (same tokenizer as the target).")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Most tokens proposed per sequence per step (k).")
    adaptive: bool = Field(True, description="Choose k per step from the measured acceptance rate and draft cost.")
    max_batch_size: int = Field(
        32, ge=1, description="Decodes in a step above which it runs without speculation (throughput first)."
    )
    ngram_min: int = Field(1, ge=1, description="Shortest suffix the n-gram proposer looks up.")
    ngram_max: int = Field(3, ge=1, description="Longest suffix the n-gram proposer looks up.")
    draft_num_pages: int | None = Field(
        None, ge=1, description="KV pages of the draft's pool; default: as many as the target's."
    )
    retry_after_s: float = Field(5.0, gt=0, description="After a proposer failure, decode alone this long.")

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative.method 'draft' needs speculative.draft_model")
        if self.ngram_min > self.ngram_max:
            raise ValueError("speculative.ngram_min must be <= ngram_max")
        return self


class KVTransferConfig(BaseModel):
    """Pulls of KV pages between replicas (workers/kv_transfer.py): a replica that lacks leading
    pages of a prompt that another live replica holds (the page index says which) asks it for them
    before the request enters its scheduler, when moving them is predicted faster than computing them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Pull missing prefix pages from the replica holding them.")
    timeout_s: float = Field(
        2.0, gt=0, description="Deadline of one pull; past it the pages are recomputed (never an error)."
    )
    min_pages: int = Field(1, ge=1, description="Fewest missing pages worth a pull.")
    assumed_bandwidth_gib_s: float = Field(
        1.0, gt=0, description="Transfer bandwidth the cost model assumes until it has measured a pull."
    )
    assumed_prefill_tokens_s: float = Field(
        2000.0, gt=0, description="Prefill rate the cost model assumes until the engine has measured one."
    )
    assumed_latency_ms: float = Field(
        2.0,
        ge=0,
        description="Fixed cost of one pull (the calls' round trip, whatever its size) the cost model assumes "
        "until it has measured one: pulls of a few pages that cannot pay for it are not attempted.",
    )
    replicas_refresh_s: float = Field(
        2.0, gt=0, description="How often the list of live replicas (the candidates to pull from) is re-read."
    )


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="A Hugging Face model directory (config.json, *.safetensors, tokenizer) or a GGUF file "
        "(or a directory holding one)."
    )
    model_id: str | None = Field(
        None, description="Name clients use and page hashes carry; default: the directory name."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory, if not the model's.")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': the checkpoint's dtype on GPU, float32 on CPU."
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="'auto': the KV cache in the model's dtype; 'fp8': float8 E4M3 pages (scale 1.0), twice "
        "the pages of bf16 in the same memory (needs compute capability >= 8.9 on GPU).",
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="'dummy' fills the weights with small random values (benchmarks)."
    )
    seed: int = Field(0, description="Seed of the weights in 'dummy' format and of unseeded sampling.")
    page_size: int = Field(16, ge=1, description="Tokens per KV page.")
    num_pages: int | None = Field(
        None, ge=1, description="KV pages in the pool; default: from gpu_memory_utilization (GPU) or cpu_kv_cache_gib."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory for weights + KV.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU when num_pages is not set.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output; default: the model's limit.")
    host_kv_cache_gib: float = Field(
        0.0,
        ge=0,
        description="Host-memory KV tier (pinned on GPU): device pages evicted from the prefix cache are "
        "copied here and restored on a later hit instead of recomputed; 0: off.",
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Most tokens computed in one step (prefill chunks + decodes)."
    )
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_len: int = Field(
        4096, ge=1, description="Waiting requests beyond which new ones are refused (retryable)."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads of the engine's process on CPU (torch.set_num_threads); default: torch's "
        "(in a Ray replica, Ray sets it to the CPUs the replica reserved; the cluster passes those).",
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="'auto': Triton on GPU, the pure-torch references on CPU."
    )
    enforce_eager: bool = Field(False, description="Never replay CUDA graphs (they serve pure-decode steps on GPU).")
    max_graph_batch_size: int = Field(256, ge=1, description="Largest decode batch captured as a CUDA graph.")
    skip_tokenizer_init: bool = Field(
        False, description="No tokenizer: deltas carry token ids only, no text or stop strings."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks (GPUs) the model is split over, Megatron-style; rank 0 schedules and samples."
    )
    tp_backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="'auto': NCCL on GPU, gloo on CPU.")
    tp_timeout_s: float = Field(
        120.0, gt=0, description="A collective that waits longer fails: a dead rank stops the engine, never hangs it."
    )
    quantization: Literal["none", "fp8", "fp8-gptq", "int8", "int4", "int4-awq", "gguf", "compressed-tensors"] = Field(
        "none",
        description="Weights kept quantized (workers/quant/): 'int8' / 'int4' weight-only group-wise, 'int4-awq' "
        "(calibrated on the shipped text), 'fp8' (GPUs with fp8 tensor cores), 'fp8-gptq' (fp8's layout, calibrated "
        "on the shipped text), applied at load to a float checkpoint; "
        "'gguf' keeps a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are. 'none' dequantizes a GGUF at load; a checkpoint "
        "written by `kvfleet quantize` or a compressed-tensors one (llm-compressor) loads quantized either way "
        "('compressed-tensors' insists on one).",
    )
    quantization_group_size: int = Field(
        128, ge=1, description="Input columns per scale for int8 / int4 (must divide every layer's, per rank)."
    )
    replica_id: str = Field("", description="Names this engine in KV events (set by the deployment).")
    speculative: SpeculativeConfig | None = Field(None, description="Speculative decoding; None: off.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs and not self.enable_chunked_prefill:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs when chunked prefill is off")
        if self.quantization in ("fp8", "fp8-gptq") and self.device == "cpu":
            raise ValueError(
                f"quantization {self.quantization} needs a GPU with fp8 tensor cores (compute capability 8.9+); "
                "on CPU use int8, int4 or gguf"
            )
        if self.host_kv_cache_gib > 0 and self.tensor_parallel_size > 1:
            raise ValueError("host_kv_cache_gib needs tensor_parallel_size 1 (the tier holds rank 0's KV only)")
        return self

    @property
    def served_model_id(self) -> str:
        """The id clients name and page hashes carry: `model_id`, else the model directory's name.
        The ingress, the workers and the page index must all use this one."""
        return self.model_id or dir_model_id(self.model)


def dir_model_id(model_dir: str | Path) -> str:
    """The id of a model served from `model_dir` with no `model_id` configured (a GGUF file's name
    without its `.gguf`)."""
    path = Path(model_dir).resolve()
    return path.stem if path.suffix == ".gguf" else path.name
