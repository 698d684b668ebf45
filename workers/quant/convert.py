"""`kvfleet quantize`'s work: load a float Hugging Face checkpoint on the CPU, apply a scheme
(int4-awq and fp8-gptq calibrate on the shipped text first), write the quantized checkpoint (checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.kernels.ops import get_ops
from workers.models.config import ModelConfig
from workers.models.gguf_file import find_gguf
from workers.models.loader import load_model
from workers.quant.checkpoint import read_quant_config, save_quantized
from workers.quant.layout import QuantizationError
from workers.quant.quantize import calibration_batches, quantize_model


def quantize_checkpoint(
    src: str | Path, dst: str | Path, scheme: str, group_size: int = 128, calib: dict | None = None
) -> dict:
    """Load a float Hugging Face checkpoint on the CPU, quantize it (reference layout: int8 keeps its
    groups), save it; returns a summary (and the calibration report for int4-awq / fp8-gptq)."""
    if find_gguf(src) is not None:
        raise QuantizationError(f"{src} is a GGUF file: serve it with quantization: gguf instead of requantizing it")
    if read_quant_config(src) is not None:
        raise QuantizationError(f"{src} is already quantized")
    cfg = ModelConfig.from_dir(src)
    cpu = torch.device("cpu")
    model = load_model(src, cfg, torch.float32, cpu, min(cfg.max_position_embeddings, 4096), get_ops("torch", cpu))
    batches = None
    if scheme in ("int4-awq", "fp8-gptq"):
        batches = calibration_batches(src, **(calib or {}))
    # the reference backend keeps the layout as it is (int8 keeps its groups, fp8 is allowed on a CPU)
    report = quantize_model(model, scheme, group_size, backend="reference", calib_batches=batches, keep_layout=True)
    save_quantized(model, src, dst, scheme, None if scheme.startswith("fp8") else group_size)
    return {"scheme": scheme, "group_size": group_size, "dst": str(dst), "awq": report}
