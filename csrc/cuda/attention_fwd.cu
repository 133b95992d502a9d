// attnseg::attention_fwd on CUDA: kernels in attention.cuh, launch logic in host.h.
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
