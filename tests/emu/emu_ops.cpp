// The CUDA ops of csrc/cuda, run on CPU tensors by the SIMT emulator: the same kernel headers and
// the same host launchers (csrc/cuda/host.h) as the extension, with the launches going to
// simt::launch instead of <<<>>>. Built by tests/emulator.py with torch.utils.cpp_extension.
#include <torch/extension.h>

#include "simt.h"  // before the kernel headers: defines the CUDA spellings they use

#include <string>

#include "../../csrc/cuda/host.h"

namespace {

struct EmulatorLaunch {
  void check_device(const at::Tensor& t, const char* op, const char* name) const {
    TORCH_CHECK(t.device().is_cpu(), op, ": the emulator runs kernels on CPU memory, got ", name, " on ", t.device());
  }
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) const {
    try {
      simt::launch(grid, block, smem, kernel, args...);
    } catch (const simt::Error& e) {
      TORCH_CHECK(false, "SIMT emulator: ", e.what());
    }
  }
  // The device's gemm is a cuBLAS call (launch.cuh), not a kernel the emulator could run. Its CPU
  // stand-in: the same batched product, accumulated and returned in the accumulation type, from the
  // inputs converted exactly to that type (fp16/bf16 -> fp32 is exact), as the tensor cores do.
  at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) const {
    const at::ScalarType acc = attnseg::stats_dtype(a.scalar_type());
    return at::bmm(a.to(acc), b.to(acc));
  }
};

simt::Schedule parse_schedule(const std::string& s) {
  if (s == "forward") return simt::Schedule::Forward;
  if (s == "reverse") return simt::Schedule::Reverse;
  if (s == "random") return simt::Schedule::Random;
  TORCH_CHECK(false, "schedule must be 'forward', 'reverse' or 'random', got '", s, "'");
}

void set_schedule(const std::string& schedule, int64_t seed) {
  simt::set_schedule(parse_schedule(schedule), static_cast<uint64_t>(seed));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale) {
  EmulatorLaunch launch;
  return attnseg::cuda::attention_fwd_impl(launch, q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out,
                                                             const std::optional<at::Tensor>& grad_lse,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse, double scale) {
  EmulatorLaunch launch;
  return attnseg::cuda::attention_bwd_impl(launch, grad_out, grad_lse, q, k, v, out, lse, scale);
}

std::tuple<at::Tensor, at::Tensor> channel_attention_fwd(const at::Tensor& x, bool official) {
  EmulatorLaunch launch;
  return attnseg::cuda::channel_attention_fwd_impl(launch, x, official);
}

at::Tensor channel_attention_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& attn,
                                 bool official) {
  EmulatorLaunch launch;
  return attnseg::cuda::channel_attention_bwd_impl(launch, grad_y, x, attn, official);
}

// A kernel with a missing barrier: each thread writes its slot, then (without __syncthreads)
// reads its neighbour's. The result depends on the order threads run in; the tests use it to
// show that the schedules expose such races.
__global__ void racy_neighbour_kernel(const float* in, float* out, int n, bool with_barrier) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  float* slots = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  slots[t] = t < n ? in[t] : 0.0f;
  if (with_barrier) __syncthreads();
  out[t] = slots[(t + 1) % blockDim.x];
}

at::Tensor racy_neighbour(const at::Tensor& in, bool with_barrier) {
  TORCH_CHECK(in.dim() == 1 && in.scalar_type() == at::kFloat && in.is_contiguous() && in.numel() <= 1024,
              "racy_neighbour: a contiguous float32 vector of at most 1024 values");
  const int n = static_cast<int>(in.numel());
  at::Tensor out = at::empty_like(in);
  EmulatorLaunch{}(racy_neighbour_kernel, dim3(1), dim3(n), n * sizeof(float), in.data_ptr<float>(), out.data_ptr<float>(), n,
                   with_barrier);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_schedule", &set_schedule, "schedule between barriers: 'forward', 'reverse' or 'random' (with seed)");
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_bwd", &attention_bwd);
  m.def("channel_attention_fwd", &channel_attention_fwd);
  m.def("channel_attention_bwd", &channel_attention_bwd);
  m.def("racy_neighbour", &racy_neighbour);
}
