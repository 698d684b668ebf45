// Weight-only int8 / int4 matmuls for x86 CPUs with AVX2 and FMA: y[M, N] = x[M, K] @ W[N, K]^T,
// W dequantized on the fly from the tile layout workers/kernels/cpu_quant.py packs at load.
//
// Why this shape: a decode step reads every weight once and multiplies it with 1..64 rows of x, so
// the kernel is bound by instructions per weight (an AVX2 core of the EPYC we target retires ~2.3G
// vector ops/s, its DRAM gives one core ~12 GB/s). Converting each weight to float (widen, convert,
// FMA: 3 ops per 8) left one row at 5 GB/s; here x is made int16 instead and `vpmaddwd` multiplies 16
// int16 weights with two columns of x and adds pairs in one op (widen, madd, add: 3 ops per 16).
// x is rounded to bfloat16 first, as the reference rounds it, and a bfloat16 value within 2^7 of its
// 32-column group's largest is exact in int16 under a power-of-two scale, so each 32-column sum is
// exact in int32 (smaller values round at 2^-15 of the largest); sums over groups are float32. Group
// scales (and int4 zeros, as z' = z - 8 s) are float32 [tiles, groups, 16], applied once per group:
// y = sum_g s_g * sum_{k in g} x_k q_k (+ z'_g * sum_{k in g} x_k for int4). y is rounded to bfloat16.
// Output rows come in tiles of 16 (two 8-lane vectors); up to 4 rows of x share each widened weight.
// Threads: at::parallel_for over tiles (torch's own OpenMP pool, so torch.set_num_threads holds).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t kTile = 16;      // output rows per tile: two vectors of 8 int32 / float lanes
constexpr int64_t kXGroup = 32;    // columns of x that share one power-of-two int16 scale
constexpr int kRowBlock = 4;       // rows of x per register tile
constexpr int64_t kRowChunk = 64;  // rows of x kept hot while a thread walks its tiles

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

// One row of x, rounded to bfloat16, as int16 with one power-of-two scale per 32 columns: 2^(14 - E)
// for a group whose largest magnitude is in [2^E, 2^(E+1)). A bfloat16 value carries 8 significant
// bits, so every value within 2^7 of its group's largest is exact in 15 bits; smaller ones round at
// 2^-15 of the largest. Non-finite groups get a NaN scale, so their outputs are NaN.
void quantize_row(const float* x, int64_t k, int16_t* xq, float* xscale, float* xsum, int64_t group_size) {
  for (int64_t g0 = 0; g0 < k; g0 += kXGroup) {
    float r[kXGroup], largest = 0.f;
    bool finite = true;
    for (int64_t i = 0; i < kXGroup; ++i) {
      r[i] = round_bf16(x[g0 + i]);
      finite = finite && std::isfinite(r[i]);
      largest = std::max(largest, std::fabs(r[i]));
    }
    if (!finite) {
      std::fill(xq + g0, xq + g0 + kXGroup, int16_t{0});
      xscale[g0 / kXGroup] = std::numeric_limits<float>::quiet_NaN();
    } else {
      const int e = largest > 0.f ? std::ilogb(largest) : 0;
      const float up = std::ldexp(1.f, 14 - e);
      for (int64_t i = 0; i < kXGroup; ++i) xq[g0 + i] = static_cast<int16_t>(std::nearbyint(r[i] * up));
      xscale[g0 / kXGroup] = std::ldexp(1.f, e - 14);
    }
    if (xsum) {
      float s = 0.f;
      for (int64_t i = 0; i < kXGroup; ++i) s += r[i];
      xsum[g0 / group_size] = (g0 % group_size ? xsum[g0 / group_size] : 0.f) + s;
    }
  }
}

// y[MB rows, 16 tile rows] of one tile. Per 32 columns the products are summed exactly in int32
// (vpmaddwd: int16 weight x int16 x, two columns a lane), then scaled into float32 sums.
// int8 tile: per column pair 32 bytes [row half][8 rows][2 columns]; int4: per 4 columns 32 bytes
// [row half][8 rows][2], low nibble columns 4c + e, high nibble 4c + 2 + e.
template <int MB, bool kInt4>
void tile_rows(const int16_t* xq, const float* xscale, const float* xsum, int64_t K, const uint8_t* w,
               const float* scales, const float* zeros, int64_t groups, int64_t group_size, float* y, int64_t ldy,
               int64_t valid) {
  const int64_t xgroups = K / kXGroup;
  __m256 total[MB][2];
  for (int m = 0; m < MB; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 facc[MB][2];
    for (int m = 0; m < MB; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
    for (int64_t k0 = g * group_size; k0 < (g + 1) * group_size; k0 += kXGroup) {
      __m256i acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      if constexpr (kInt4) {
        const uint8_t* p = w + k0 / 4 * 32;
        const __m256i low = _mm256_set1_epi16(15);
        for (int c = 0; c < kXGroup / 4; ++c, p += 32) {
          const __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          const __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
          const __m256i a0 = _mm256_and_si256(v0, low), b0 = _mm256_srli_epi16(v0, 4);
          const __m256i a1 = _mm256_and_si256(v1, low), b1 = _mm256_srli_epi16(v1, 4);
          for (int m = 0; m < MB; ++m) {
            int32_t pa, pb;
            std::memcpy(&pa, xq + m * K + k0 + 4 * c, 4);
            std::memcpy(&pb, xq + m * K + k0 + 4 * c + 2, 4);
            const __m256i xa = _mm256_set1_epi32(pa), xb = _mm256_set1_epi32(pb);
            acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_add_epi32(_mm256_madd_epi16(a0, xa), _mm256_madd_epi16(b0, xb)));
            acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_add_epi32(_mm256_madd_epi16(a1, xa), _mm256_madd_epi16(b1, xb)));
          }
        }
      } else {
        const uint8_t* p = w + k0 / 2 * 32;
        for (int c = 0; c < kXGroup / 2; ++c, p += 32) {
          const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
          for (int m = 0; m < MB; ++m) {
            int32_t pair;
            std::memcpy(&pair, xq + m * K + k0 + 2 * c, 4);
            const __m256i xv = _mm256_set1_epi32(pair);
            acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, xv));
            acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, xv));
          }
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m256 xs = _mm256_broadcast_ss(xscale + m * xgroups + k0 / kXGroup);
        facc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][0]), xs, facc[m][0]);
        facc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][1]), xs, facc[m][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scales + g * kTile), s1 = _mm256_loadu_ps(scales + g * kTile + 8);
    for (int m = 0; m < MB; ++m) {
      total[m][0] = _mm256_fmadd_ps(facc[m][0], s0, total[m][0]);
      total[m][1] = _mm256_fmadd_ps(facc[m][1], s1, total[m][1]);
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
void rows_of_tile(int64_t rows, const int16_t* xq, const float* xscale, const float* xsum, int64_t K,
                  const uint8_t* w, const float* scales, const float* zeros, int64_t groups, int64_t group_size,
                  float* y, int64_t ldy, int64_t valid) {
  const int64_t xgroups = K / kXGroup;
  for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
    const int64_t mb = std::min<int64_t>(kRowBlock, rows - m0);
    const int16_t* xm = xq + m0 * K;
    const float* sm = xscale + m0 * xgroups;
    const float* zm = kInt4 ? xsum + m0 * groups : nullptr;
    float* ym = y + m0 * ldy;
    switch (mb) {
#define KVF_ROWS(R) \
  case R:           \
    tile_rows<R, kInt4>(xm, sm, zm, K, w, scales, zeros, groups, group_size, ym, ldy, valid); break;
      KVF_ROWS(1) KVF_ROWS(2) KVF_ROWS(3) KVF_ROWS(4)
#undef KVF_ROWS
    }
  }
}

torch::Tensor quant_matmul(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& zeros, int64_t n) {
  const bool int4 = zeros.has_value();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "cpu_quant: x must be float32 [M, K]");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 2 * kTile && w.is_contiguous(),
              "cpu_quant: w must be packed [tiles, K / (2 or 4), 32]");
  const int64_t M = x.size(0), K = x.size(1), tiles = w.size(0), groups = scales.size(1);
  TORCH_CHECK(K % kXGroup == 0 && w.size(1) == (int4 ? K / 4 : K / 2), "cpu_quant: weight has ", w.size(1),
              " column blocks for K = ", K);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == tiles && scales.size(2) == kTile &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "cpu_quant: scales must be float32 [tiles, groups, 16]");
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % kXGroup == 0,
              "cpu_quant: the group size must divide K and be a multiple of 32");
  TORCH_CHECK(n > (tiles - 1) * kTile && n <= tiles * kTile, "cpu_quant: n = ", n, " does not fit ", tiles, " tiles");
  if (int4)
    TORCH_CHECK(zeros->sizes() == scales.sizes() && zeros->scalar_type() == at::kFloat && zeros->is_contiguous(),
                "cpu_quant: zeros must match scales");
  const int64_t group_size = K / groups;

  const auto xc = x.contiguous();
  auto xq = at::empty({M, K}, x.options().dtype(at::kShort));
  auto xscale = at::empty({M, K / kXGroup}, x.options());
  auto xsum = at::empty({int4 ? M : 0, groups}, x.options());
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xc.data_ptr<float>() + m * K, K, xq.data_ptr<int16_t>() + m * K,
                 xscale.data_ptr<float>() + m * (K / kXGroup), int4 ? xsum.data_ptr<float>() + m * groups : nullptr,
                 group_size);

  auto y = at::empty({M, n}, x.options());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const float* zp = int4 ? zeros->data_ptr<float>() : nullptr;
  const int16_t* xqp = xq.data_ptr<int16_t>();
  const float* xsp = xscale.data_ptr<float>();
  const float* xup = int4 ? xsum.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t tile_bytes = w.size(1) * 2 * kTile;
  // at least ~64 KB of weights per thread: below that the pool's wake-up costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (tile_bytes * std::max<int64_t>(1, M / 4)));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, M - m0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t valid = std::min(kTile, n - t * kTile);
        auto run = int4 ? rows_of_tile<true> : rows_of_tile<false>;
        run(rows, xqp + m0 * K, xsp + m0 * (K / kXGroup), int4 ? xup + m0 * groups : nullptr, K, wp + t * tile_bytes,
            sp + t * groups * kTile, int4 ? zp + t * groups * kTile : nullptr, groups, group_size,
            yp + m0 * n + t * kTile, n, valid);
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
