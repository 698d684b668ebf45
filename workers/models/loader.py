"""Build a model on its device and fill its weights: from `*.safetensors` files (one or many,
read tensor by tensor so that host memory holds one tensor at a time), from a GGUF file
(workers/models/gguf.py: dequantized tensor by tensor) or, for benchmarks,
`dummy` random values of the right shapes (as vLLM's `load_format=dummy`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from workers.layers.parallel import TPInfo
from workers.models.config import ModelConfig
from workers.models.gguf import iter_gguf_weights
from workers.models.gguf_file import find_gguf
from workers.models.llama import LlamaForCausalLM


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, object]]:
    """(name, lazy slice) of every checkpoint tensor: indexing a slice reads only those rows, so a
    tensor-parallel rank reads only its shard."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                yield name, f.get_slice(name)


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    ops,
    load_format: str = "auto",
    seed: int = 0,
    tp: TPInfo | None = None,
) -> LlamaForCausalLM:
    with torch.device(device):
        model = LlamaForCausalLM(cfg, max_positions, ops, tp)
    # Rotary tables stay float32 (cast per use, as HF does); parameters take the model dtype.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if load_format == "dummy":
        _fill_dummy(model, seed)
    elif (gguf_file := find_gguf(model_dir)) is not None:
        model.load_weights(iter_gguf_weights(gguf_file, cfg))
    else:
        model.load_weights(iter_safetensors(Path(model_dir)))
    return model.eval()


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-1e-3, 1e-3, generator=gen)
