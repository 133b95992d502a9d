// attnseg::attention_bwd on CUDA: the kernels in flash_attention_bwd.cuh (fp16/bf16), ffma_attention.cuh
// (fp32) and attention.cuh (the generic ones); host.h chooses and launches them.
#include <torch/library.h>

#include "launch.cuh"

namespace attnseg::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out,
                                                                  const std::optional<at::Tensor>& grad_lse,
                                                                  const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& out,
                                                                  const at::Tensor& lse, double scale) {
  DeviceLaunch launch;
  return attention_bwd_impl(launch, grad_out, grad_lse, q, k, v, out, lse, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnseg, CUDA, m) { m.impl("attention_bwd", &attention_bwd_cuda); }

}  // namespace attnseg::cuda
