// The device Launch policy of host.h: <<<grid, block, smem>>> on the current CUDA stream, the
// launch error checked right after, and the CUDA device of the inputs made current; the GEMMs of
// channel attention go to cuBLAS through ATen.
#pragma once

// c10 CUDA headers only: ATen/cuda/CUDAContext.h would also want the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "host.h"

namespace attnseg::cuda {

struct DeviceLaunch {
  std::optional<c10::cuda::CUDAGuard> guard;
  cudaStream_t stream = nullptr;

  void check_device(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.is_cuda(), op, ": the CUDA kernel got ", name, " on ", t.device());
    guard.emplace(t.device());
    stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }

  // Dynamic shared memory above the default 48 KiB is an opt-in per kernel (and device).
  template <class Kernel>
  void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }

  // The most dynamic shared memory one block may opt in to on the current device (sm_80: 163 KiB,
  // sm_86 / sm_89: 99 KiB, sm_90: 227 KiB): the host picks kernels that need more than 99 KiB by it.
  size_t max_dynamic_smem_optin() const {
    int device = 0, bytes = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return static_cast<size_t>(bytes);
  }

  // The dK/dQ kernel's counter protocol as designed (the emulator's tests plant an off-by-one).
  int dq_counter_skew() const { return 0; }

  template <class Kernel, class... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
    kernel<<<grid, block, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // CAM's batched GEMMs (host.h), on cuBLAS through ATen, on the current stream: fp16/bf16 on tensor
  // cores with fp32 accumulation and an fp32 result (aten::bmm.dtype); fp32 and fp64 in their own
  // type (fp32 on TF32 tensor cores only where torch.backends.cuda.matmul.allow_tf32 allows it).
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) const {
    const at::ScalarType type = a.scalar_type();
    if (type == at::kHalf || type == at::kBFloat16) return at::bmm(a, b, at::kFloat);
    return at::bmm(a, b);
  }
};

}  // namespace attnseg::cuda
