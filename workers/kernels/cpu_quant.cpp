// Weight-only int8 / int4 matmuls for x86 CPUs with AVX2 and FMA: y[M, N] = x[M, K] @ W[N, K]^T,
// W dequantized on the fly from the tile layout workers/kernels/cpu_quant.py packs at load.
//
// Why this layout: a decode step reads every weight once and multiplies it with 1..64 rows of x, so
// the kernel is bound by weight bytes at one row and by FMAs at many. Output rows are packed in tiles
// of 16 (two AVX2 vectors), column after column, so one 16-byte load (int8) or one 16-byte load per
// column pair (int4: low nibble column 2j, high 2j + 1) gives the 16 weights of one input column,
// which are converted to float once and multiplied with up to 6 rows of x (register tile 6 x 16).
// Group scales (and int4 zeros) are float32 [tiles, groups, 16]; a group's partial sums are scaled
// once at its end: y = sum_g s_g * sum_{k in g} x_k q_k (+ z'_g * sum_{k in g} x_k for int4, with
// z' = z - 8 s, so (q - 8) s + z costs nothing per weight).
//
// x and y are rounded to bfloat16 (held in float32) as the reference and aten's kernels round them;
// the sums are float32. Threads: at::parallel_for over tiles (torch's own OpenMP pool and
// torch.set_num_threads).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kTile = 16;    // output rows per tile: two 8-float vectors
constexpr int kRowBlock = 6;     // rows of x per register tile: 12 accumulators + 2 weights + 1 x
constexpr int64_t kRowChunk = 60;  // rows of x kept hot while a thread walks its tiles

inline float round_bf16(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7f800000u) == 0x7f800000u) {
    b = (b & 0x007fffffu) ? 0x7fc00000u : (b & 0xffff0000u);  // NaN stays NaN, inf stays inf
  } else {
    b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;  // round to nearest even
  }
  std::memcpy(&v, &b, 4);
  return v;
}

// The 16 weights of input column k of one tile, as two float vectors (rows 0-7, 8-15).
template <bool kInt4>
inline void load_column(const uint8_t* w, int64_t k, __m256& lo, __m256& hi) {
  if constexpr (kInt4) {
    const uint8_t* p = w + (k >> 1) * kTile;
    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    if (k & 1) {
      a = _mm256_srli_epi32(a, 4);
      b = _mm256_srli_epi32(b, 4);
    } else {
      a = _mm256_and_si256(a, mask);
      b = _mm256_and_si256(b, mask);
    }
    lo = _mm256_cvtepi32_ps(a);
    hi = _mm256_cvtepi32_ps(b);
  } else {
    const uint8_t* p = w + k * kTile;
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
}

// y[MB rows, 16 tile rows] of one tile. A: accumulator sets, so that few rows still give the FMA
// units 8+ independent chains (one row: 4 sets x 2 vectors).
template <int MB, bool kInt4>
void tile_rows(const float* x, int64_t ldx, const uint8_t* w, const float* scales, const float* zeros,
               const float* xsum, int64_t groups, int64_t group_size, float* y, int64_t ldy, int64_t valid) {
  constexpr int A = MB == 1 ? 4 : (MB <= 3 ? 2 : 1);
  constexpr int U = A < 2 ? 2 : A;  // columns per inner iteration (int4 decodes column pairs)
  __m256 total[MB][2];
  for (int m = 0; m < MB; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[A][MB][2];
    for (int a = 0; a < A; ++a)
      for (int m = 0; m < MB; ++m) acc[a][m][0] = acc[a][m][1] = _mm256_setzero_ps();
    const int64_t end = (g + 1) * group_size;
    for (int64_t k = g * group_size; k < end; k += U) {
      for (int u = 0; u < U; ++u) {
        __m256 lo, hi;
        load_column<kInt4>(w, k + u, lo, hi);
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k + u);
          acc[u % A][m][0] = _mm256_fmadd_ps(xv, lo, acc[u % A][m][0]);
          acc[u % A][m][1] = _mm256_fmadd_ps(xv, hi, acc[u % A][m][1]);
        }
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scales + g * kTile), s1 = _mm256_loadu_ps(scales + g * kTile + 8);
    for (int m = 0; m < MB; ++m) {
      __m256 sum0 = acc[0][m][0], sum1 = acc[0][m][1];
      for (int a = 1; a < A; ++a) {
        sum0 = _mm256_add_ps(sum0, acc[a][m][0]);
        sum1 = _mm256_add_ps(sum1, acc[a][m][1]);
      }
      total[m][0] = _mm256_fmadd_ps(sum0, s0, total[m][0]);
      total[m][1] = _mm256_fmadd_ps(sum1, s1, total[m][1]);
      if constexpr (kInt4) {
        const __m256 xs = _mm256_broadcast_ss(xsum + m * groups + g);
        total[m][0] = _mm256_fmadd_ps(xs, _mm256_loadu_ps(zeros + g * kTile), total[m][0]);
        total[m][1] = _mm256_fmadd_ps(xs, _mm256_loadu_ps(zeros + g * kTile + 8), total[m][1]);
      }
    }
  }
  alignas(32) float out[kTile];
  for (int m = 0; m < MB; ++m) {
    _mm256_store_ps(out, total[m][0]);
    _mm256_store_ps(out + 8, total[m][1]);
    for (int64_t j = 0; j < valid; ++j) y[m * ldy + j] = round_bf16(out[j]);
  }
}

template <bool kInt4>
void rows_of_tile(int64_t rows, const float* x, int64_t ldx, const uint8_t* w, const float* scales,
                  const float* zeros, const float* xsum, int64_t groups, int64_t group_size, float* y, int64_t ldy,
                  int64_t valid) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
    const int64_t mb = std::min<int64_t>(kRowBlock, rows - m0);
    const float* xm = x + m0 * ldx;
    const float* xs = kInt4 ? xsum + m0 * groups : nullptr;
    float* ym = y + m0 * ldy;
    switch (mb) {
#define KVF_ROWS(R) \
  case R:           \
    tile_rows<R, kInt4>(xm, ldx, w, scales, zeros, xs, groups, group_size, ym, ldy, valid); break;
      KVF_ROWS(1) KVF_ROWS(2) KVF_ROWS(3) KVF_ROWS(4) KVF_ROWS(5) KVF_ROWS(6)
#undef KVF_ROWS
    }
  }
}

torch::Tensor quant_matmul(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& zeros, int64_t n) {
  const bool int4 = zeros.has_value();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "cpu_quant: x must be float32 [M, K]");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kTile && w.is_contiguous(), "cpu_quant: w must be packed [tiles, cols, 16]");
  const int64_t M = x.size(0), K = x.size(1), tiles = w.size(0), groups = scales.size(1);
  TORCH_CHECK(w.size(1) == (int4 ? K / 2 : K), "cpu_quant: weight has ", w.size(1), " columns for K = ", K);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == tiles && scales.size(2) == kTile &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "cpu_quant: scales must be float32 [tiles, groups, 16]");
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 4 == 0, "cpu_quant: group size must divide K, by 4s");
  TORCH_CHECK(n > (tiles - 1) * kTile && n <= tiles * kTile, "cpu_quant: n = ", n, " does not fit ", tiles, " tiles");
  const int64_t group_size = K / groups;

  // x rounded to bfloat16 once (and, for int4, each row's sum over every group)
  auto xr = at::empty({M, K}, x.options());
  const auto xc = x.contiguous();
  const float* xs_src = xc.data_ptr<float>();
  float* xp = xr.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) xp[i] = round_bf16(xs_src[i]);
  at::Tensor xsum;
  if (int4) {
    TORCH_CHECK(zeros->sizes() == scales.sizes() && zeros->scalar_type() == at::kFloat && zeros->is_contiguous(),
                "cpu_quant: zeros must match scales");
    xsum = xr.view({M, groups, group_size}).sum(-1).contiguous();
  }
  auto y = at::empty({M, n}, x.options());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const float* zp = int4 ? zeros->data_ptr<float>() : nullptr;
  const float* xsp = int4 ? xsum.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t tile_bytes = w.size(1) * kTile;
  // at least ~64 KB of weights per thread: below that the pool's wake-up costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (tile_bytes * std::max<int64_t>(1, M / 4)));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, M - m0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t valid = std::min(kTile, n - t * kTile);
        auto run = int4 ? rows_of_tile<true> : rows_of_tile<false>;
        run(rows, xp + m0 * K, K, wp + t * tile_bytes, sp + t * groups * kTile, int4 ? zp + t * groups * kTile : nullptr,
            int4 ? xsp + m0 * groups : nullptr, groups, group_size, yp + m0 * n + t * kTile, n, valid);
      }
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", &quant_matmul,
        "y = round_bf16(round_bf16(x) @ W^T), W int8 (zeros None) or int4 in cpu_quant.py's tile layout");
}
