// Fused elementwise ops of the decoder for inference on the CPU: each replaces a chain of small
// torch ops (a dispatch, a pass over memory and an intermediate tensor each) by one pass.
// Every intermediate is rounded to the model dtype where torch's chain rounds it, so rotary
// embeddings and SwiGLU give torch's results bit for bit, and RMSNorm within float32 rounding of
// its mean square (torch sums the squares in another order).
//
//   rms_norm(x, weight, eps, residual?)  residual given: residual += x in place, normalise that
//   rotary_(q, k, cos, sin)              q, k in place: x * cos + rotate_half(x) * sin
//   silu_and_mul(x)                      silu(gate) * up, x = [gate | up] (one GEMM's output)

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace medlava {
namespace {

template <typename T>
inline Vec round_to(const Vec& v) {  // v as torch holds it in T (a no-op for float)
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
    return lo;
  }
}

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void rms_norm_rows(T* out, T* x, const T* residual_in, T* residual_out, const T* w, int64_t rows, int64_t d,
                   float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * d;
      T* o = out + r * d;
      // s = x (+ residual), as T; kept in `o` meanwhile
      Vec ss(0.f);
      float tail = 0.f;
      int64_t i = 0;
      for (; i + VS <= d; i += VS) {
        Vec s = load_float(xr + i);
        if (residual_in != nullptr) s = round_to<T>(s + load_float(residual_in + r * d + i));
        store_float(o + i, s);
        ss = ss + s * s;
      }
      for (; i < d; ++i) {
        float s = static_cast<float>(xr[i]);
        if (residual_in != nullptr) s = round_to<T>(s + static_cast<float>(residual_in[r * d + i]));
        o[i] = static_cast<T>(s);
        tail += s * s;
      }
      if (residual_out != nullptr) std::copy(o, o + d, residual_out + r * d);
      const float inv = 1.f / std::sqrt((ss.reduce_add() + tail) / static_cast<float>(d) + eps);
      for (i = 0; i + VS <= d; i += VS) {
        const Vec h = round_to<T>(load_float(o + i) * Vec(inv));
        store_float(o + i, load_float(w + i) * h);
      }
      for (; i < d; ++i) o[i] = static_cast<T>(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(o[i]) * inv));
    }
  });
}

// (normed, x + residual) with residual given, else (normed, x).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: x must be contiguous [..., d] and weight [d]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  auto out = at::empty_like(x);
  at::Tensor summed = x;
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must be contiguous and like x");
    summed = at::empty_like(x);
  }
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(out.data_ptr<T>(), x.data_ptr<T>(), residual ? residual->data_ptr<T>() : nullptr,
                     residual ? summed.data_ptr<T>() : nullptr, weight.data_ptr<T>(), rows, d, static_cast<float>(eps));
  });
  return {out, summed};
}

template <typename T>
void rotate(T* x, const T* c, const T* s, int64_t half) {  // one head's vector at one position
  int64_t i = 0;
  for (; i + VS <= half; i += VS) {
    const Vec a = load_float(x + i), b = load_float(x + half + i);
    store_float(x + i, round_to<T>(round_to<T>(a * load_float(c + i)) + round_to<T>(b.neg() * load_float(s + i))));
    store_float(x + half + i, round_to<T>(round_to<T>(b * load_float(c + half + i)) + round_to<T>(a * load_float(s + half + i))));
  }
  for (; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[half + i]);
    x[i] = static_cast<T>(round_to<T>(a * static_cast<float>(c[i])) + round_to<T>(-b * static_cast<float>(s[i])));
    x[half + i] = static_cast<T>(round_to<T>(b * static_cast<float>(c[half + i])) +
                                 round_to<T>(a * static_cast<float>(s[half + i])));
  }
}

// q [T, H, D] and k [T, KVH, D] (any token and head strides, contiguous D), rotated in place by
// cos, sin [T, D] (the model dtype, as the torch path rounds them).
void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "rotary_: q, k must be [T, heads, D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  cos.size(1) == q.size(2) && k.size(0) == q.size(0) && k.size(2) == q.size(2) && q.size(2) % 2 == 0,
              "rotary_: cos, sin must be contiguous [T, D] with an even D matching q and k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(), "rotary_: q, k, cos, sin must share a dtype");
  const int64_t n = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  dispatch(q.scalar_type(), "rotary_", [&](auto tag) {
    using T = decltype(tag);
    T* qp = q.data_ptr<T>();
    T* kp = k.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < hq; ++h) rotate(qp + t * q.stride(0) + h * q.stride(1), cp + t * d, sp + t * d, d / 2);
        for (int64_t h = 0; h < hk; ++h) rotate(kp + t * k.stride(0) + h * k.stride(1), cp + t * d, sp + t * d, d / 2);
      }
    });
  });
}

// x [..., 2 * I] holds gate then up (one GEMM's output); returns silu(gate) * up [..., I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: x must be contiguous [..., 2 * I]");
  const int64_t inner = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  auto sizes = x.sizes().vec();
  sizes.back() = inner;
  auto out = at::empty(sizes, x.options());
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* g = xp + r * 2 * inner;
        const T* u = g + inner;
        T* o = op + r * inner;
        int64_t i = 0;
        for (; i + VS <= inner; i += VS) {  // torch's silu: x / (1 + exp(-x)), rounded, then the product
          const Vec a = load_float(g + i);
          store_float(o + i, round_to<T>(a / (Vec(1.f) + a.neg().exp())) * load_float(u + i));
        }
        for (; i < inner; ++i) {
          const float a = static_cast<float>(g[i]);
          o[i] = static_cast<T>(round_to<T>(a / (1.f + std::exp(-a))) * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace medlava

TORCH_LIBRARY_FRAGMENT(medlava, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(medlava, CPU, m) {
  m.impl("rms_norm", &medlava::rms_norm);
  m.impl("rotary_", &medlava::rotary_);
  m.impl("silu_and_mul", &medlava::silu_and_mul);
}
