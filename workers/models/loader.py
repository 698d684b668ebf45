"""Build a model on its device and fill its weights: from `*.safetensors` files (one or many,
read tensor by tensor so that host memory holds one tensor at a time), from a GGUF file
(workers/models/gguf.py: dequantized tensor by tensor) or, for benchmarks,
`dummy` random values of the right shapes (as vLLM's `load_format=dummy`).

Quantization (workers/quant/) happens here too: a float checkpoint is loaded, then its linear layers
are quantized in place (`quantization` int8 / int4 / int4-awq / fp8 / fp8-gptq); a GGUF file with
`quantization: gguf`, and a checkpoint written by `kvfleet quantize` (whatever `quantization` says,
unless it names another scheme), load straight into quantized layers, and so does a
compressed-tensors checkpoint (llm-compressor's, `quantization` unset or `compressed-tensors`:
workers/quant/compressed_tensors.py maps its tensors onto the same layouts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from workers.layers.parallel import TPInfo
from workers.models.config import ModelConfig
from workers.models.gguf import iter_gguf_weights
from workers.models.gguf_file import find_gguf
from workers.models.llama import LlamaForCausalLM
from workers.quant.backends import check_device, get_backend
from workers.quant.checkpoint import read_quant_config, saved_layer_kinds
from workers.quant.compressed_tensors import iter_ct_weights, log_notes, plan_layers, read_ct_config
from workers.quant.gguf_blocks import iter_gguf_quantized, linear_kinds
from workers.quant.layout import QuantizationError
from workers.quant.quantize import (
    calibration_batches,
    check_group_size,
    finalize_model,
    prepare_empty,
    quantize_logits_head,
    quantize_model,
    scheme_kind,
)


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
    quantization: str = "none",
    group_size: int = 128,
    quant_backend: str = "auto",
) -> LlamaForCausalLM:
    # Parameters are made in the model dtype (made in float32 and cast, an 8B model would pass
    # through 32 GB: four replicas sharing a GPU would not fit while loading); rotary tables are
    # float32 by construction (cast per use, as HF does).
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg, max_positions, ops, tp)
    gguf_file = find_gguf(model_dir) if load_format != "dummy" else None
    ct = read_ct_config(model_dir) if load_format != "dummy" and gguf_file is None else None
    if ct is not None:
        if quantization not in ("none", "compressed-tensors"):
            raise QuantizationError(
                f"{model_dir} is a compressed-tensors checkpoint (its weights are stored quantized); "
                f"quantization {quantization} cannot apply to them: leave it unset or say compressed-tensors"
            )
        kinds, parts = plan_layers(model, ct, device, quant_backend)
        log_notes(ct, model_dir)
        prepare_empty(model, kinds)
        model.load_weights(iter_ct_weights(iter_safetensors(Path(model_dir)), parts))
        finalize_model(model, quant_backend)
        quantize_logits_head(model, quant_backend)
        return model.eval()
    if quantization == "compressed-tensors":
        raise QuantizationError(
            f"quantization compressed-tensors reads a checkpoint whose config.json has a compressed-tensors "
            f"quantization_config, and {model_dir} has none; use int8, int4 or fp8 to quantize a float checkpoint"
        )
    saved = read_quant_config(model_dir) if load_format != "dummy" and gguf_file is None else None
    if quantization == "gguf":
        if gguf_file is None:
            raise QuantizationError(
                f"quantization gguf keeps a GGUF file's blocks, but {model_dir} is no GGUF model; "
                "use int8, int4 or fp8 for a float checkpoint"
            )
        prepare_empty(model, linear_kinds(gguf_file))
        model.load_weights(iter_gguf_quantized(gguf_file, cfg))
        finalize_model(model, quant_backend)
        quantize_logits_head(model, quant_backend)
        return model.eval()
    if saved is not None:
        if quantization not in ("none", saved["scheme"]):
            raise QuantizationError(
                f"{model_dir} holds {saved['scheme']} weights (written by kvfleet quantize); "
                f"quantization {quantization} cannot apply to them: leave it unset"
            )
        kinds = saved_layer_kinds(model, saved)
        kind = next(iter(kinds.values()))[0]
        check_device(kind, device)
        check_group_size(model, kind, saved["group_size"] or 1 << 30, get_backend(kind, device, "reference"))
        prepare_empty(model, kinds)
        model.load_weights(iter_safetensors(Path(model_dir)))
        finalize_model(model, quant_backend)
        quantize_logits_head(model, quant_backend)
        return model.eval()
    if quantization != "none":  # refuse before the (long) load what the device or shapes cannot run
        kind = scheme_kind(quantization)
        check_device(kind, device)
        check_group_size(model, kind, group_size, get_backend(kind, device, quant_backend))
    if load_format == "dummy":
        _fill_dummy(model, seed)
    elif gguf_file is not None:
        model.load_weights(iter_gguf_weights(gguf_file, cfg))
    else:
        model.load_weights(iter_safetensors(Path(model_dir)))
    if quantization != "none":
        batches = calibration_batches(model_dir) if quantization in ("int4-awq", "fp8-gptq") else None
        quantize_model(model, quantization, group_size, backend=quant_backend, calib_batches=batches)
        quantize_logits_head(model, quant_backend)
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-1e-3, 1e-3, generator=gen)
