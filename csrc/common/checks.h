// Argument checks shared by the CPU and CUDA entry points. Each message names the argument,
// what it got and what it needs: a wrong input is a Python RuntimeError, never a crash.
#pragma once

#include <ATen/ATen.h>

namespace attnseg {

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t ndim,
                               const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ", t.layout());
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D ", layout, ", got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                                    const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// q: B x Nq x E, k: B x Nk x E, v: B x Nk x Ev, all on one device with one floating dtype.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_float_tensor(q, op, "q", 3, "[B, Nq, E]");
  check_float_tensor(k, op, "k", 3, "[B, Nk, E]");
  check_float_tensor(v, op, "v", 3, "[B, Nk, Ev]");
  check_same_device_dtype(k, q, op, "k", "q");
  check_same_device_dtype(v, q, op, "v", "q");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", q.size(0), ", k ",
              k.size(0), ", v ", v.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), op, ": k has E = ", k.size(2), " but q has E = ", q.size(2));
  TORCH_CHECK(v.size(1) == k.size(1), op, ": v has Nk = ", v.size(1), " rows but k has Nk = ", k.size(1));
}

inline at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace attnseg
