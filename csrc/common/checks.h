// Argument checks shared by the CPU and CUDA entry points. Each message names the argument,
// what it got and what it needs: a wrong input is a Python RuntimeError, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

// The saved tensors and incoming gradients of attention_bwd, checked against q, k, v.
inline void check_attention_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse, const char* op) {
  check_attention_inputs(q, k, v, op);
  const int64_t batch = q.size(0), nq = q.size(1), ev = v.size(2);
  check_float_tensor(grad_out, op, "grad_out", 3, "[B, Nq, Ev]");
  check_shape(grad_out, {batch, nq, ev}, op, "grad_out");
  check_float_tensor(out, op, "out", 3, "[B, Nq, Ev]");
  check_shape(out, {batch, nq, ev}, op, "out");
  check_float_tensor(lse, op, "lse", 2, "[B, Nq]");
  check_shape(lse, {batch, nq}, op, "lse");
  TORCH_CHECK(lse.scalar_type() == stats_dtype(q.scalar_type()), op, ": lse must be ", stats_dtype(q.scalar_type()),
              " for ", q.scalar_type(), " inputs (as attention_fwd returns it), got ", lse.scalar_type());
  check_same_device(grad_out, q, op, "grad_out", "q");
  check_same_device(out, q, op, "out", "q");
  check_same_device(lse, q, op, "lse", "q");
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_float_tensor(*grad_lse, op, "grad_lse", 2, "[B, Nq]");
    check_shape(*grad_lse, {batch, nq}, op, "grad_lse");
    check_same_device(*grad_lse, q, op, "grad_lse", "q");
  }
}

// x: B x C x N. official picks softmax(rowmax(E) - E) (the DANet code) over softmax(E) (the paper).
inline void check_channel_inputs(const at::Tensor& x, const char* op) {
  check_float_tensor(x, op, "x", 3, "[B, C, N]");
}

inline void check_channel_bwd_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& attn,
                                     const char* op) {
  check_channel_inputs(x, op);
  check_float_tensor(grad_y, op, "grad_y", 3, "[B, C, N]");
  check_shape(grad_y, x.sizes(), op, "grad_y");
  check_float_tensor(attn, op, "attn", 3, "[B, C, C]");
  check_shape(attn, {x.size(0), x.size(1), x.size(1)}, op, "attn");
  TORCH_CHECK(attn.scalar_type() == stats_dtype(x.scalar_type()), op, ": attn must be ", stats_dtype(x.scalar_type()),
              " for ", x.scalar_type(), " inputs (as channel_attention_fwd returns it), got ", attn.scalar_type());
  check_same_device(grad_y, x, op, "grad_y", "x");
  check_same_device(attn, x, op, "attn", "x");
}

}  // namespace attnseg
