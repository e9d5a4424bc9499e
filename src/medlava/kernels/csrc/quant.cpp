// Dequantization of int8 weights (one scale per output channel) into the activations' dtype, in
// one vectorised pass: what an int8 layer does before a many-row GEMM, where torch's int8 GEMM
// (_weight_int8pack_mm) is several times slower than dequantizing and running the float one
// (torch's own `q.to(dtype) * scale` takes three passes and an intermediate as large as the result).
//
//   dequantize_int8(q [N, K] int8, scales [N], dtype) -> [N, K]   q[n, k] * scales[n]

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace medlava {
namespace {

inline Vec load_int8(const int8_t* p) {  // VS int8 values as float32
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::convert_int8_to_float<int8_t>(at::vec::Vectorized<int8_t>::loadu(p, VS));
#else
  alignas(64) float tmp[VS];
  for (int64_t j = 0; j < VS; ++j) tmp[j] = static_cast<float>(p[j]);
  return Vec::loadu(tmp);
#endif
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "dequantize_int8: q must be contiguous int8 [N, K]");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == q.size(0) && scales.is_contiguous(), "dequantize_int8: scales must be [N]");
  const int64_t n = q.size(0), k = q.size(1);
  auto out = at::empty({n, k}, q.options().dtype(dtype));
  const auto s = scales.to(at::kFloat);
  dispatch(dtype, "dequantize_int8", [&](auto tag) {
    using T = decltype(tag);
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int8_t* src = qp + r * k;
        T* dst = op + r * k;
        const Vec scale(sp[r]);
        int64_t i = 0;
        for (; i + VS <= k; i += VS) store_float(dst + i, load_int8(src + i) * scale);
        for (; i < k; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * sp[r]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace medlava

TORCH_LIBRARY_FRAGMENT(medlava, m) { m.def("dequantize_int8(Tensor q, Tensor scales, ScalarType dtype) -> Tensor"); }

TORCH_LIBRARY_IMPL(medlava, CPU, m) { m.impl("dequantize_int8", &medlava::dequantize_int8); }
