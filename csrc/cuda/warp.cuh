// Warp-level primitives of the flash-attention-2 class kernels: tensor-core MMA, ldmatrix and
// cp.async. Each is one device function with the inline PTX under nvcc and, under the SIMT
// emulator (tests/emu/simt.h), an implementation that follows the PTX ISA's per-lane fragment
// layout and completion semantics exactly, so a layout or ordering bug fails in the emulator as
// it would on hardware. The layouts below are the contract both sides implement.
//
// Notation: lane = threadIdx.x % 32, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group").
// A 32-bit register holding two 16-bit values holds the lower column (or k) index in its low half.
//
// mma_m16n8k16<T>(d, a, b, c): D[16x8] = A[16x16] · B[16x8] + C, T = __half or __nv_bfloat16,
// fp32 accumulation (PTX: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32).
//   A (row-major, 4 regs of 2 x T):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                                    a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B ("col": K x N, 2 regs):        b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, D (fp32, 4 regs):             c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
//
// ldmatrix_x{1,2,4}[_trans](r, row_ptr): loads 1, 2 or 4 8x8 matrices of 16-bit elements from
// shared memory (PTX: ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16). Lanes 8i..8i+7
// give the addresses of rows 0..7 of matrix i (each row 16 contiguous bytes, 16-byte aligned);
// for x1 / x2 only lanes 0-7 / 0-15 addresses are used (the others must still be valid values).
//   plain:  r[i] = M_i[g][2t, 2t+1]          (lane holds row g, two consecutive columns)
//   .trans: r[i] = M_i[2t][g], M_i[2t+1][g]  (the same fragment of M_iᵀ)
// So an x4 on the four 8x8 quadrants of a 16x16 row-major A tile (matrix order: rows 0-7 cols
// 0-7, rows 8-15 cols 0-7, rows 0-7 cols 8-15, rows 8-15 cols 8-15) yields exactly a[0..3] above.
//
// cp_async_16(smem_dst, gmem_src, src_bytes): an asynchronous copy of 16 bytes, global to shared
// (PTX: cp.async.cg.shared.global, 16-byte aligned addresses); only the first src_bytes (0..16)
// are read, the rest of the 16 destination bytes are zero-filled (src_bytes = 0: zeros, nothing
// read, so a masked-out tile edge needs no valid source). The copy is guaranteed complete only
// after this thread's cp_async_wait<N>() that retires its group, and visible to other threads
// only after a barrier following that wait.
// cp_async_commit(): closes this thread's pending copies into a group (cp.async.commit_group).
// cp_async_wait<N>(): waits until at most N of this thread's most recent groups are pending
// (cp.async.wait_group N); N = 0 waits for all.
//
// Cross-block ordering (the flash backward's ordered dQ accumulation, docs/flash_backward_design.md):
// ld_acquire_gpu(p) / st_release_gpu(p, v): a 32-bit global load with acquire / store with release
// semantics at GPU scope (ld.acquire.gpu.global.b32, st.release.gpu.global.b32): writes made by a
// block before its release store are visible to a block whose acquire load reads that value.
// wait_until_equal(p, v): spins on ld_acquire_gpu until *p == v, backing off with __nanosleep.
// Under the emulator blocks run one after another, in linear order for a launch that asks for it
// (the protocol's progress needs the device's in-order dispatch; without it the wait throws), so a
// wait can only succeed if its condition already holds: otherwise it throws simt::Error ("would
// deadlock") instead of hanging, and a protocol that waits on a later block fails the tests.
//
// Atomic reductions (the flash backward's default dQ accumulation):
// red_add_f32(p, a): *p += a in global memory, fp32, no value returned (red.global.add.f32).
// red_add_f32x2(p, a, b): p[0] += a and p[1] += b in global memory, fp32, no value returned; p is
// 8-byte aligned. PTX: one red.global.add.v2.f32 on sm_90 (PTX ISA 8.1; SASS REDG.E.ADD.F32x2),
// two red.global.add.f32 elsewhere (SASS RED.E.ADD.F32). Relaxed, GPU scope; .add.f32 on global
// memory flushes subnormal inputs and results to zero. The reductions of different threads land
// in no specified order, so a sum of three or more partials is not bitwise reproducible. The
// emulator queues them and applies them at the end of the launch in a shuffled order.
#pragma once

#include "compat.cuh"

namespace attnseg::cuda::warp {

// Two values packed in one 32-bit register, low half = first: the A/B operand element pairs.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

#if defined(__CUDACC__)

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "m16n8k16 takes fp16 or bf16");
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void red_add_f32(float* p, float a) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(a) : "memory");
}
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  red_add_f32(p, a);
  red_add_f32(p + 1, b);
#endif
}
__device__ __forceinline__ void wait_until_equal(const int* p, int v) {
  unsigned sleep_ns = 32;
  while (ld_acquire_gpu(p) != v) {
    __nanosleep(sleep_ns);
    if (sleep_ns < 1024) sleep_ns *= 2;
  }
}

#else  // ATTNSEG_SIMT_EMULATOR: tests/emu/simt.h provides simt::warp::* with the same contract

template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  return uint32_t(simt::float_to_half_bits(lo)) | (uint32_t(simt::float_to_half_bits(hi)) << 16);
}
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return uint32_t(simt::float_to_bf16_bits(lo)) | (uint32_t(simt::float_to_bf16_bits(hi)) << 16);
}

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "m16n8k16 takes fp16 or bf16");
  simt::warp::mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, d, a, b, c);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { simt::warp::ldmatrix(r, 4, false, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { simt::warp::ldmatrix(r, 4, true, p); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { simt::warp::ldmatrix(r, 2, false, p); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { simt::warp::ldmatrix(r, 2, true, p); }
inline void ldmatrix_x1(uint32_t (&r)[1], const void* p) { simt::warp::ldmatrix(r, 1, false, p); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { simt::warp::ldmatrix(r, 1, true, p); }
inline void cp_async_16(void* dst, const void* src, int src_bytes) { simt::warp::cp_async_16(dst, src, src_bytes); }
inline void cp_async_commit() { simt::warp::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  simt::warp::cp_async_wait(N);
}
// Blocks run one after another, so loads and stores are already ordered across blocks.
inline int ld_acquire_gpu(const int* p) { return *p; }
inline void st_release_gpu(int* p, int v) { *p = v; }
inline void red_add_f32(float* p, float a) { simt::red_add_f32(p, a); }
inline void red_add_f32x2(float* p, float a, float b) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) throw simt::Error("simt: red_add_f32x2 address not 8-byte aligned");
  simt::red_add_f32(p, a);
  simt::red_add_f32(p + 1, b);
}
inline void wait_until_equal(const int* p, int v) {
  if (!simt::options().linear_blocks)
    throw simt::Error("simt: a counter wait in a launch whose blocks run in shuffled order; the ordered protocol "
                      "needs in-order dispatch, which its launch must ask for");
  if (*p != v)
    throw simt::Error("simt: a wait for a counter value " + std::to_string(v) + " (now " + std::to_string(*p) +
                      ") would deadlock: blocks run in linear order, so only an earlier block could have set it");
}

#endif

}  // namespace attnseg::cuda::warp
