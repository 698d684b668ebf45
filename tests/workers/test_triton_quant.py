"""The Triton quantized matmuls (workers/kernels/triton_quant.py) against quant_reference.py. On CPU
they run in Triton's interpreter on tiny shapes (float32 and float16: the interpreter's bfloat16
dot is wrong); on a GPU the same tests run compiled, on Llama-3-8B-like shapes and in bfloat16 too."""

import pytest
import torch

from workers.kernels import quant_reference as ref
from workers.kernels import triton_quant as tq

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# (M, N, K, group): decode rows and prefill rows, N not a multiple of the tiles
SHAPES = (
    [(1, 4096, 4096, 128), (16, 6144, 4096, 128), (37, 1000, 14336, 128), (512, 4096, 4096, 32)]
    if GPU
    else [
        (1, 40, 128, 32),
        (3, 24, 256, 128),
        (17, 48, 128, 64),
        (70, 40, 64, 32),
    ]
)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(DEVICE), torch.randn(1, k, generator=g)


def _x(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(DEVICE, dtype)


def _assert_close(got, want, tol):
    """Max error relative to the largest output: the kernels sum exact products in float32, the
    reference too; what differs is the order of the sums and the final rounding to x's dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * want.float().abs().max().item(), (err, want.float().abs().max().item())


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "group"), SHAPES)
def test_int4_matmul_matches_reference(m, n, k, group, dtype):
    w, _ = _weights(n, k, seed=n + k)
    q, s, z = ref.quantize_int4(w, group)
    x = _x(m, k, dtype)
    _assert_close(tq.int4_matmul(x, *tq.prepare_int4(q, s, z)), ref.w4a16_matmul(x, q, s, z), _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "group"), SHAPES)
def test_int8_matmul_matches_reference(m, n, k, group, dtype):
    w, _ = _weights(n, k, seed=n + k + 1)
    for g in (group, k):  # group-wise and per channel
        q, s = ref.quantize_int8(w, g)
        x = _x(m, k, dtype)
        _assert_close(tq.int8_matmul(x, *tq.prepare_int8(q, s)), ref.w8a16_matmul(x, q, s), _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "group"), SHAPES)
def test_fp8_weight_only_matmul_matches_reference(m, n, k, group, dtype):
    w, _ = _weights(n, k, seed=n + k + 2)
    q, s = ref.quantize_fp8(w)
    x = _x(m, k, dtype)
    _assert_close(tq.fp8_matmul(x, *tq.prepare_fp8(q, s), scaled_mm=False), ref.fp8_matmul(x, q, s), _tol(dtype))


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_partials_sum_to_the_unsplit_result(split_k):
    m, n, k = 5, 40, 512 if not GPU else 4096
    w, _ = _weights(n, k, seed=7)
    q, s, z = ref.quantize_int4(w, 64)
    x = _x(m, k, torch.float32)
    cfg = tq.MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=split_k)
    got = tq.int4_matmul(x, *tq.prepare_int4(q, s, z), config=cfg)
    _assert_close(got, ref.w4a16_matmul(x, q, s, z), 1e-5)
    # the last split of each tile resets its counter: the next call (or graph replay) starts at zero
    assert int(tq._tile_locks(x.device).abs().sum()) == 0
    _assert_close(tq.int4_matmul(x, *tq.prepare_int4(q, s, z), config=cfg), got, 0)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
@pytest.mark.parametrize(("block_n", "block_k", "split_k"), [(8, 64, 1), (16, 128, 2), (32, 64, 3)])
def test_one_row_gemv_tiles_and_k_splits_match_the_reference(scheme, block_n, block_k, split_k):
    """Batch-1 decode takes triton_gemv's kernel (no 16-row tile): each tiling of N and K and each
    split of K sums to the reference, and the split counters are back at zero after the call."""
    n, k, group = 40, 384, 64  # N not a multiple of the column block; 6 K tiles of 64 split 3 ways
    w, _ = _weights(n, k, seed=11)
    x = _x(1, k, torch.float32)
    cfg = tq.GemvConfig(block_n, block_k, split_k)
    if scheme == "int4":
        qs = ref.quantize_int4(w, group)
        got, want = tq.int4_matmul(x, *tq.prepare_int4(*qs), config=cfg), ref.w4a16_matmul(x, *qs)
    elif scheme == "int8":
        qs = ref.quantize_int8(w, group)
        got, want = tq.int8_matmul(x, *tq.prepare_int8(*qs), config=cfg), ref.w8a16_matmul(x, *qs)
    else:
        qs = ref.quantize_fp8(w)
        got, want = tq.fp8_matmul(x, *tq.prepare_fp8(*qs), config=cfg, scaled_mm=False), ref.fp8_matmul(x, *qs)
    _assert_close(got, want, 1e-5)
    assert int(tq._tile_locks(x.device).abs().sum()) == 0


def test_a_gemv_tile_that_does_not_fit_k_or_the_group_is_refused():
    w, _ = _weights(8, 192, seed=0)
    q, s = ref.quantize_int8(w, 64)
    with pytest.raises(ValueError, match="does not fit K 192"):
        tq.int8_matmul(_x(1, 192, torch.float32), *tq.prepare_int8(q, s), config=tq.GemvConfig(8, 128, 1))


def test_layouts_the_kernels_cannot_run_are_refused_with_what_would_work():
    w, _ = _weights(8, 64, seed=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        tq.prepare_int4(*ref.quantize_int4(w, 16))
    q, s = ref.quantize_int8(w, 64)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        tq.int8_matmul(_x(2, 32, torch.float32), *tq.prepare_int8(q, s))


def test_pick_config_splits_k_for_decode_and_tiles_prefill_without_split():
    cpu = torch.device("cpu")
    decode = tq.pick_config(1, 4096, 4096, 128, cpu)
    assert decode.block_m == 16 and decode.split_k > 1
    assert tq.pick_config(1, 128256, 4096, 128, cpu).split_k == 1  # enough output tiles already
    prefill = tq.pick_config(512, 4096, 4096, 128, cpu)
    assert prefill.block_m == 128 and prefill.split_k == 1
    assert tq.pick_config(16, 4096, 4096, 32, cpu).block_k == 32  # a K tile stays inside its group
    # the H200 sweep's best int4 decode tiles (o: 4096 -> 4096, down: 14336 -> 4096)
    assert tq.pick_config(1, 4096, 4096, 128, cpu, int4=True) == tq.MatmulConfig(16, 128, 128, 8)
    assert tq.pick_config(1, 4096, 14336, 128, cpu, int4=True) == tq.MatmulConfig(16, 128, 128, 16)


@needs_gpu
@pytest.mark.skipif(GPU and torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores")
@pytest.mark.parametrize("m", [128, 512])
def test_fp8_scaled_mm_with_per_token_scales_is_close_to_the_weight_only_reference(m):
    w, _ = _weights(4096, 4096, seed=3)
    q, s = ref.quantize_fp8(w)
    x = _x(m, 4096, torch.bfloat16)
    got = tq.fp8_matmul(x, *tq.prepare_fp8(q, s))  # W8A8 from FP8_SCALED_MM_MIN_M rows
    want = ref.fp8_matmul(x, q, s)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 0.05, rel  # activations rounded to E4M3: about 2**-5 relative per element


@needs_gpu
@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_decode_matmuls_replay_in_a_cuda_graph(scheme, m):
    w, _ = _weights(4096, 4096, seed=5)
    if scheme == "int4":
        qs = ref.quantize_int4(w, 128)
        prepared, fn, oracle = tq.prepare_int4(*qs), tq.int4_matmul, ref.w4a16_matmul
    elif scheme == "int8":
        qs = ref.quantize_int8(w, 128)
        prepared, fn, oracle = tq.prepare_int8(*qs), tq.int8_matmul, ref.w8a16_matmul
    else:
        qs = ref.quantize_fp8(w)
        prepared, fn, oracle = tq.prepare_fp8(*qs), tq.fp8_matmul, ref.fp8_matmul
    x = _x(m, 4096, torch.bfloat16)
    fn(x, *prepared)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x, *prepared)
    x.copy_(_x(m, 4096, torch.bfloat16, seed=1))
    graph.replay()
    _assert_close(y, fn(x, *prepared), 1e-3)  # the replay computes what an eager call computes
    if scheme != "fp8" or m < tq.FP8_SCALED_MM_MIN_M:
        # W8A8 also rounds the activations: its accuracy is the scaled_mm test's (above)
        _assert_close(y, oracle(x, *qs), 1e-2)
