"""`ModelConfig`: what the engine needs from a Hugging Face `config.json` (or a GGUF file's metadata), read without
`transformers` so that every supported family (Llama 2/3, Mistral, Qwen2, Qwen3) maps onto one
decoder with a few switches (biases, q/k norm, tied embeddings, rope scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.models.gguf_file import SUPPORTED_ARCHITECTURES, field, find_gguf, open_reader

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """From a Hugging Face directory's config.json, or from a GGUF file's metadata (`path` the file
        or a directory holding one)."""
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return cls.from_gguf(gguf_file)
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        cfg = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(cfg, gen)

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelConfig:
        """The `ModelConfig` of a GGUF file, from its metadata (no tensor data is read)."""
        path = Path(path)
        reader = open_reader(path)
        arch = field(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{path.name}: GGUF architecture {arch!r} is not supported; "
                f"kvfleet reads {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def key(name, default=None):
            return field(reader, f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // num_heads))
        names = {t.name for t in reader.tensors}
        if "rope_freqs.weight" in names:
            raise UnsupportedModelError(f"{path.name}: per-frequency rope factors (rope_freqs) are not supported")
        scaling = key("rope.scaling.type", "none")
        theta = float(key("rope.freq_base", 10000.0))
        if scaling in ("none", None):
            rope = RopeConfig(theta=theta)
        elif scaling == "linear":
            rope = RopeConfig(theta=theta, kind="linear", factor=float(key("rope.scaling.factor")))
        else:
            raise UnsupportedModelError(f"{path.name}: rope scaling {scaling!r} is not supported (none, linear)")
        vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        eos = field(reader, "tokenizer.ggml.eos_token_id")
        return cls(
            model_type=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope=rope,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            qk_norm=False,
            sliding_window=None,
            # Dequantized weights have no dtype of their own: float32 on CPU, bfloat16 on GPU ("auto").
            dtype="float32",
            eos_token_ids=() if eos is None else (int(eos),),
        )

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; kvfleet serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        sliding = cfg.get("sliding_window")
        if model_type != "mistral" and not cfg.get("use_sliding_window", False):
            sliding = None
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = (generation_config or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_config(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama's attention_bias covers q/k/v and o.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral") and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
        )


def _rope_config(cfg: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta included); older files have
    # `rope_theta` and `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope type {kind!r} is not supported (default, linear, llama3)")
