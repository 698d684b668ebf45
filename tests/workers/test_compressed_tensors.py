"""compressed-tensors checkpoints (llm-compressor's format) read into the quantized layers: each
supported layout written here from the tiny Llama, loaded through the engine and held to the same
weights dequantized; every unsupported field refused with a sentence.

The writer below follows the format's definition (W = (q - zp) * scale, q signed; pack-quantized
stores q + 2**(bits - 1) densely in int32 words, low bits first; zero points packed along the rows),
independently of the reader in workers/quant/compressed_tensors.py. Scales are stored in bfloat16
as llm-compressor stores them in a bfloat16 model."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.config import EngineConfig
from workers.engine import Engine
from workers.quant import QuantizationError, backends
from workers.quant.compressed_tensors import CTConfig, iter_ct_weights, parse_ct_config, to_layout
from workers.quant.layers import _QuantLinear
from workers.request import GenerateRequest, SamplingParams

DEMO_DIR = Path(__file__).resolve().parents[2] / "cluster" / "demo_models" / "kvfleet-pycoder"
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Page:\n    def __init__(self", "x = [i * i for"]


# ---- the writer


def quantize_int(w: torch.Tensor, bits: int, group: int | None, symmetric: bool):
    """(q int8 [N, K], scale bf16 [N, G], zp int8 [N, G], dequantized float32 [N, K])."""
    n, k = w.shape
    g = group or k
    x = w.float().reshape(n, k // g, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = x.abs().amax(-1) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.round(qmin - lo / scale.to(torch.bfloat16).float()).clamp(qmin, qmax)
    scale = scale.to(torch.bfloat16)
    q = torch.round(x / scale.float()[..., None] + zp[..., None]).clamp(qmin, qmax)
    deq = ((q - zp[..., None]) * scale.float()[..., None]).reshape(n, k)
    return q.reshape(n, k).to(torch.int8), scale, zp.to(torch.int8), deq


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values [R, C] -> int32 [R, ceil(C * bits / 32)], value i at bits [bits*i, bits*(i+1))."""
    per = 32 // bits
    u = values.to(torch.int64) + (1 << (bits - 1))
    r, c = u.shape
    u = torch.nn.functional.pad(u, (0, -c % per)).reshape(r, -1, per)
    words = (u << (torch.arange(per) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantize_fp8(w: torch.Tensor, strategy: str):
    absmax = w.float().abs().amax(1, keepdim=True) if strategy == "channel" else w.float().abs().amax().reshape(1)
    scale = (absmax / 448.0).to(torch.bfloat16)
    q = (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale.float()


def write_ct(
    src: Path, dst: Path, fmt: str, weights: dict, act: dict | None = None, mlp: dict | None = None, **qcfg_extra
) -> dict:
    """Quantize `src`'s projections into a compressed-tensors checkpoint at `dst` (`mlp`: a second
    config group's weights for the MLPs); returns the dequantized weight of each projection
    (checkpoint name -> float32 [N, K])."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    out, deq = {}, {}
    attn_weights = weights
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in PROJS:
            out[name] = t
            continue
        weights = mlp if mlp and ".mlp." in module else attn_weights
        if weights["type"] == "float":
            q, scale, deq[module] = quantize_fp8(t, weights["strategy"])
            out.update({f"{module}.weight": q, f"{module}.weight_scale": scale})
            continue
        bits, sym = weights["num_bits"], weights.get("symmetric", True)
        q, scale, zp, deq[module] = quantize_int(t, bits, weights.get("group_size"), sym)
        out[f"{module}.weight_scale"] = scale
        if fmt == "pack-quantized":
            out[f"{module}.weight_packed"] = pack_int32(q, bits)
            out[f"{module}.weight_shape"] = torch.tensor(list(t.shape))
            if not sym:
                out[f"{module}.weight_zero_point"] = pack_int32(zp.T, bits).T.contiguous()
        else:
            out[f"{module}.weight"] = q
            if not sym:
                out[f"{module}.weight_zero_point"] = zp
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    groups = {
        "group_0": {"targets": ["Linear"], "weights": {"strategy": "group", **attn_weights}, "input_activations": act}
    }
    if mlp:
        groups["group_0"]["targets"] = ["re:.*self_attn\\..*"]
        groups["group_1"] = {"targets": ["re:.*mlp\\..*"], "weights": {"strategy": "group", **mlp}}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "sparsity_config": {}, **qcfg_extra,
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    return deq


def write_dequantized(src: Path, dst: Path, deq: dict) -> Path:
    """The float checkpoint of the same dequantized weights (the independent reference)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    tensors.update({f"{m}.weight": w for m, w in deq.items()})
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


# ---- running the engine


def generate(model: Path, max_tokens: int = 8, **overrides):
    options = {"device": "cpu", "page_size": 4, "num_pages": 128, "max_model_len": 128, **overrides}
    config = EngineConfig(model=str(model), **options)
    engine = Engine(config)

    async def main():
        try:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=1)
            ids = [engine.tokenizer.encode(p) for p in PROMPTS]
            return await asyncio.gather(*(engine.complete(GenerateRequest(i, params)) for i in ids))
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    assert engine.pool.num_free_pages == engine.pool.num_pages, "pages leaked"
    model = engine.runner.model
    return outs, {name: m for name, m in model.named_modules() if isinstance(m, _QuantLinear)}


def max_logprob_gap(a, b) -> float:
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    return max(
        abs(lx.chosen.logprob - ly.chosen.logprob)
        for x, y in zip(a, b, strict=True)
        for lx, ly in zip(x.logprobs, y.logprobs, strict=True)
    )


def merged_reference(deq: dict, layer_name: str) -> torch.Tensor:
    prefix, _, leaf = layer_name.rpartition(".")
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(leaf, (leaf,))
    return torch.cat([deq[f"{prefix}.{p}"] for p in parts])


W4 = {"type": "int", "num_bits": 4, "group_size": 32}
G4 = {"strategy": "group", **W4}
CASES = {
    "w4a16-group32-sym-packed": ("pack-quantized", W4, None, ("int4", 32)),
    "w4a16-group64-asym-packed": (
        "pack-quantized", {"type": "int", "num_bits": 4, "group_size": 64, "symmetric": False}, None, ("int4", 64),
    ),
    "w4a16-channel-packed": ("pack-quantized", {**W4, "group_size": None, "strategy": "channel"}, None, ("int4", None)),
    "w8a16-group32-packed": ("pack-quantized", {"type": "int", "num_bits": 8, "group_size": 32}, None, ("int8", 32)),
    "w8a8-dynamic-int-quantized": (
        "int-quantized", {"type": "int", "num_bits": 8, "strategy": "channel"},
        {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}, ("int8", None),
    ),
    "w4a16-group32-asym-naive": (
        "naive-quantized", {"type": "int", "num_bits": 4, "group_size": 32, "symmetric": False}, None, ("int4", 32),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_served_by_the_kernels_equals_its_dequantized_weights(case, tmp_path, monkeypatch):
    """On the trained demo model (a random tiny model's flat distributions tie too often for greedy
    equality under bfloat16 rounding): 4 code prompts x 8 tokens."""
    fmt, weights, act, (kind, group) = CASES[case]
    src = DEMO_DIR
    deq = write_ct(src, tmp_path / "ct", fmt, weights, act)

    kernel, layers = generate(tmp_path / "ct")  # quantization unset: auto-detected
    assert len(layers) == 10 * 4
    for name, m in layers.items():
        assert (m.kind, m.backend_name) == (kind, backends.get_backend(kind, torch.device("cpu")).name)
        # int4 channel scales (384 or 1024 columns) run as groups of 128 / 256 with repeated scales
        stored = group or m.in_features
        assert m.group_size == stored if kind == "int8" else stored % m.group_size == 0, name

    # the dequantized reference path: the same layouts, dequantized once, multiplied in float32
    for k in ("int4", "int8"):
        monkeypatch.setitem(backends._AVX2, k, backends.DEQUANTIZED)
        monkeypatch.setitem(backends._ATEN, k, backends.DEQUANTIZED)
    reference, ref_layers = generate(tmp_path / "ct", quantization="compressed-tensors")
    for name, m in ref_layers.items():  # the reader maps the checkpoint exactly onto the layouts
        torch.testing.assert_close(m._p0, merged_reference(deq, name), rtol=0, atol=0)
    # greedy identical; log-probabilities within the aten kernels' bfloat16 rounding: of scales and
    # zeros (int4), of each partial sum, and (int8 with groups) the per-channel requantization of
    # aten's int8 kernel, which the reference does not do
    gap = max_logprob_gap(kernel, reference)
    print(case, "kernel vs dequantized path: largest log-probability gap", gap)
    assert gap < (0.1 if kind == "int8" and group else 5e-2)
    monkeypatch.undo()

    if case not in ("w4a16-group64-asym-packed", "w8a8-dynamic-int-quantized"):
        return  # the weights were equal above: two formats suffice for the float comparison's cost
    # the float checkpoint of the writer's dequantized weights (no quantized code at all): same greedy
    # output, log-probabilities within the bf16 rounding of each layer's input and output
    floats, none = generate(write_dequantized(src, tmp_path / "float", deq))
    assert not none
    gap = max_logprob_gap(kernel, floats)
    print(case, "kernel vs float checkpoint: largest log-probability gap", gap)
    assert gap < 0.1


def test_tensor_parallel_shards_carry_their_scales(tmp_path):
    """TP=2 over gloo: column-parallel rows take their scales and zero points, row-parallel ranks
    their groups (a channel scale repeats over both ranks' shares)."""
    attn = {"type": "int", "num_bits": 4, "group_size": 32, "symmetric": False}
    mlp = {"type": "int", "num_bits": 8, "strategy": "channel"}
    write_ct(DEMO_DIR, tmp_path / "ct", "pack-quantized", attn, mlp=mlp)
    one, layers = generate(tmp_path / "ct", max_tokens=6)
    assert {(n.rpartition(".")[2], m.kind) for n, m in layers.items()} == {
        ("qkv_proj", "int4"),
        ("o_proj", "int4"),
        ("gate_up_proj", "int8"),
        ("down_proj", "int8"),
    }
    two, _ = generate(tmp_path / "ct", max_tokens=6, tensor_parallel_size=2)
    # each rank rounds its partial sums to bfloat16 before the all-reduce (as test_quant_model's TP test)
    assert max_logprob_gap(one, two) < 5e-2


def test_fp8_layouts(model_dirs):
    """fp8 float-quantized, channel and tensor scales, onto the per-row fp8 layout (its kernels need
    a GPU: the engine test below runs there)."""
    from safetensors.torch import load_file

    w = load_file(str(model_dirs["llama"] / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    for strategy in ("channel", "tensor"):
        q, scale, deq = quantize_fp8(w, strategy)
        ct = parse_ct_config(qcfg("float-quantized", {"type": "float", "num_bits": 8, "strategy": strategy}))
        scheme = ct.scheme_for("model.layers.0.mlp.down_proj")
        layout = to_layout(scheme, {"weight": q, "weight_scale": scale}, w.shape[1], "down_proj")
        assert layout.kind == "fp8" and layout.scales.shape == (w.shape[0],)
        torch.testing.assert_close(layout.dequantize(), deq, rtol=0, atol=0)


def test_fp8_checkpoint_refused_on_cpu(model_dirs, tmp_path):
    write_ct(
        model_dirs["llama"],
        tmp_path / "fp8",
        "float-quantized",
        {"type": "float", "num_bits": 8, "strategy": "channel"},
    )
    with pytest.raises(QuantizationError, match="fp8 needs a GPU"):
        generate(tmp_path / "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_dynamic_checkpoint_on_gpu(model_dirs, tmp_path):
    src = model_dirs["llama"]
    act = {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}
    deq = write_ct(
        src, tmp_path / "fp8", "float-quantized", {"type": "float", "num_bits": 8, "strategy": "channel"}, act
    )
    config = dict(device="cuda", dtype="bfloat16")
    kernel, layers = generate(tmp_path / "fp8", **config)
    assert {(m.kind, m.backend_name) for m in layers.values()} == {("fp8", "triton")}
    floats, _ = generate(write_dequantized(src, tmp_path / "float", deq), **config)
    assert max_logprob_gap(kernel, floats) < 0.1


# ---- refusals


def qcfg(fmt: str, weights: dict, act: dict | None = None, **extra) -> dict:
    group = {"targets": ["Linear"], "weights": {"strategy": "group", **weights}, "input_activations": act}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group},
            "ignore": ["lm_head"], **extra}  # fmt: skip


REFUSED = {
    "static int8 activations (W8A8 static)": (
        qcfg("int-quantized", {"type": "int", "num_bits": 8, "strategy": "channel"},
             {"type": "int", "num_bits": 8, "strategy": "tensor", "dynamic": False}),
        r"input_activations = .*static activation scales",
    ),
    "static fp8 activations": (
        qcfg("float-quantized", {"type": "float", "num_bits": 8, "strategy": "tensor"},
             {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}),
        r"input_activations = .*dynamic per-token",
    ),
    "fp8 block scales": (
        qcfg("float-quantized", {"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128]}),
        r"weights.strategy = 'block' .*channel or tensor",
    ),
    "asymmetric int8": (qcfg("pack-quantized", {"type": "int", "num_bits": 8, "group_size": 32, "symmetric": False}),
                        r"weights.symmetric = False .*asymmetric works for int4"),
    "3-bit": (qcfg("pack-quantized", {"type": "int", "num_bits": 3, "group_size": 32}), r"num_bits = 3"),
    "sparsity": (qcfg("pack-quantized", W4, sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    "unknown format": (qcfg("nvfp4-pack-quantized", W4), r"format = 'nvfp4-pack-quantized'"),
    "marlin": (qcfg("marlin-24", W4), r"format = 'marlin-24'"),
    "kv cache scales": (qcfg("pack-quantized", W4, kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_dtype"),
    "act order g_idx": (qcfg("pack-quantized", {**W4, "actorder": "group"}), r"actorder = 'group'"),
    "not compressed": (qcfg("pack-quantized", W4, quantization_status="frozen"), r"quantization_status = 'frozen'"),
    "output activations": (
        {**qcfg("pack-quantized", W4), "config_groups": {"g": {"targets": ["Linear"], "weights": G4,
                                                                "output_activations": {"num_bits": 8}}}},
        r"output_activations",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_refused_with_a_sentence(case):
    cfg, match = REFUSED[case]
    with pytest.raises(QuantizationError, match=match) as err:
        parse_ct_config(cfg, "/m")
    assert "compressed-tensors checkpoint /m" in str(err.value)


def _rewrite_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ct_int4(model_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "int4"
    write_ct(model_dirs["llama"], path, "pack-quantized", W4)
    return path


def _variant(ct_int4: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "variant"
    shutil.copytree(ct_int4, dst)
    _rewrite_config(dst, edit)
    return dst


def test_refusals_at_load(ct_int4, tmp_path, model_dirs):
    with pytest.raises(QuantizationError, match=r"compressed-tensors checkpoint .* quantization int8 cannot apply"):
        generate(ct_int4, quantization="int8")
    with pytest.raises(QuantizationError, match=r"quantization compressed-tensors reads .* has none"):
        generate(model_dirs["llama"], quantization="compressed-tensors")

    def group48(q):
        q["config_groups"]["group_0"]["weights"]["group_size"] = 48

    with pytest.raises(
        QuantizationError, match=r"layer model.layers.0.self_attn.qkv_proj .*group_size 48 does not divide"
    ):
        generate(_variant(ct_int4, tmp_path / "a", group48))

    def group16(q):
        q["config_groups"]["group_0"]["weights"]["group_size"] = 16

    with pytest.raises(QuantizationError, match=r"int4 group size 16 has no CPU kernel.* 32, 64, 128, 256"):
        generate(_variant(ct_int4, tmp_path / "b", group16))

    def lm_head_quantized(q):
        q["ignore"] = []

    with pytest.raises(QuantizationError, match=r"lm_head is quantized .* `ignore`"):
        generate(_variant(ct_int4, tmp_path / "c", lm_head_quantized))

    def k_proj_ignored(q):
        q["ignore"] = ["lm_head", "re:.*k_proj$"]

    with pytest.raises(QuantizationError, match=r"k_proj.* one layer model.layers.0.self_attn.qkv_proj"):
        generate(_variant(ct_int4, tmp_path / "d", k_proj_ignored))


def test_ignored_projections_stay_float(ct_int4, tmp_path, model_dirs):
    """`ignore` by regex: the MLPs keep the float weights the checkpoint stores for them."""
    from safetensors.torch import load_file, save_file

    dst = _variant(ct_int4, tmp_path, lambda q: q["ignore"].append("re:.*mlp\\..*"))
    tensors = load_file(str(dst / "model.safetensors"))
    floats = load_file(str(model_dirs["llama"] / "model.safetensors"))
    for name in list(tensors):
        if ".mlp." in name:
            del tensors[name]
    tensors.update({n: t for n, t in floats.items() if ".mlp." in n})
    save_file(tensors, str(dst / "model.safetensors"))
    _, layers = generate(dst, max_tokens=2)
    assert sorted({n.rpartition(".")[2] for n in layers}) == ["o_proj", "qkv_proj"]


def test_stray_tensor_refused(ct_int4, tmp_path):
    ct = parse_ct_config(qcfg("pack-quantized", W4))
    scheme = ct.scheme_for("model.layers.0.self_attn.q_proj")
    parts = {"model.layers.0.self_attn.q_proj": (scheme, 32)}
    stray = [("model.layers.0.self_attn.q_proj.input_scale", torch.ones(1))]
    with pytest.raises(QuantizationError, match=r"q_proj: tensor 'input_scale' is not read"):
        list(iter_ct_weights(stray, parts))
    with pytest.raises(QuantizationError, match=r"q_proj: the checkpoint lacks weight_packed"):
        list(iter_ct_weights([("model.layers.0.self_attn.q_proj.weight_scale", torch.ones(1))], parts))


def test_targets_and_ignore_patterns():
    cfg = qcfg("pack-quantized", W4)
    cfg["config_groups"]["group_0"]["targets"] = ["re:.*self_attn\\..*"]
    cfg["config_groups"]["group_1"] = {"targets": ["model.layers.1.mlp.down_proj"],
                                       "weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}  # fmt: skip
    ct: CTConfig = parse_ct_config(copy.deepcopy(cfg))
    assert ct.scheme_for("model.layers.0.self_attn.o_proj").kind == "int4"
    assert ct.scheme_for("model.layers.1.mlp.down_proj").kind == "int8"
    assert ct.scheme_for("model.layers.0.mlp.down_proj") is None
    assert ct.scheme_for("lm_head") is None


# ---- the package's own compressor, where it is installed (it is no dependency of kvfleet)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_packing_matches_the_compressed_tensors_package(bits, symmetric):
    ct_pkg = pytest.importorskip(
        "compressed_tensors.compressors.pack_quantized.base",
        reason="the compressed-tensors package is not installed (optional cross-check, not a kvfleet dependency)",
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    _, scale, zp, _ = quantize_int(w, bits, 32, symmetric)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": w, "weight_scale": scale.float()}  # bf16 values: every product exact in float32
    if not symmetric:
        state["weight_zero_point"] = zp
    packed = ct_pkg.PackedQuantizationCompressor.compress(state, scheme)
    ours = parse_ct_config(qcfg("pack-quantized", {"type": "int", "num_bits": bits, "group_size": 32,
                                                   "symmetric": symmetric})).scheme_for("x")  # fmt: skip
    layout = to_layout(ours, dict(packed), 32, "x")
    theirs = ct_pkg.PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    torch.testing.assert_close(layout.dequantize(), theirs.float(), rtol=0, atol=1e-6)
