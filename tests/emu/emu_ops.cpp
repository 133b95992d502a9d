// The CUDA ops of csrc/cuda, run on CPU tensors by the SIMT emulator: the same kernel headers and
// the same host launchers (csrc/cuda/host.h) as the extension, with the launches going to
// simt::launch instead of <<<>>>. Built by tests/emulator.py with torch.utils.cpp_extension.
#include <torch/extension.h>

#include "simt.h"  // before the kernel headers: defines the CUDA spellings they use

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "../../csrc/cuda/host.h"

namespace {

// Every launch since the last launches() call, as "<kernel signature>" plus, for the flash
// forward and backward, the load paths the host chose: the tests check which kernel and path ran.
std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

template <class Kernel>
std::string kernel_name(Kernel kernel) {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(kernel), &info) || !info.dli_sname) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

template <typename P>
std::string describe_params(const P&) {
  return "";
}
template <typename T>
std::string describe_params(const attnseg::cuda::FlashFwdParams<T>& p) {
  return std::string(" q_keys_major=") + (p.q_keys_major ? "1" : "0") + " q_async=" + (p.q_async ? "1" : "0") +
         " k_async=" + (p.k_async ? "1" : "0") + " v_async=" + (p.v_async ? "1" : "0");
}

std::string describe_params(const attnseg::cuda::FfmaParams& p) {
  return std::string(" x_tokens_major=") + (p.x_tokens_major ? "1" : "0");
}

template <typename T>
std::string describe_params(const attnseg::cuda::FlashBwdParams<T>& p) {
  return std::string(" v_async=") + (p.v_async ? "1" : "0") + " k_keys_major=" + (p.k_keys_major ? "1" : "0") +
         " k_async=" + (p.k_async ? "1" : "0") + " q_async=" + (p.q_async ? "1" : "0") +
         " do_async=" + (p.do_async ? "1" : "0");
}

// Whether a launch needs the device's in-order block dispatch: the dK/dQ kernels' ordered dQ
// accumulation waits on lower-numbered blocks (csrc/cuda/flash_attention_bwd.cuh). Every other
// launch runs its blocks in a fresh random order.
template <typename P>
bool needs_in_order_dispatch(const P&) {
  return false;
}
template <typename T>
bool needs_in_order_dispatch(const attnseg::cuda::FlashBwdParams<T>& p) {
  return p.ordered_dq;
}

std::vector<std::string> launches() {
  std::vector<std::string> out;
  out.swap(launch_log());
  return out;
}

// The opt-in maximum of the emulated device: by default the smallest of the targeted GPUs (sm_86 /
// sm_89: 99 KiB; sm_80: 163 KiB; sm_90: 227 KiB); set_max_dynamic_smem_optin emulates the others, so
// the tests cover kernels chosen by this limit and their fallbacks.
constexpr size_t kDefaultMaxOptIn = 99 * 1024;
size_t& max_optin() {
  static size_t bytes = kDefaultMaxOptIn;
  return bytes;
}

void set_max_dynamic_smem_optin(int64_t bytes) {
  TORCH_CHECK(bytes >= 48 * 1024, "set_max_dynamic_smem_optin: at least 48 KiB (49152), got ", bytes);
  max_optin() = static_cast<size_t>(bytes);
}

// As on the device, a launch may use more than simt::options().max_dynamic_smem (48 KiB) only
// for a kernel that opted in with set_max_dynamic_smem, and no kernel more than the emulated
// device's opt-in maximum (max_optin above).
int& dq_counter_skew_setting() {
  static int skew = 0;
  return skew;
}

struct EmulatorLaunch {
  std::map<const void*, size_t> opted_in;
  bool in_order = false;  // every launch in linear block order (the counter protocol's own test)

  // Not 0: the planted off-by-one of the dK/dQ kernel's ordered dQ accumulation (block j waits for
  // counter == j + skew), which must fail as "would deadlock".
  int dq_counter_skew() const { return dq_counter_skew_setting(); }

  size_t max_dynamic_smem_optin() const { return max_optin(); }

  void check_device(const at::Tensor& t, const char* op, const char* name) const {
    TORCH_CHECK(t.device().is_cpu(), op, ": the emulator runs kernels on CPU memory, got ", name, " on ", t.device());
  }
  template <class Kernel>
  void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
    TORCH_CHECK(bytes <= max_optin(), "SIMT emulator: a kernel asks for ", bytes,
                " bytes of dynamic shared memory, more than the emulated GPU offers (", max_optin(), ")");
    opted_in[reinterpret_cast<const void*>(kernel)] = bytes;
  }
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) const {
    size_t& limit = simt::options().max_dynamic_smem;
    const size_t default_limit = limit;
    const auto it = opted_in.find(reinterpret_cast<const void*>(kernel));
    if (it != opted_in.end()) limit = std::max(limit, it->second);
    bool& linear = simt::options().linear_blocks;
    linear = in_order;
    std::string entry = kernel_name(kernel);
    if constexpr (sizeof...(Args) == 1) {
      entry += describe_params(args...);
      linear = linear || needs_in_order_dispatch(args...);
    }
    launch_log().push_back(entry);
    try {
      simt::launch(grid, block, smem, kernel, args...);
    } catch (const simt::Error& e) {
      limit = default_limit;
      linear = false;
      TORCH_CHECK(false, "SIMT emulator: ", e.what());
    }
    limit = default_limit;
    linear = false;
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

// The ordered-accumulation protocol of the flash backward (docs/flash_backward_design.md) on one
// counter: block j waits until the counter is j + skew, adds j + 1 to `sum`, then releases j + 1.
// skew = 0 is the protocol (sum = 1 + ... + n); skew != 0 is the planted off-by-one, which waits
// on a block that runs later and so must fail as "would deadlock", not hang or pass.
__global__ void ordered_counter_kernel(int* counter, int* sum, int skew) {
  const int j = int(blockIdx.x);
  if (threadIdx.x == 0) attnseg::cuda::warp::wait_until_equal(counter, j + skew);
  __syncthreads();
  if (threadIdx.x == 0) *sum += j + 1;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) attnseg::cuda::warp::st_release_gpu(counter, attnseg::cuda::warp::ld_acquire_gpu(counter) + 1);
}

int64_t ordered_counter(int64_t blocks, int64_t skew) {
  TORCH_CHECK(blocks >= 1 && blocks <= 1024, "ordered_counter: 1 to 1024 blocks");
  int counter = 0, sum = 0;
  EmulatorLaunch launch;
  launch.in_order = true;  // the protocol's progress needs in-order dispatch, as on the device
  launch(ordered_counter_kernel, dim3(unsigned(blocks)), dim3(32), 0, &counter, &sum, int(skew));
  return sum;
}

// Each block's thread 0 adds values[blockIdx.x] to *sum by warp::red_add_f32 and records its
// position in the run order; the emulator runs blocks in a fresh order per launch and applies the
// reductions in a shuffled order at its end.
__global__ void red_sum_kernel(const float* values, float* sum, int* order, int* position) {
  if (threadIdx.x != 0) return;
  attnseg::cuda::warp::red_add_f32(sum, values[blockIdx.x]);
  order[atomicAdd(position, 1)] = int(blockIdx.x);
}

// (the fp32 sum of `values` by reductions, one block a value, and the order the blocks ran in).
std::tuple<at::Tensor, at::Tensor> red_sum(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.numel() >= 1 && values.numel() <= 4096,
              "red_sum: a contiguous float32 vector of 1 to 4096 values");
  at::Tensor sum = at::zeros({1}, values.options());
  at::Tensor order = at::full({values.numel()}, -1, values.options().dtype(at::kInt));
  int position = 0;
  EmulatorLaunch{}(red_sum_kernel, dim3(unsigned(values.numel())), dim3(32), 0, values.data_ptr<float>(),
                   sum.data_ptr<float>(), order.data_ptr<int>(), &position);
  return {sum, order};
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
  m.def("red_sum", &red_sum, "(sum of values by fp32 reductions, one block a value; the blocks' run order)");
  m.def("set_launch_order_seed", [](int64_t seed) { simt::set_launch_order_seed(static_cast<uint64_t>(seed)); },
        "restart the generator of the per-launch block and reduction orders");
  m.def("ordered_counter", &ordered_counter,
        "the ordered-accumulation counter protocol over `blocks` blocks (skew != 0: the planted bug)");
  m.def("set_max_dynamic_smem_optin", &set_max_dynamic_smem_optin,
        "the emulated device's opt-in dynamic shared memory limit in bytes (default 99 KiB)");
  m.def("set_dq_counter_skew", [](int64_t skew) { dq_counter_skew_setting() = static_cast<int>(skew); },
        "plant an off-by-one in the flash dK/dQ kernel's counter wait (0: as designed)");
  m.def("max_dynamic_smem_optin", [] { return static_cast<int64_t>(max_optin()); });
  m.def("launches", &launches, "the kernels launched since the last call (signature and, for the flash kernels, load paths)");
}
