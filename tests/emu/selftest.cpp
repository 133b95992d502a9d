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
// The fragment-level primitives of csrc/cuda/warp.cuh, each against fragments built here from
// explicit matrices by the layout written in warp.cuh (not by the emulator's code):
//   mma fragments  m16n8k16 fp16 / bf16 on random matrices against A B + C (fp64), d aliasing c
//   ldmatrix       x1 / x2 / x4, plain and .trans, from scattered padded rows, register by register
//   ldmatrix+mma   x4 on a 16x16 A tile and x2 (plain on Bᵀ, .trans on B) feeding mma = A B; a
//                  kernel that loads A's quadrants in the wrong order fails
//   misuse         misaligned / non-shared / out-of-range rows, an exited lane, a partial warp
//   cp.async       data only after the wait that retires its group (not even the issuing thread
//                  sees it before), wait<1> retires only the older group, uncommitted copies are
//                  not waited for, src-size < 16 zero-fills, src-size 0 reads nothing; misuse
//   pipeline       a two-stage cp.async pipeline is right under every schedule; planted bugs (a
//                  too-weak wait, a missing wait) give wrong (poisoned) data under every schedule,
//                  and without the barrier after the wait the schedules disagree
// Built with -DSIMT_PLANT_FRAGMENT_BUG=1 the emulator swaps the roles of a[1] and a[2]; the mma
// tests must then fail (tests/test_cuda_emulated.py checks that they do).
#include "simt.h"

#include <cstdio>
#include <vector>

#include "../../csrc/cuda/attention.cuh"
#include "../../csrc/cuda/warp.cuh"

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
    // fp32 tiles take 59 KiB: opted in above the default 48 KiB, as the host launcher does.
    size_t& limit = simt::options().max_dynamic_smem;
    const size_t default_limit = limit;
    limit = std::max(limit, Tiles::kSmemBytes);
    simt::launch(dim3(unsigned(p.q_blocks), unsigned(ceil_div(ev, Tiles::kChunk))), dim3(Tiles::kThreads),
                 Tiles::kSmemBytes, attention_fwd_kernel<T>, p);
    limit = default_limit;
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

// ---- fragment-level primitives (csrc/cuda/warp.cuh) ------------------------------------------

namespace cw = attnseg::cuda::warp;

// Lane (g, t) of the documented layouts, g = lane / 4, t = lane % 4.
int group_of(int lane) { return lane / 4; }
int thread_in_group(int lane) { return lane % 4; }

template <typename T>
float round_to(float x) {
  const uint32_t packed = cw::pack2<T>(x, 0.0f);
  return std::is_same_v<T, __half> ? simt::half_bits_to_float(uint16_t(packed)) : simt::bf16_bits_to_float(uint16_t(packed));
}

// Per-lane fragments of explicit row-major matrices A (16x16), B (16x8, K x N) and C (16x8),
// built from the layout written in warp.cuh, independently of the emulator's code.
template <typename T>
void make_fragments(const float* A, const float* B, const float* C, uint32_t (*a)[4], uint32_t (*b)[2],
                    float (*c)[4]) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    auto at = [&](int r, int k) { return A[r * 16 + k]; };
    a[lane][0] = cw::pack2<T>(at(g, 2 * t), at(g, 2 * t + 1));
    a[lane][1] = cw::pack2<T>(at(g + 8, 2 * t), at(g + 8, 2 * t + 1));
    a[lane][2] = cw::pack2<T>(at(g, 2 * t + 8), at(g, 2 * t + 9));
    a[lane][3] = cw::pack2<T>(at(g + 8, 2 * t + 8), at(g + 8, 2 * t + 9));
    b[lane][0] = cw::pack2<T>(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    b[lane][1] = cw::pack2<T>(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    c[lane][0] = C[g * 8 + 2 * t], c[lane][1] = C[g * 8 + 2 * t + 1];
    c[lane][2] = C[(g + 8) * 8 + 2 * t], c[lane][3] = C[(g + 8) * 8 + 2 * t + 1];
  }
}

// D (16x8) from the per-lane accumulator registers, by the same layout.
void gather_accumulators(const float (*d)[4], float* D) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    D[g * 8 + 2 * t] = d[lane][0], D[g * 8 + 2 * t + 1] = d[lane][1];
    D[(g + 8) * 8 + 2 * t] = d[lane][2], D[(g + 8) * 8 + 2 * t + 1] = d[lane][3];
  }
}

// Checks D = A B + C within fp32 accumulation error; returns the number of wrong elements.
int count_wrong_products(const float* A, const float* B, const float* C, const float* D) {
  int wrong = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = C[i * 8 + j], mag = std::fabs(C[i * 8 + j]);
      for (int k = 0; k < 16; ++k) {
        ref += double(A[i * 16 + k]) * B[k * 8 + j];
        mag += std::fabs(double(A[i * 16 + k]) * B[k * 8 + j]);
      }
      if (!(std::fabs(D[i * 8 + j] - ref) <= 1e-6 * mag + 1e-30)) ++wrong;
    }
  return wrong;
}

template <typename T>
__global__ void mma_fragment_kernel(const uint32_t (*a)[4], const uint32_t (*b)[2], const float (*c)[4],
                                    float (*d)[4]) {
  const int lane = threadIdx.x % 32;
  uint32_t ar[4], br[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ar[i] = a[lane][i], acc[i] = c[lane][i];
  for (int i = 0; i < 2; ++i) br[i] = b[lane][i];
  cw::mma_m16n8k16<T>(acc, ar, br, acc);  // d aliasing c, as the kernels' accumulators do
  for (int i = 0; i < 4; ++i) d[lane][i] = acc[i];
}

template <typename T>
void test_mma_fragments(const char* name) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  for (int trial = 0; trial < 4; ++trial) {
    float A[256], B[128], C[128], D[128];
    for (auto& x : A) x = round_to<T>(dist(rng));
    for (auto& x : B) x = round_to<T>(dist(rng));
    for (auto& x : C) x = dist(rng);
    uint32_t a[32][4], b[32][2];
    float c[32][4], d[32][4];
    make_fragments<T>(A, B, C, a, b, c);
    simt::set_schedule(kSchedules[trial % 3], trial);
    simt::launch(dim3(1), dim3(32), 0, mma_fragment_kernel<T>, a, b, c, d);
    gather_accumulators(d, D);
    const int wrong = count_wrong_products(A, B, C, D);
    EXPECT(wrong == 0, "%s mma: %d of 128 elements differ from A B + C", name, wrong);
  }
  simt::set_schedule(simt::Schedule::Forward);
}

// Shared-memory image of four 8x8 matrices of 16-bit values M_i[r][c] = 0x100 * (i + 1) + 0x10 * r + c,
// rows 48 bytes apart (24 elements: padding between rows) and matrix i at row block perm[i], so
// the row addresses, not a contiguous layout, decide what is loaded.
constexpr int kLdStride = 24;
constexpr int kLdPerm[4] = {2, 0, 3, 1};
uint16_t ld_value(int i, int r, int c) { return uint16_t(0x100 * (i + 1) + 0x10 * r + c); }

__global__ void ldmatrix_kernel(uint32_t* out, int count, bool trans) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<uint16_t*>(smem);
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 4 * 8 * 8; e += 32) {
    const int i = e / 64, r = e / 8 % 8, c = e % 8;
    s[(kLdPerm[i] * 8 + r) * kLdStride + c] = ld_value(i, r, c);
  }
  __syncwarp();
  const int m = lane / 8 % count;  // lanes past 8 * count give valid but unused addresses
  const uint16_t* row = s + (kLdPerm[m] * 8 + lane % 8) * kLdStride;
  uint32_t r4[4] = {0, 0, 0, 0};
  if (count == 4) {
    if (trans) cw::ldmatrix_x4_trans(r4, row); else cw::ldmatrix_x4(r4, row);
  } else if (count == 2) {
    uint32_t r2[2];
    if (trans) cw::ldmatrix_x2_trans(r2, row); else cw::ldmatrix_x2(r2, row);
    r4[0] = r2[0], r4[1] = r2[1];
  } else {
    uint32_t r1[1];
    if (trans) cw::ldmatrix_x1_trans(r1, row); else cw::ldmatrix_x1(r1, row);
    r4[0] = r1[0];
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r4[i];
}

void test_ldmatrix() {
  for (int count : {1, 2, 4})
    for (bool trans : {false, true}) {
      uint32_t out[128];
      simt::launch(dim3(1), dim3(32), 32 * kLdStride * 2, ldmatrix_kernel, out, count, trans);
      int wrong = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = group_of(lane), t = thread_in_group(lane);
        for (int i = 0; i < count; ++i) {
          const uint16_t lo = trans ? ld_value(i, 2 * t, g) : ld_value(i, g, 2 * t);
          const uint16_t hi = trans ? ld_value(i, 2 * t + 1, g) : ld_value(i, g, 2 * t + 1);
          if (out[lane * 4 + i] != (uint32_t(lo) | uint32_t(hi) << 16)) ++wrong;
        }
      }
      EXPECT(wrong == 0, "ldmatrix x%d%s: %d wrong registers", count, trans ? ".trans" : "", wrong);
    }
}

enum class LdBug { None, SwappedQuadrants };

// D = A B through the shared-memory path of a flash-attention kernel: A (16x16, row-major) by
// ldmatrix x4 on its four quadrants, B either as Bᵀ (8x16, row-major: plain x2) or as B (16x8,
// row-major: .trans x2), then one mma. `bug` plants the classic quadrant-order mistake.
template <typename T>
__global__ void ldmatrix_mma_kernel(const uint16_t* a, const uint16_t* b, bool b_transposed_in_memory, LdBug bug,
                                    float* d_out) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  auto* sa = reinterpret_cast<uint16_t*>(smem);  // 16 x 16
  uint16_t* sb = sa + 256;                        // 16 x 8 (B) or 8 x 16 (Bᵀ)
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 256; e += 32) sa[e] = a[e];
  for (int e = lane; e < 128; e += 32) sb[e] = b[e];
  __syncwarp();
  int quadrant = lane / 8;  // 0: rows 0-7 cols 0-7, 1: rows 8-15 cols 0-7, 2: rows 0-7 cols 8-15, 3: rows 8-15 cols 8-15
  if (bug == LdBug::SwappedQuadrants && (quadrant == 1 || quadrant == 2)) quadrant = 3 - quadrant;
  uint32_t af[4], bf[2];
  cw::ldmatrix_x4(af, sa + ((quadrant % 2) * 8 + lane % 8) * 16 + (quadrant / 2) * 8);
  const int bm = lane / 8 % 2;
  if (b_transposed_in_memory) {
    cw::ldmatrix_x2(bf, sb + (lane % 8) * 16 + bm * 8);  // Bᵀ rows n = 0..7, k halves 0-7 / 8-15
  } else {
    cw::ldmatrix_x2_trans(bf, sb + (bm * 8 + lane % 8) * 8);  // B rows k = 0-7 / 8-15
  }
  float acc[4] = {0, 0, 0, 0};
  cw::mma_m16n8k16<T>(acc, af, bf, acc);
  for (int i = 0; i < 4; ++i) d_out[lane * 4 + i] = acc[i];
}

template <typename T>
void test_ldmatrix_mma(const char* name) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  float A[256], B[128], Z[128] = {}, D[128];
  uint16_t a[256], b[128], bt[128];
  for (int i = 0; i < 256; ++i) A[i] = round_to<T>(dist(rng)), a[i] = uint16_t(cw::pack2<T>(A[i], 0.0f));
  for (int i = 0; i < 128; ++i) B[i] = round_to<T>(dist(rng)), b[i] = uint16_t(cw::pack2<T>(B[i], 0.0f));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) bt[n * 16 + k] = b[k * 8 + n];
  for (bool transposed : {false, true})
    for (auto s : kSchedules) {
      simt::set_schedule(s, 9);
      float d[32][4];
      simt::launch(dim3(1), dim3(32), 1024, ldmatrix_mma_kernel<T>, a, transposed ? bt : b, transposed, LdBug::None,
                   &d[0][0]);
      gather_accumulators(d, D);
      const int wrong = count_wrong_products(A, B, Z, D);
      EXPECT(wrong == 0, "%s ldmatrix%s + mma: %d of 128 elements differ from A B", name,
             transposed ? " (Bᵀ, plain)" : " (B, .trans)", wrong);
    }
  simt::set_schedule(simt::Schedule::Forward);
  float d[32][4];
  simt::launch(dim3(1), dim3(32), 1024, ldmatrix_mma_kernel<T>, a, b, false, LdBug::SwappedQuadrants, &d[0][0]);
  gather_accumulators(d, D);
  EXPECT(count_wrong_products(A, B, Z, D) > 0, "%s ldmatrix + mma: a kernel loading A's quadrants in the wrong order must fail", name);
}

__global__ void ldmatrix_misuse_kernel(const uint16_t* global, int kind) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<uint16_t*>(smem);
  const int lane = threadIdx.x % 32;
  if (kind == 2 && lane == 5) return;  // an exited lane
  uint32_t r[4];
  const uint16_t* row = s + lane * 8;
  if (kind == 0) row = s + lane * 8 + 4;  // 8-byte aligned only
  if (kind == 1) row = global + lane * 8;  // not shared memory
  if (kind == 4) row = s + lane * 8 + 8 * 32;  // past the end of the dynamic buffer
  cw::ldmatrix_x4(r, row);
}

__global__ void mma_partial_warp_kernel() {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float acc[4] = {0, 0, 0, 0};
  cw::mma_m16n8k16<__half>(acc, a, b, acc);
}

void test_fragment_misuse() {
  alignas(16) static uint16_t global[512];
  const size_t smem = 32 * 16;
  EXPECT(!throws([&] { simt::launch(dim3(1), dim3(64), smem, ldmatrix_misuse_kernel, global, 3); }), "a valid ldmatrix");
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(32), smem, ldmatrix_misuse_kernel, global, 0); }),
         "ldmatrix with a row address that is not 16-byte aligned");
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(32), smem, ldmatrix_misuse_kernel, global, 1); }),
         "ldmatrix from global memory");
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(32), smem, ldmatrix_misuse_kernel, global, 2); }),
         "ldmatrix with an exited lane");
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(32), smem, ldmatrix_misuse_kernel, global, 4); }),
         "ldmatrix past the end of the dynamic shared memory");
  EXPECT(throws([&] { simt::launch(dim3(1), dim3(48), 0, mma_partial_warp_kernel); }), "mma in a partial warp");
  EXPECT(!throws([&] { simt::launch(dim3(1), dim3(64), 0, mma_partial_warp_kernel); }), "mma in full warps");
}

// ---- cp.async ---------------------------------------------------------------------------------

uint32_t poison32() { return 0xffffffffu; }

// Each thread copies 16 bytes of two sources in two groups and reports its destinations after
// each step: before any wait, after wait<1> (older group only) and after wait<0>.
__global__ void cp_async_groups_kernel(const uint32_t* src0, const uint32_t* src1, uint32_t* out) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<uint32_t*>(smem);
  const int tid = threadIdx.x;
  uint32_t* dst0 = s + tid * 4;
  uint32_t* dst1 = s + (blockDim.x + tid) * 4;
  uint32_t* o = out + tid * 12;
  cw::cp_async_16(dst0, src0 + tid * 4, 16);
  cw::cp_async_commit();
  cw::cp_async_16(dst1, src1 + tid * 4, 16);
  cw::cp_async_commit();
  o[0] = dst0[0], o[1] = dst1[0];  // nothing waited for: the issuing thread sees old contents
  cw::cp_async_wait<1>();
  o[2] = dst0[0], o[3] = dst1[0];
  cw::cp_async_wait<0>();
  o[4] = dst0[0], o[5] = dst1[0];
  // uncommitted copies are not retired by a wait
  uint32_t* dst2 = s + (2 * blockDim.x + tid) * 4;
  cw::cp_async_16(dst2, src0 + tid * 4, 16);
  cw::cp_async_wait<0>();
  o[6] = dst2[0];
  cw::cp_async_commit();
  cw::cp_async_wait<0>();
  o[7] = dst2[0];
  // src-size 5 copies 5 bytes and zero-fills 11; src-size 0 reads nothing (no valid source)
  auto* dst3 = reinterpret_cast<unsigned char*>(s + (3 * blockDim.x + tid) * 4);
  cw::cp_async_16(dst3, src0 + tid * 4, 5);
  cw::cp_async_16(dst3 + 16 * blockDim.x, nullptr, 0);
  cw::cp_async_commit();
  cw::cp_async_wait<0>();
  std::memcpy(o + 8, dst3, 16);
  uint32_t zero_probe[4];
  std::memcpy(zero_probe, dst3 + 16 * blockDim.x, 16);
  o[8 + 3] = zero_probe[0] | zero_probe[1] | zero_probe[2] | zero_probe[3];
}

void test_cp_async_groups() {
  const int n = 64;
  alignas(16) static uint32_t src0[n * 4], src1[n * 4];
  for (int i = 0; i < n * 4; ++i) src0[i] = 0x10000u + i, src1[i] = 0x20000u + i;
  std::vector<uint32_t> out(n * 12);
  simt::launch(dim3(1), dim3(n), 5 * n * 16, cp_async_groups_kernel, src0, src1, out.data());
  int wrong = 0;
  for (int t = 0; t < n; ++t) {
    const uint32_t* o = &out[t * 12];
    const uint32_t a = src0[t * 4], b = src1[t * 4];
    uint32_t first_word = 0;
    std::memcpy(&first_word, &src0[t * 4], 4);
    const uint32_t byte4 = src0[t * 4 + 1] & 0xffu;
    const bool ok = o[0] == poison32() && o[1] == poison32() && o[2] == a && o[3] == poison32() && o[4] == a &&
                    o[5] == b && o[6] == poison32() && o[7] == a && o[8] == first_word && o[9] == byte4 &&
                    o[10] == 0 && o[11] == 0;
    if (!ok) ++wrong;
  }
  EXPECT(wrong == 0, "cp.async group semantics wrong in %d of %d threads (thread 0: %08x %08x %08x %08x %08x %08x %08x %08x)",
         wrong, n, out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]);
}

void test_cp_async_misuse() {
  alignas(16) static float src[64];
  auto run = [&](int dst_offset, const void* s, int bytes) {
    return throws([&] {
      simt::launch(dim3(1), dim3(32), 1024, [](int off, const void* from, int nbytes) {
        ATTNSEG_DYNAMIC_SMEM(smem);
        cw::cp_async_16(smem + off, from, nbytes);
      }, dst_offset, s, bytes);
    });
  };
  EXPECT(!run(0, src, 16), "a valid cp.async");
  EXPECT(run(8, src, 16), "cp.async to a destination that is not 16-byte aligned");
  EXPECT(run(0, reinterpret_cast<const char*>(src) + 4, 16), "cp.async from a source that is not 16-byte aligned");
  EXPECT(run(0, src, 17), "cp.async with src-size 17");
  EXPECT(run(1024, src, 16), "cp.async past the end of the dynamic shared memory");
  EXPECT(throws([&] {
           simt::launch(dim3(1), dim3(32), 0, [](float* dst, const float* from) { cw::cp_async_16(dst, from, 16); },
                        src + 32, src);
         }),
         "cp.async to global memory");
}

// A two-stage cp.async pipeline over `tiles` tiles of 256 floats, each thread summing a
// neighbour's element of every tile (so the data crosses threads through shared memory, after
// a barrier). wait_depth 1 is correct: every iteration commits one group (possibly empty), so
// wait<1> retires the group of the tile about to be read. wait_depth 2 is the planted bug: the
// current tile may still be in flight. skip_wait plants a missing wait altogether, and
// skip_barrier the barrier after the wait (a wait covers only the calling thread's copies).
template <int WaitDepth>
__global__ void cp_async_pipeline_kernel(const float* src, int tiles, bool skip_wait, bool skip_barrier, float* out) {
  ATTNSEG_DYNAMIC_SMEM(smem);
  float* buf = reinterpret_cast<float*>(smem);  // 2 stages x 256 floats
  const int tid = threadIdx.x;                  // 64 threads, 4 floats (16 bytes) each per tile
  auto issue = [&](int tile) {
    cw::cp_async_16(buf + (tile % 2) * 256 + tid * 4, src + tile * 256 + tid * 4, 16);
  };
  issue(0);
  cw::cp_async_commit();
  float sum = 0;
  for (int k = 0; k < tiles; ++k) {
    if (k + 1 < tiles) issue(k + 1);
    cw::cp_async_commit();
    if (!skip_wait) cw::cp_async_wait<WaitDepth>();
    if (!skip_barrier) __syncthreads();
    sum += buf[(k % 2) * 256 + (tid * 4 + 37) % 256];
    __syncthreads();  // the stage is overwritten by the next issue
  }
  out[tid] = sum;
}

void test_cp_async_pipeline() {
  const int tiles = 5, n = 64;
  std::vector<float> src(tiles * 256);
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(int(i % 61) - 30);
  std::vector<float> expected(n, 0.0f);
  for (int t = 0; t < n; ++t)
    for (int k = 0; k < tiles; ++k) expected[t] += src[k * 256 + (t * 4 + 37) % 256];
  auto run = [&](auto kernel, bool skip_wait, bool skip_barrier, simt::Schedule s) {
    simt::set_schedule(s, 13);
    std::vector<float> out(n);
    simt::launch(dim3(1), dim3(n), 2 * 256 * sizeof(float), kernel, src.data(), tiles, skip_wait, skip_barrier,
                 out.data());
    return out;
  };
  std::vector<std::vector<float>> without_barrier;
  for (auto s : kSchedules) {
    EXPECT(run(cp_async_pipeline_kernel<1>, false, false, s) == expected, "the correct cp.async pipeline");
    EXPECT(run(cp_async_pipeline_kernel<2>, false, false, s) != expected,
           "a too-weak wait (wait<2>) must give wrong data");
    EXPECT(run(cp_async_pipeline_kernel<1>, true, false, s) != expected, "a missing wait must give wrong data");
    without_barrier.push_back(run(cp_async_pipeline_kernel<1>, false, true, s));
  }
  simt::set_schedule(simt::Schedule::Forward);
  EXPECT(std::memcmp(without_barrier[0].data(), without_barrier[1].data(), n * sizeof(float)) != 0,
         "without the barrier after the wait the forward and reverse schedules must disagree");
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
  test_mma_fragments<__half>("fp16");
  test_mma_fragments<__nv_bfloat16>("bf16");
  test_ldmatrix();
  test_ldmatrix_mma<__half>("fp16");
  test_ldmatrix_mma<__nv_bfloat16>("bf16");
  test_fragment_misuse();
  test_cp_async_groups();
  test_cp_async_misuse();
  test_cp_async_pipeline();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("simt emulator self-tests passed\n");
  return 0;
}
