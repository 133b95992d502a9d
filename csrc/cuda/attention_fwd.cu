// attnseg::attention_fwd on CUDA: the kernels in flash_attention.cuh (fp16/bf16), ffma_attention.cuh
// (fp32) and attention.cuh (the generic ones); host.h chooses and launches them.
#include <torch/library.h>

#include "launch.cuh"

namespace attnseg::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  DeviceLaunch launch;
  return attention_fwd_impl(launch, q, k, v, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnseg, CUDA, m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace attnseg::cuda
