// What medlava's CPU kernels share: float32 vectors of ATen's at::vec for the CPU they are built
// for, loads and stores of float32, bfloat16 and float16 through them, and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace medlava {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VS = Vec::size();

// Calls f with a value of the C++ type of `t` (float32, bfloat16 or float16).
template <typename F>
void dispatch(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": float32, bfloat16 or float16 tensors only, got ", t);
  }
}

template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void store_float(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, VS);
  }
}

}  // namespace medlava
