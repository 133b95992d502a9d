// attnseg::channel_attention_fwd/bwd on CUDA: kernels in channel_attention.cuh, launch logic in host.h.
#include <torch/library.h>

#include "launch.cuh"

namespace attnseg::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_attention_fwd_cuda(const at::Tensor& x, bool official) {
  DeviceLaunch launch;
  return channel_attention_fwd_impl(launch, x, official);
}

at::Tensor channel_attention_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& attn,
                                      bool official) {
  DeviceLaunch launch;
  return channel_attention_bwd_impl(launch, grad_y, x, attn, official);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnseg, CUDA, m) {
  m.impl("channel_attention_fwd", &channel_attention_fwd_cuda);
  m.impl("channel_attention_bwd", &channel_attention_bwd_cuda);
}

}  // namespace attnseg::cuda
