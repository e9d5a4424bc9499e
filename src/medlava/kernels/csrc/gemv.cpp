// Linear layers at one to three rows (decoding that many sequences): y [M, N] = x [M, K] w [N, K]^T
// (+ bias). At so few rows a matmul does two flops per weight it reads, so it is as fast as the
// weights stream from memory. Each thread takes one contiguous stretch of w's rows and reads it
// front to back, one row after another: the access the hardware prefetcher serves best, as fast
// as a plain read of the same bytes on the benchmark's CPU, where oneDNN's blocked GEMM streams
// at ~60 % of it (docs/BENCHMARKS.md). Sums run in float32 (bfloat16 on `vdpbf16ps` where the CPU
// has AVX512-BF16) and are rounded once, so results are within one rounding of torch's (the terms
// are added in another order), not bit-identical.
//
//   gemv(x [..., K], w [N, K], bias [N]?) -> [..., N]   at most kMaxRows rows of x

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <vector>

#include "common.h"

namespace medlava {
namespace {

constexpr int64_t kMaxRows = 3;  // at 4 rows oneDNN is about as fast (docs/BENCHMARKS.md)
// Independent sums per row (to hide the multiply-add latency), the same at every row count, so a
// sequence's results do not depend on how many others share its step (1 to 3).
constexpr int kChains = 4;

// Rows [n0, n1) of y from float32 copies of x's rows (xf [M, K]).
template <typename T, int M>
void dot_rows(const float* xf, const T* w, const float* bias, T* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    Vec acc[M][kChains];
    for (auto& row : acc) std::fill(row, row + kChains, Vec(0.f));
    int64_t k = 0;
    for (; k + kChains * VS <= K; k += kChains * VS) {
      for (int c = 0; c < kChains; ++c) {
        const Vec wv = load_float(wr + k + c * VS);
        for (int m = 0; m < M; ++m) acc[m][c] = at::vec::fmadd(wv, Vec::loadu(xf + m * K + k + c * VS), acc[m][c]);
      }
    }
    for (int m = 0; m < M; ++m) {
      Vec sum = acc[m][0];
      for (int c = 1; c < kChains; ++c) sum = sum + acc[m][c];
      float s = sum.reduce_add();
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * xf[m * K + j];
      y[m * N + n] = static_cast<T>(bias != nullptr ? s + bias[n] : s);
    }
  }
}

#if defined(__AVX512BF16__)
// The same for bfloat16 on vdpbf16ps, straight from x's bf16 rows: each instruction adds two
// columns' exact products per float32 lane; the last partial 32 columns are masked loads.
template <int M>
void dot_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* w, const float* bias, c10::BFloat16* y, int64_t N,
                   int64_t K, int64_t n0, int64_t n1) {
  const int64_t full = K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - full)) - 1);
  auto load = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto load_tail = [tail](const c10::BFloat16* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tail, p); };
  for (int64_t n = n0; n < n1; ++n) {
    const c10::BFloat16* wr = w + n * K;
    __m512 acc[M][kChains];
    for (auto& row : acc) std::fill(row, row + kChains, _mm512_setzero_ps());
    int64_t k = 0;
    for (; k + kChains * 32 <= full; k += kChains * 32) {
      for (int c = 0; c < kChains; ++c) {
        const __m512bh wv = load(wr + k + c * 32);
        for (int m = 0; m < M; ++m) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv, load(x + m * K + k + c * 32));
      }
    }
    for (; k < full; k += 32) {
      const __m512bh wv = load(wr + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, load(x + m * K + k));
    }
    if (full < K) {
      const __m512bh wv = load_tail(wr + full);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, load_tail(x + m * K + full));
    }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[m][c]);
      const float s = _mm512_reduce_add_ps(sum);
      y[m * N + n] = static_cast<c10::BFloat16>(bias != nullptr ? s + bias[n] : s);
    }
  }
}
#endif

template <typename T, int M>
void run(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y) {
  const int64_t N = w.size(0), K = w.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { dot_rows_bf16<M>(xp, wp, bias, yp, N, K, n0, n1); });
    return;
  }
#endif
  std::vector<float> converted;  // x's rows as float32, where they are not already
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = xp;
  } else {
    converted.assign(xp, xp + M * K);
    xf = converted.data();
  }
  // Grain 64 rows: each thread gets one contiguous stretch (at::parallel_for splits evenly).
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { dot_rows<T, M>(xf, wp, bias, yp, N, K, n0, n1); });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == w.size(1),
              "gemv: x must be contiguous [..., K] and w contiguous [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must share a dtype");
  const int64_t K = w.size(1), N = w.size(0), M = K == 0 ? 0 : x.numel() / K;
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "gemv: x must have 1 to ", kMaxRows, " rows, got ", M);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "gemv: bias must be [N]");
    b = bias->to(at::kFloat).contiguous();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch(x.scalar_type(), "gemv", [&](auto tag) {
    using T = decltype(tag);
    switch (M) {
      case 1: run<T, 1>(x, w, bp, y); break;
      case 2: run<T, 2>(x, w, bp, y); break;
      default: run<T, 3>(x, w, bp, y); break;
    }
  });
  return y;
}

}  // namespace
}  // namespace medlava

TORCH_LIBRARY_FRAGMENT(medlava, m) { m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(medlava, CPU, m) { m.impl("gemv", &medlava::gemv); }
