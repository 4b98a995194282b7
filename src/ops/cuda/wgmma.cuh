// Hopper's warpgroup matrix products (wgmma.mma_async, sm_90a): a warpgroup (four warps)
// computes a 64 x 64 product slice of D += A B per instruction, B (and A, or A from
// registers) read by the tensor cores straight from shared memory through a descriptor.
//
// Only what the attention kernels use: bf16 operands with fp32 sums, m64n64k16, tiles
// with 128-byte rows (64 bf16) in the 128-byte swizzle. Compiled only for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); callers keep another path for other targets.
//
// Layouts (per warp w of the warpgroup, lane = 4 g + q): D's rows 16 w + g and + 8, and
// for each n8 tile j its columns 8 j + 2 q and + 1: d[j][0..1] row g, d[j][2..3] row g + 8,
// the layout of mma.sync's m16n8 accumulators. A from registers takes mma.sync's m16n8k16
// A fragment of the warp's 16 rows.
#pragma once
#include <cstdint>

namespace mhc::cuda::detail {

// A tile of 128-byte rows in the 128-byte swizzle: row r's 16-byte chunk c at chunk
// c ^ (r % 8) of the row. The tile starts 1024-byte aligned, so that the swizzle, which
// the hardware applies to address bits, lines up with the rows.
__device__ inline int swizzled_chunk(int row, int chunk) { return chunk ^ (row & 7); }

// The descriptor of such a tile's operand from `start`: eight-row groups 1024 bytes apart
// (the stride byte offset). The leading byte offset is unused by this layout: K-major
// operands take 16 k (32 bytes) of a row, MN-major ones (transposed) 64 columns, one block.
// K-major k steps advance `start` by 32 bytes within the rows, MN-major ones by 16 rows.
__device__ inline uint64_t wgmma_descriptor(const void* start) {
  const uint64_t address = static_cast<uint32_t>(__cvta_generic_to_shared(start));
  constexpr uint64_t kLeading = 16 >> 4, kStride = 1024 >> 4, kSwizzle128 = 1;
  return ((address & 0x3FFFF) >> 4) | kLeading << 16 | kStride << 32 | kSwizzle128 << 62;
}

// Orders this thread's generic-proxy writes to shared memory (st.shared, cp.async) before
// the tensor cores' reads through descriptors (the async proxy); then a barrier.
__device__ inline void fence_shared_for_wgmma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Before a warpgroup's first product that reads registers other instructions wrote.
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING> __device__ inline void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
// Keeps the compiler from moving the accumulators' uses across a wait (it cannot see that
// the products write them asynchronously).
__device__ inline void wgmma_hold(float (&d)[8][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

#define MHC_WGMMA_D                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "  \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
// The accumulators as operands: "+f" (read and written) or "=f" (written only, where the
// product does not add to them: the compiler then needs no value in them before).
#define MHC_WGMMA_D_OPERANDS(c, d)                                                                        \
  c(d[0][0]), c(d[0][1]), c(d[0][2]), c(d[0][3]), c(d[1][0]), c(d[1][1]), c(d[1][2]), c(d[1][3]), c(d[2][0]), \
      c(d[2][1]), c(d[2][2]), c(d[2][3]), c(d[3][0]), c(d[3][1]), c(d[3][2]), c(d[3][3]), c(d[4][0]),        \
      c(d[4][1]), c(d[4][2]), c(d[4][3]), c(d[5][0]), c(d[5][1]), c(d[5][2]), c(d[5][3]), c(d[6][0]),        \
      c(d[6][1]), c(d[6][2]), c(d[6][3]), c(d[7][0]), c(d[7][1]), c(d[7][2]), c(d[7][3])

// d (+)= A B, m64n64k16, A and B from shared memory (K-major): ACCUMULATE d += A B, else d = A B.
template <bool ACCUMULATE> __device__ inline void wgmma_64x64x16(float (&d)[8][4], uint64_t a, uint64_t b) {
  if constexpr (ACCUMULATE)
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MHC_WGMMA_D ", %32, %33, 1, 1, 1, 0, 0;\n"
                 : MHC_WGMMA_D_OPERANDS("+f", d)
                 : "l"(a), "l"(b));
  else
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MHC_WGMMA_D ", %32, %33, 0, 1, 1, 0, 0;\n"
                 : MHC_WGMMA_D_OPERANDS("=f", d)
                 : "l"(a), "l"(b));
}

// d = A B over KS k steps of 16, A and B from shared memory (K-major: a k step advances the
// descriptors' start by 32 bytes).
template <int KS> __device__ inline void wgmma_64x64(float (&d)[8][4], uint64_t a, uint64_t b) {
  wgmma_64x64x16<false>(d, a, b);
#pragma unroll
  for (int ks = 1; ks < KS; ++ks) wgmma_64x64x16<true>(d, a + 2 * ks, b + 2 * ks);
}

// d += A B, m64n64k16, A from registers (the warp's m16n8k16 A fragment), B from shared
// memory MN-major (stored [k][n], n contiguous: transposed). The product reads `a` while it
// runs, and neither the compiler nor ptxas keeps those registers from being rewritten
// before the wait: write new values into them only after wgmma_wait (session 18 found a
// forward that converted the next P into them early reading wrong values).
__device__ inline void wgmma_64x64x16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MHC_WGMMA_D ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
      : MHC_WGMMA_D_OPERANDS("+f", d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

#undef MHC_WGMMA_D
#undef MHC_WGMMA_D_OPERANDS

}  // namespace mhc::cuda::detail
