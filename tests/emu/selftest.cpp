// Self-tests of the SIMT emulator (run by ctest; no torch needed). Each test shows that one
// emulated CUDA feature behaves as on the device, or that misuse is caught:
//   barrier        a missing __syncthreads changes results between schedules; with it they agree
//   deadlock       threads waiting at different barriers raise an error instead of hanging
//   shuffles       xor / down / up / idx, with widths, against their definitions
//   votes          ballot / any / all
//   atomics        atomicAdd from every thread of several blocks
//   wmma           a 16x16x16 half product against a scalar loop
//   conversions    float <-> half / bfloat16 rounding (nearest-even, subnormals, overflow)
//   limits         launch geometry outside the device's limits is refused
//   attention      the real attention_fwd_kernel (csrc/cuda) against a naive loop, all schedules
#include "simt.h"

#include <cstdio>
#include <vector>

#include "../../csrc/cuda/attention.cuh"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++failures;                                                      \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
      std::printf(__VA_ARGS__);                                        \
      std::printf("\n");                                               \
    }                                                                  \
  } while (0)

template <typename Fn>
bool throws(Fn fn) {
  try {
    fn();
  } catch (const simt::Error&) {
    return true;
  }
  return false;
}

const simt::Schedule kSchedules[] = {simt::Schedule::Forward, simt::Schedule::Reverse, simt::Schedule::Random};

__global__ void neighbour_kernel(const float* in, float* out, bool with_barrier) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  float* slots = reinterpret_cast<float*>(smem);
  slots[threadIdx.x] = in[threadIdx.x];
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

void test_barrier() {
  const int n = 64;
  std::vector<float> in(n);
  for (int i = 0; i < n; ++i) in[i] = float(i + 1);
  for (bool with_barrier : {false, true}) {
    std::vector<std::vector<float>> results;
    for (auto s : kSchedules) {
      simt::set_schedule(s, 7);
      std::vector<float> out(n);
      simt::launch(dim3(1), dim3(n), n * sizeof(float), neighbour_kernel, in.data(), out.data(), with_barrier);
      results.push_back(out);
    }
    bool all_equal = true;
    for (auto& r : results) all_equal = all_equal && std::memcmp(r.data(), results[0].data(), n * 4) == 0;
    if (with_barrier) {
      EXPECT(all_equal, "with the barrier every schedule must agree");
      for (int i = 0; i < n; ++i) EXPECT(results[0][i] == in[(i + 1) % n], "out[%d] = %g", i, results[0][i]);
    } else {
      EXPECT(!all_equal, "without the barrier the schedules must disagree");
    }
  }
  simt::set_schedule(simt::Schedule::Forward);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_sync(attnseg::cuda::kFullMask, 1.0f, 0);
  } else {
    __syncthreads();
  }
}

void test_deadlock() {
  std::vector<float> out(64);
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(64), 0, divergent_barrier_kernel, out.data()); }),
         "a warp split between a shuffle and __syncthreads must be reported");
}

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 6;
  o[0] = __shfl_xor_sync(attnseg::cuda::kFullMask, lane, 5);
  o[1] = __shfl_down_sync(attnseg::cuda::kFullMask, lane, 3);
  o[2] = __shfl_up_sync(attnseg::cuda::kFullMask, lane, 2, 8);
  o[3] = __shfl_sync(attnseg::cuda::kFullMask, lane * 10, 7);
  o[4] = __shfl_sync(attnseg::cuda::kFullMask, lane, 3, 16);
  o[5] = attnseg::cuda::warp_sum(lane);
}

void test_shuffles() {
  std::vector<int> out(64 * 6);
  simt::launch(dim3(1), dim3(64), 0, shuffle_kernel, out.data());
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    const int* o = &out[t * 6];
    EXPECT(o[0] == (lane ^ 5), "xor lane %d got %d", lane, o[0]);
    EXPECT(o[1] == (lane + 3 < 32 ? lane + 3 : lane), "down lane %d got %d", lane, o[1]);
    EXPECT(o[2] == (lane % 8 >= 2 ? lane - 2 : lane), "up(width 8) lane %d got %d", lane, o[2]);
    EXPECT(o[3] == 70, "idx lane %d got %d", lane, o[3]);
    EXPECT(o[4] == (lane / 16) * 16 + 3, "idx(width 16) lane %d got %d", lane, o[4]);
    EXPECT(o[5] == 496, "warp_sum lane %d got %d", lane, o[5]);
  }
}

__global__ void vote_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x * 3 + 0] = __ballot_sync(attnseg::cuda::kFullMask, lane % 3 == 0);
  out[threadIdx.x * 3 + 1] = __any_sync(attnseg::cuda::kFullMask, lane == 31);
  out[threadIdx.x * 3 + 2] = __all_sync(attnseg::cuda::kFullMask, lane < 31);
}

void test_votes() {
  std::vector<unsigned> out(32 * 3);
  simt::launch(dim3(1), dim3(32), 0, vote_kernel, out.data());
  unsigned expected = 0;
  for (int l = 0; l < 32; l += 3) expected |= 1u << l;
  for (int t = 0; t < 32; ++t) {
    EXPECT(out[t * 3] == expected, "ballot got %08x", out[t * 3]);
    EXPECT(out[t * 3 + 1] == 1 && out[t * 3 + 2] == 0, "any/all got %u %u", out[t * 3 + 1], out[t * 3 + 2]);
  }
}

__global__ void atomic_kernel(float* counter, int* hist) {
  atomicAdd(counter, 1.0f);
  __syncthreads();
  atomicAdd(&hist[threadIdx.x % 4], 1);
}

void test_atomics() {
  float counter = 0;
  int hist[4] = {0, 0, 0, 0};
  simt::set_schedule(simt::Schedule::Random, 3);
  simt::launch(dim3(4), dim3(128), 0, atomic_kernel, &counter, hist);
  simt::set_schedule(simt::Schedule::Forward);
  EXPECT(counter == 512.0f, "counter %g", counter);
  for (int i = 0; i < 4; ++i) EXPECT(hist[i] == 128, "hist[%d] = %d", i, hist[i]);
}

__global__ void wmma_kernel(const __half* a, const __half* b, float* c) {
  namespace wmma = nvcuda::wmma;
  ATTNSEG_DYNAMIC_SMEM(smem);
  __half* sa = reinterpret_cast<__half*>(smem);
  __half* sb = sa + 256;
  for (int i = threadIdx.x; i < 256; i += 32) {
    sa[i] = a[i];
    sb[i] = b[i];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.5f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

void test_wmma() {
  std::vector<__half> a(256), b(256);
  std::vector<float> af(256), bf(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half(float((i * 7) % 13) / 8 - 0.75f);
    b[i] = __float2half(float((i * 5) % 11) / 4 - 1.25f);
    af[i] = __half2float(a[i]);
    bf[i] = __half2float(b[i]);
  }
  alignas(32) float c[256];  // WMMA stores need 256-bit alignment
  simt::launch(dim3(1), dim3(32), 1024, wmma_kernel, a.data(), b.data(), c);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float ref = 0.5f;
      for (int k = 0; k < 16; ++k) ref += af[i * 16 + k] * bf[j * 16 + k];  // b col-major: B[k][j] = b[j*16+k]
      EXPECT(std::fabs(c[i * 16 + j] - ref) <= 1e-5f, "c[%d][%d] = %g, expected %g", i, j, c[i * 16 + j], ref);
    }
}

void test_conversions() {
  struct Case {
    float f;
    uint16_t half_bits;
  };
  const Case cases[] = {{1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65519.0f, 0x7bff},
                        {65520.0f, 0x7c00}, {5.9604645e-8f, 0x0001}, {2.9802322e-8f, 0x0000},  // 2^-25: tie -> even (0)
                        {4.4703484e-8f, 0x0001}, {1.0009765625f, 0x3c01}, {1.00048828125f, 0x3c00},  // tie -> even
                        {1.00146484375f, 0x3c02}, {6.1035156e-5f, 0x0400}};
  for (const auto& c : cases) {
    const uint16_t got = __float2half(c.f).bits;
    EXPECT(got == c.half_bits, "half(%.10g) = %04x, expected %04x", c.f, got, c.half_bits);
  }
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive half round-trips
    const float f = __half2float(__half{uint16_t(h)});
    EXPECT(__float2half(f).bits == h, "half %04x -> %g -> %04x", h, f, __float2half(f).bits);
  }
  EXPECT(__float2bfloat16(1.00390625f).bits == 0x3f80, "bf16 tie rounds to even, got %04x",
         __float2bfloat16(1.00390625f).bits);
  EXPECT(__float2bfloat16(1.01171875f).bits == 0x3f82, "bf16 tie rounds to even, got %04x",
         __float2bfloat16(1.01171875f).bits);
  EXPECT(__bfloat162float(__float2bfloat16(3.0f)) == 3.0f, "bf16 round trip");
}

__global__ void empty_kernel() {}

void test_limits() {
  EXPECT(throws([] { simt::launch(dim3(1), dim3(1025), 0, empty_kernel); }), "1025 threads per block");
  EXPECT(throws([] { simt::launch(dim3(1, 65536), dim3(32), 0, empty_kernel); }), "grid.y = 65536");
  EXPECT(throws([] { simt::launch(dim3(1), dim3(32), 48 * 1024 + 1, empty_kernel); }), "48 KiB + 1 of smem");
  EXPECT(!throws([] { simt::launch(dim3(2, 3, 4), dim3(8, 4, 2), 48 * 1024, empty_kernel); }), "a valid launch");
}

template <typename T>
void test_attention_kernel(const char* name, float tol) {
  using namespace attnseg::cuda;
  using Tiles = AttnTiles<T>;
  const int64_t nq = 37, nk = 45, e = 20, ev = 70;
  std::vector<T> q(nq * e), k(nk * e), v(nk * ev);
  std::vector<float> qf(q.size()), kf(k.size()), vf(v.size());
  auto fill = [](std::vector<T>& t, std::vector<float>& f, int salt) {
    for (size_t i = 0; i < t.size(); ++i) {
      t[i] = Num<T>::from_acc(float(int((i * 2654435761u + salt) % 97)) / 48.0f - 1.0f);
      f[i] = float(Num<T>::to_acc(t[i]));
    }
  };
  fill(q, qf, 1);
  fill(k, kf, 2);
  fill(v, vf, 3);
  const float scale = 0.4f;
  std::vector<std::vector<T>> outs;
  for (auto s : kSchedules) {
    simt::set_schedule(s, 11);
    std::vector<T> out(nq * ev);
    std::vector<float> lse(nq);
    AttnFwdParams<T> p{};
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
    p.nq = nq, p.nk = nk, p.e = e, p.ev = ev;
    p.q_sb = nq * e, p.q_sn = e, p.q_se = 1, p.k_sb = nk * e, p.k_sn = e, p.k_se = 1;
    p.v_sb = nk * ev, p.v_sn = ev, p.v_se = 1, p.o_sb = nq * ev, p.o_sn = ev, p.o_se = 1;
    p.q_blocks = ceil_div(nq, Tiles::kRows);
    p.scale = scale;
    simt::launch(dim3(unsigned(p.q_blocks), unsigned(ceil_div(ev, Tiles::kChunk))), dim3(Tiles::kThreads),
                 Tiles::kSmemBytes, attention_fwd_kernel<T>, p);
    outs.push_back(out);
  }
  simt::set_schedule(simt::Schedule::Forward);
  for (auto& o : outs) EXPECT(std::memcmp(o.data(), outs[0].data(), o.size() * sizeof(T)) == 0, "%s: schedules", name);
  double max_err = 0;
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<double> s(nk);
    double m = -INFINITY, l = 0;
    for (int64_t j = 0; j < nk; ++j) {
      s[j] = 0;
      for (int64_t d = 0; d < e; ++d) s[j] += double(qf[i * e + d]) * kf[j * e + d];
      s[j] *= scale;
      m = std::max(m, s[j]);
    }
    for (int64_t j = 0; j < nk; ++j) l += std::exp(s[j] - m);
    for (int64_t d = 0; d < ev; ++d) {
      double o = 0;
      for (int64_t j = 0; j < nk; ++j) o += std::exp(s[j] - m) / l * vf[j * ev + d];
      max_err = std::max(max_err, std::fabs(o - double(Num<T>::to_acc(outs[0][i * ev + d]))));
    }
  }
  EXPECT(max_err <= tol, "%s: max error %g > %g", name, max_err, double(tol));
}

}  // namespace

int main() {
  test_barrier();
  test_deadlock();
  test_shuffles();
  test_votes();
  test_atomics();
  test_wmma();
  test_conversions();
  test_limits();
  test_attention_kernel<float>("attention fp32", 1e-5f);
  test_attention_kernel<__half>("attention fp16 (tensor cores)", 2e-3f);  // P and the output rounded to fp16
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("simt emulator self-tests passed\n");
  return 0;
}
