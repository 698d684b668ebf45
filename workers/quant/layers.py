"""The quantized linear layers that replace a model's float ones (gpt-fast's quantize.py style: the
model file never changes, its `MergedLinear` and `RowParallelLinear` are swapped in place):

- `QuantMergedLinear`: the column-parallel QKV / gate-up projection, its rows the checkpoint
  tensors' rows side by side (a rank's share of each under tensor parallelism);
- `QuantRowParallelLinear`: o_proj / down_proj, this rank's slice of the input columns (whole
  groups of them), one all-reduce after the matmul, the bias once after it.

Life of one: built empty (a GGUF or saved quantized checkpoint loads into it part by part, as the
float layers load) or from a float layer (round-to-nearest), then `finalize(backend)` hands the
`QuantWeight` to the backend's `prepare` once; `forward` only calls its matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers.parallel import TPInfo, full, read_cols, read_rows, shape_of, split
from workers.quant.backends import Backend, dense_dtype
from workers.quant.layout import Kind, QuantizationError, QuantWeight, empty, quantize_rtn

_LEAVES = ("qweight", "scales", "zeros")


def _bound_args(module: nn.Module) -> list:
    """A prepared layer's matmul arguments: its buffers read straight from `_buffers` (nn.Module's
    `__getattr__` fallback costs a few microseconds a lookup, 4-5 lookups a layer on every step)."""
    buffers = module._buffers
    return [buffers[a] if isinstance(a, str) else a[0] for a in module._args]


class _QuantLinear(nn.Module):
    loads_itself = True  # LlamaForCausalLM.load_weights hands it its checkpoint tensors by leaf name

    def __init__(self, kind: Kind, out_features: int, in_features: int, group_size: int, bias: bool, device=None):
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.layout: QuantWeight | None = empty(kind, out_features, in_features, group_size, device)
        self.group_size = self.layout.group_size
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.backend_name = ""
        self._args: list = []  # the backend's prepared arguments: a buffer's name, or a plain value
        self._loaded: set[tuple[int, str]] = set()

    # ---- after loading
    def missing(self) -> list[str]:
        return [f"{part}:{leaf}" for part, leaf in self._expected() if (part, leaf) not in self._loaded]

    def finalize(self, backend: Backend, keep_layout: bool = False) -> None:
        """Prepare the backend's tensors from the layout (once); drop the layout unless kept (the
        reference backend computes from it, and saving needs it)."""
        prepared = backend.prepare(self.layout)
        self._args = []
        for i, value in enumerate(prepared):
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"_p{i}", value, persistent=False)
                self._args.append(f"_p{i}")
            else:
                self._args.append((value,))
        self._matmul = backend.matmul
        self.backend_name = backend.name
        if not keep_layout:
            self.layout = None

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        args = _bound_args(self)
        if x.dim() == 2:  # the runner's flattened tokens: no reshapes (two dispatcher calls a matmul)
            return self._matmul(x, *args)
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]), *args)
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}, group={self.group_size}"
        return f"{self.kind}, {shape}, backend={self.backend_name or '-'}"


class QuantMergedLinear(_QuantLinear):
    def __init__(self, parts, in_features: int, kind: Kind, group_size: int, bias: bool, device=None):
        self.parts = [(p, 0, p) if isinstance(p, int) else tuple(p) for p in parts]
        self.part_sizes = [rows for _, _, rows in self.parts]
        self.offsets = [0]
        for size in self.part_sizes:
            self.offsets.append(self.offsets[-1] + size)
        super().__init__(kind, self.offsets[-1], in_features, group_size, bias, device)

    @classmethod
    def from_float(cls, layer, kind: Kind, group_size: int, quantize) -> QuantMergedLinear:
        """From a loaded `MergedLinear`: `quantize(weight) -> QuantWeight`."""
        out = cls(layer.parts, layer.weight.shape[1], kind, group_size, layer.bias is not None, layer.weight.device)
        out.layout = quantize(layer.weight.data)
        if layer.bias is not None:
            out.bias.data = layer.bias.data.clone()  # its dtype too
        out._loaded = set(out._expected())
        return out

    def _expected(self):
        leaves = ["weight"] + (["bias"] if self.bias is not None else [])
        return [(part, leaf) for part in range(len(self.parts)) for leaf in leaves]

    def load_part(self, part: int, name: str, tensor) -> None:
        """`name` 'weight' with a `QuantWeight` (GGUF blocks), 'bias', or a leaf of a saved
        quantized checkpoint ('qweight', 'scales', 'zeros')."""
        checkpoint_rows, start, rows = self.parts[part]
        lo = self.offsets[part]
        if isinstance(tensor, QuantWeight):
            if tensor.kind != self.kind or tensor.shape[1] != self.in_features or tensor.shape[0] != checkpoint_rows:
                raise QuantizationError(
                    f"part {part}: a {tensor.kind} weight of shape {tensor.shape} does not fit this {self.kind} "
                    f"layer of {checkpoint_rows} x {self.in_features}"
                )
            src, dst = tensor.rows(start, rows), self.layout.rows(lo, rows)
            for leaf, t in dst.tensors().items():
                t.copy_(getattr(src, leaf))
            self._loaded.add((part, "weight"))
            return
        if shape_of(tensor)[0] != checkpoint_rows:
            raise ValueError(f"part {part} of {name}: expected {checkpoint_rows} rows, got {shape_of(tensor)}")
        if name == "bias":
            self.bias.data[lo : lo + rows].copy_(read_rows(tensor, start, rows))
            self._loaded.add((part, "bias"))
            return
        if name not in _LEAVES or name not in self.layout.tensors():
            raise QuantizationError(f"a {self.kind} layer has no tensor {name!r}")
        self.layout.rows(lo, rows).tensors()[name].copy_(read_rows(tensor, start, rows))
        self._loaded.add((part, name))
        if all((part, leaf) in self._loaded for leaf in self.layout.tensors()):
            self._loaded.add((part, "weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized_matmul(x)
        return y if self.bias is None else y + self.bias


class QuantRowParallelLinear(_QuantLinear):
    def __init__(
        self, in_features: int, out_features: int, kind: Kind, group_size: int, bias: bool, tp: TPInfo, device=None
    ):
        self.in_start, in_size = split(in_features, tp)
        super().__init__(kind, out_features, in_size, group_size, bias, device)
        self.tp = tp

    @classmethod
    def from_float(cls, layer, kind: Kind, group_size: int, quantize) -> QuantRowParallelLinear:
        n = layer.weight.shape[0]
        out = cls(
            layer.in_size * layer.tp.size, n, kind, group_size, layer.bias is not None, layer.tp, layer.weight.device
        )
        out.layout = quantize(layer.weight.data)
        if layer.bias is not None:
            out.bias.data = layer.bias.data.clone()  # its dtype too
        out._loaded = set(out._expected())
        return out

    def _expected(self):
        return [(0, "weight")] + ([(0, "bias")] if self.bias is not None else [])

    def load(self, name: str, tensor) -> None:
        if isinstance(tensor, QuantWeight):
            if tensor.kind != self.kind or tensor.shape[0] != self.out_features:
                raise QuantizationError(
                    f"a {tensor.kind} weight of shape {tensor.shape} does not fit this {self.kind} layer"
                )
            src = tensor.cols(self.in_start, self.in_features)
            for leaf, t in self.layout.tensors().items():
                t.copy_(getattr(src, leaf))
            self._loaded.add((0, "weight"))
        elif name == "bias":
            self.bias.data.copy_(tensor if isinstance(tensor, torch.Tensor) else tensor[:])
            self._loaded.add((0, "bias"))
        elif name in _LEAVES and name in self.layout.tensors():
            t = self.layout.tensors()[name]
            if name == "scales" and self.kind == "fp8":
                t.copy_(full(tensor))  # per output row: every rank holds them all
            else:
                per = (2 if self.kind == "int4" else 1) if name == "qweight" else self.group_size
                t.copy_(read_cols(tensor, self.in_start // per, self.in_features // per))
            self._loaded.add((0, name))
            if all((0, leaf) in self._loaded for leaf in self.layout.tensors()):
                self._loaded.add((0, "weight"))
        else:
            raise QuantizationError(f"a {self.kind} layer has no tensor {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.quantized_matmul(x))
        return y if self.bias is None else y + self.bias


class QuantLogitsHead(nn.Module):
    """The logits matmul of a CPU model whose projections are quantized. On SmolLM2-135M the LM head
    (the tied embedding, 49152 x 576) is the largest weight: 113 MB in float32, read whole every
    decode step, about a fifth of a batch-1 step. Here it is read in int8, one scale per vocabulary
    row (the GGUF stores it as Q8_0, and llama.cpp multiplies it in 8 bits too), through the int8
    backend; past `MAX_INT8_ROWS` rows aten's int8 kernel (a matrix-vector loop) is slower than
    oneDNN's bfloat16 matmul of the same values, which the aten backend therefore keeps as well
    (measured 2026-12-05 on AMX, 2 threads: int8 0.9 / 1.6 / 6.3 ms at 1 / 4 / 16 rows, bfloat16 1.9 /
    2.4 / 2.4, float32 2.5 / 5.6 / 9.1; both copies together take 85 MB, less than the float32 head).
    A CPU without bfloat16 arithmetic (`dense_dtype` float32, e.g. AVX2) keeps no bfloat16 copy: there
    bfloat16 is the slowest (AVX2 EPYC, 1 thread, 16 rows: bfloat16 284 ms, float32 61-83, int8 60-83;
    int8 10 / 11 / 17 / 32 ms at 1 / 2 / 4 / 8 rows against float32's 13 / 27 / 47 / 89), so int8
    serves up to `MAX_INT8_ROWS_FLOAT32` rows and the float rows of the embedding beyond. The avx2
    backend (workers/kernels/cpu_quant.cpp) serves every row count in int8 (same EPYC, 1 thread: 3.8 ms
    at 1 row, 32 at 16, against float32's 13 and 61), so it keeps no dense copy.

    The kernels return bfloat16, whose steps near a logit of 20 are 0.125: greedy decoding would
    meet ties, and log-probabilities would move in steps. So the `REFINED_TOKENS` highest logits of
    each row are computed again in float32 from the float rows the embedding keeps (0.1 ms at one
    row): the tokens that decide greedy choices, top-k/top-p draws and the reported log-probabilities
    get the float model's exact logits; the rest of the vocabulary (the softmax normalizer's tail)
    keeps the 8-bit estimate. Tensor parallelism 1 only. Not a `_QuantLinear`: no scheme rewrites
    it and no checkpoint saves it."""

    MAX_INT8_ROWS = 4
    MAX_INT8_ROWS_FLOAT32 = 16
    REFINED_TOKENS = 32

    def __init__(self, weight: torch.Tensor, backend: Backend):
        super().__init__()
        self.float_weight = weight.detach()  # the embedding's storage, no copy (and no parameter here)
        layout = quantize_rtn(weight.detach().float(), "int8", weight.shape[1])
        # aten's int8 kernel takes bfloat16 scales: round them here, so that every backend (and the
        # dequantized reference of the tests) multiplies by the same ones
        layout.scales = layout.scales.to(torch.bfloat16).float()
        self._args: list = []
        for i, value in enumerate(backend.prepare(layout)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"_p{i}", value, persistent=False)
                self._args.append(f"_p{i}")
            else:
                self._args.append((value,))
        self._matmul = backend.matmul
        self.backend_name = backend.name
        # the matmul of many rows: a bfloat16 copy, or the float rows themselves (`dense is None`)
        self.many_rows = backend.name == "aten"
        bf16 = self.many_rows and dense_dtype() == torch.bfloat16
        self.max_int8_rows = self.MAX_INT8_ROWS if bf16 else self.MAX_INT8_ROWS_FLOAT32
        self.register_buffer("dense", layout.dequantize().to(torch.bfloat16) if bf16 else None, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        if self.many_rows and x.shape[0] > self.max_int8_rows:
            dense = self.float_weight if self.dense is None else self.dense
            logits = torch.nn.functional.linear(x.to(dense.dtype), dense).float()
        else:
            logits = self._matmul(x, *_bound_args(self)).float()
        top = logits.topk(min(self.REFINED_TOKENS, logits.shape[-1]), dim=-1).indices
        rows = self.float_weight[top]  # [tokens, refined, hidden]
        exact = torch.bmm(rows, x.to(rows.dtype)[:, :, None])[..., 0]
        logits.scatter_(1, top, exact.float())
        return logits.reshape(*shape[:-1], logits.shape[-1])
