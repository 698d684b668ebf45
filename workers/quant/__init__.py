"""Quantized weights (issue 18): schemes applied at load, their layers, kernels by device, GGUF
blocks kept quantized and quantized checkpoints. Public API:

- `quantize_model(model, scheme, group_size=128, *, backend="auto", calib_batches=None,
  keep_layout=False)`: in place, any device; schemes `SCHEMES` (fp8, fp8-gptq, int8, int4, int4-awq).
- `QuantWeight` (layout.py): one weight in the contract layout of workers/kernels/quant_reference.py.
- `QuantizationError`: a setting this model or device cannot run, with what would work.
- `quantize_checkpoint(src, dst, scheme, group_size)` / `read_quant_config(dir)` (checkpoint.py).
"""

from workers.quant.layout import QuantizationError, QuantWeight
from workers.quant.quantize import SCHEMES, quantize_model

__all__ = ["SCHEMES", "QuantWeight", "QuantizationError", "quantize_model"]
