// Channel attention (DANet CAM) on the CPU, without gamma and residual (added in Python):
//   E = X Xᵀ (C x C, fp32 accumulation), A = softmax(−E) ("official": softmax(rowmax(E) − E),
//   the same by shift invariance) or softmax(E) ("paper"), y = A X.
// The C x C map is small (1 MiB at C = 512) and is kept for the backward:
//   dA = dY Xᵀ, dE = ±A ∘ (dA − rowsum(dA ∘ A)) (− for official), dX = Aᵀ dY + (dE + dEᵀ) X.
// The products are ATen batched GEMMs (MKL here); fp16/bf16 inputs are computed in fp32, since a
// post-ReLU Gram matrix overflows fp16 long before N = 9,216.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"

namespace attnseg::cpu {
namespace {

at::Tensor in_compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> channel_attention_fwd_cpu(const at::Tensor& x_in, bool official) {
  // The ATen calls below must not be autocast again: fp32 accumulation and an fp32 attn are promised.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "attnseg::channel_attention_fwd";
  check_channel_inputs(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": the CPU kernel got x on ", x_in.device());
  const at::Tensor x = in_compute_dtype(x_in);
  at::Tensor energy = at::bmm(x, x.transpose(1, 2));
  if (official) energy.neg_();
  at::Tensor attn = at::_softmax(energy, -1, false);
  at::Tensor y = at::bmm(attn, x);
  return {y.to(x_in.scalar_type()), attn};
}

at::Tensor channel_attention_bwd_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& attn_in,
                                     bool official) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "attnseg::channel_attention_bwd";
  check_channel_bwd_inputs(grad_y_in, x_in, attn_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": the CPU kernel got x on ", x_in.device());
  const at::Tensor x = in_compute_dtype(x_in);
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type());
  const at::Tensor attn = attn_in.to(x.scalar_type());
  const at::Tensor grad_attn = at::bmm(grad_y, x.transpose(1, 2));
  at::Tensor grad_energy = at::_softmax_backward_data(grad_attn, attn, -1, attn.scalar_type());
  if (official) grad_energy.neg_();
  at::Tensor grad_x = at::bmm(attn.transpose(1, 2), grad_y);
  grad_x.baddbmm_(grad_energy + grad_energy.transpose(1, 2), x);
  return grad_x.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(attnseg, CPU, m) {
  m.impl("channel_attention_fwd", &channel_attention_fwd_cpu);
  m.impl("channel_attention_bwd", &channel_attention_bwd_cpu);
}

}  // namespace attnseg::cpu
