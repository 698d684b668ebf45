"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm),
whole or as one rank's shard of a tensor-parallel group (`TPInfo`; workers/layers/parallel.py).

Parameter names follow the Hugging Face checkpoints except for the merged projections
(`qkv_proj` = q, k, v; `gate_up_proj` = gate, up), which `load_weights` fills part by part.
`forward` takes the step's flattened tokens and returns hidden states; the runner picks the
rows that need logits and calls `compute_logits` on those alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.attention import AttentionMetadata
from workers.layers.basic import MergedLinear, RMSNorm, RotaryTables
from workers.layers.parallel import (
    ParallelLMHead,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
    full,
    shape_of,
    shard_heads,
    split,
)
from workers.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryTables, ops, tp: TPInfo):
        super().__init__()
        self.ops = ops
        shard = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp)
        hd = self.head_dim = cfg.head_dim
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.q_size = self.num_heads * hd
        self.kv_size = self.num_kv_heads * hd
        self.scale = hd**-0.5
        self.sliding_window = cfg.sliding_window
        kv_part = (cfg.num_kv_heads * hd, shard.kv_start * hd, self.kv_size)
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [(cfg.num_heads * hd, shard.q_start * hd, self.q_size), kv_part, kv_part], cfg.qkv_bias
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * hd, cfg.hidden_size, cfg.o_bias, tp)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        # Bound by the model runner once the pool is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, positions, x, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.ops.rope_and_write_kv(
            q, k, v, self.k_cache, self.v_cache, self.rotary.cos, self.rotary.sin, positions, meta.slot_mapping
        )
        o = self.ops.attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, tp: TPInfo):
        super().__init__()
        self.ops = ops
        start, self.intermediate = split(cfg.intermediate_size, tp)
        part = (cfg.intermediate_size, start, self.intermediate)
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [part, part], cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryTables, ops, tp: TPInfo):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, rotary, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops, tp)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, ops, tp: TPInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryTables(cfg.head_dim, max_positions, cfg.rope)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, ops, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our module fragment, part index in the merged projection)
    _MERGED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int, ops, tp: TPInfo | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp = tp or TPInfo()
        self.model = LlamaModel(cfg, max_positions, ops, tp)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        # a quantized replacement of the logits matmul (workers/quant: int8 on CPU), set after loading
        self.logits_head: nn.Module | None = None

    @property
    def num_local_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0 (None on the other ranks of a TP group)."""
        if self.logits_head is not None:
            return self.logits_head(hidden)  # whole-vocabulary head: tensor parallelism 1 only
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if self.tp.size == 1:
            return logits
        logits = self.tp.gather_last_dim(logits)
        return None if logits is None else logits[..., : self.config.vocab_size]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in (this rank's shard of each: the values may be lazy
        safetensors slices, read only where the shard lies); fail if any parameter is left unloaded."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or name.endswith(".inv_freq"):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes store a copy
            module_name, _, leaf = name.rpartition(".")
            prefix, _, proj = module_name.rpartition(".")
            if proj in self._MERGED:
                merged, part = self._MERGED[proj]
                target = f"{prefix}.{merged}"
                modules[target].load_part(part, leaf, tensor)
                loaded.add(f"{target}.{leaf}#{part}")
                continue
            module = modules.get(module_name)
            # sharded and quantized layers (workers/quant/layers.py) load their own tensors
            if isinstance(module, RowParallelLinear | VocabParallelEmbedding | ParallelLMHead) or getattr(
                module, "loads_itself", False
            ):
                module.load(leaf, tensor)
            elif name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            else:
                param = params[name]
                if tuple(param.shape) != shape_of(tensor):
                    raise ValueError(f"{name}: checkpoint shape {shape_of(tensor)} != model {tuple(param.shape)}")
                param.data.copy_(full(tensor))
            loaded.add(name)
        missing = []
        for name in params:
            module_name, _, leaf = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, MergedLinear) or hasattr(module, "part_sizes"):  # float or quantized
                missing += [f"{name}#{i}" for i in range(len(module.part_sizes)) if f"{name}#{i}" not in loaded]
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
