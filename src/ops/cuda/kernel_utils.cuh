// Shared pieces of the CUDA kernels: the stream-count dispatch (n as a template
// parameter, so per-token n×n work stays in registers), fixed-order reductions, bf16
// vector loads and the tensor-core and cp.async primitives.
#pragma once
#include <cuda_bf16.h>

#include <string>
#include <type_traits>

#include "core/error.h"
#include "ops/cpu/h_post_bda.h"

namespace mhc::cuda::detail {

constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / 32;

// Per-token kernels: a token's threads are the whole block (lanes == blockDim.x, one token
// a block) or one warp (lanes == 32, blockDim.x / 32 tokens a block).
struct TokenGroup {
  int64_t token;
  int lane, lanes;
};
// `block`: the block's index among the token blocks (blockIdx.x unless a launch puts
// other blocks first).
__device__ inline TokenGroup token_group(int lanes, unsigned block) {
  if (lanes == 32)
    return {static_cast<int64_t>(block) * (blockDim.x / 32) + threadIdx.x / 32, static_cast<int>(threadIdx.x % 32), 32};
  return {static_cast<int64_t>(block), static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
}
__device__ inline TokenGroup token_group(int lanes) { return token_group(lanes, blockIdx.x); }

// Sum over COUNT lanes STRIDE apart (an xor butterfly: the lanes of a pair add the same two
// values, so every lane gets the same bits).
template <int STRIDE, int COUNT> __device__ inline float lanes_sum(float v) {
#pragma unroll
  for (int offset = STRIDE * COUNT / 2; offset >= STRIDE; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ inline float warp_sum(float v) { return lanes_sum<1, 32>(v); }

// One step of group_sum's warp reduction: at each xor offset a lane keeps half of the LIVE
// values it carries (the upper half where its offset bit is set) and adds its partner's copy
// of that half, sending the other; once one is left, plain butterfly steps.
template <int LIVE, int OFFSET, int P>
__device__ inline void halving_sum(float (&v)[P], int lane) {
  if constexpr (OFFSET >= 1) {
    if constexpr (LIVE > 1) {
      const bool upper = lane & OFFSET;
#pragma unroll
      for (int k = 0; k < LIVE / 2; ++k) {
        const float send = upper ? v[k] : v[k + LIVE / 2], keep = upper ? v[k + LIVE / 2] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
      }
      halving_sum<LIVE / 2, OFFSET / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFFSET);
      halving_sum<1, OFFSET / 2>(v, lane);
    }
  }
}
constexpr int power_of_two_at_least(int v) { return v <= 1 ? 1 : 2 * power_of_two_at_least((v + 1) / 2); }

// Sums V per-thread values over a token's group and calls each(k, total k) once for every
// k < V, on one thread of the group. Fixed order: within a warp the xor butterfly's pairwise
// sums (offsets 16, 8, ..., 1), each lane carrying only the half of the values it will hold
// (halving_sum: the same additions, so the same bits as a butterfly of every value, in
// about V shuffles instead of 5 V); a whole-block group then adds the warps' totals in warp
// order through shared memory and synchronises the block, also after reading them, so that
// calls may follow one another.
template <int V, typename Each>
__device__ void group_sum(float (&values)[V], int lanes, Each&& each) {
  constexpr int P = power_of_two_at_least(V), kHeld = P >= 32 ? P / 32 : 1, kSharing = P >= 32 ? 1 : 32 / P;
  const int lane = static_cast<int>(threadIdx.x % 32);
  float v[P];
#pragma unroll
  for (int k = 0; k < P; ++k) v[k] = k < V ? values[k] : 0.0f;
  halving_sum<P, 16>(v, lane);
  // lane l holds the totals from l P / 32, the lowest lane of those that share them owns them
  const int first = lane * P / 32;
  const bool owner = lane % kSharing == 0;
  if (lanes == 32) {
#pragma unroll
    for (int j = 0; j < kHeld; ++j)
      if (owner && first + j < V) each(first + j, v[j]);
    return;
  }
  __shared__ float partial[V][kBlockWarps];
  const int warp = static_cast<int>(threadIdx.x / 32), warps = static_cast<int>(blockDim.x) / 32;
#pragma unroll
  for (int j = 0; j < kHeld; ++j)
    if (owner && first + j < V) partial[first + j][warp] = v[j];
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.x); k < V; k += static_cast<int>(blockDim.x)) {
    float s = 0;
    for (int w = 0; w < warps; ++w) s += partial[k][w];
    each(k, s);
  }
  __syncthreads();
}

// 2^x on the special function unit (relative error about 2^-22; x = -inf gives 0).
__device__ inline float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The two bf16 of a 32-bit word as floats (element 0 in the low half). A bf16 is the high
// half of its float, so each is one shift or mask; __bfloat1622float2 cost the high half a
// byte permute and a multiply (a quarter of the dx/dW kernel's instructions were unpacking).
__device__ inline void unpack_bf16x2(uint32_t word, float& first, float& second) {
  first = __uint_as_float(word << 16);
  second = __uint_as_float(word & 0xffff0000u);
}

// Loads VEC consecutive bf16 (8-byte vectors when VEC is 4, 16-byte ones when VEC is a
// multiple of 8) as floats.
template <int VEC> __device__ inline void load_bf16(const __nv_bfloat16* p, float (&out)[VEC]) {
  if constexpr (VEC > 8 && VEC % 8 == 0) {
#pragma unroll
    for (int chunk = 0; chunk < VEC / 8; ++chunk)
      load_bf16<8>(p + 8 * chunk, *reinterpret_cast<float(*)[8]>(out + 8 * chunk));
  } else if constexpr (VEC == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    unpack_bf16x2(raw.x, out[0], out[1]);
    unpack_bf16x2(raw.y, out[2], out[3]);
  } else if constexpr (VEC == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    unpack_bf16x2(raw.x, out[0], out[1]);
    unpack_bf16x2(raw.y, out[2], out[3]);
    unpack_bf16x2(raw.z, out[4], out[5]);
    unpack_bf16x2(raw.w, out[6], out[7]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = __bfloat162float(p[k]);
  }
}

template <int VEC> __device__ inline void store_bf16(__nv_bfloat16* p, const float (&in)[VEC]) {
  if constexpr (VEC > 8 && VEC % 8 == 0) {
#pragma unroll
    for (int chunk = 0; chunk < VEC / 8; ++chunk)
      store_bf16<8>(p + 8 * chunk, *reinterpret_cast<const float(*)[8]>(in + 8 * chunk));
  } else if constexpr (VEC == 4) {
    uint2 raw;
    *reinterpret_cast<__nv_bfloat162*>(&raw.x) = __floats2bfloat162_rn(in[0], in[1]);
    *reinterpret_cast<__nv_bfloat162*>(&raw.y) = __floats2bfloat162_rn(in[2], in[3]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else if constexpr (VEC == 8) {
    uint4 raw;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) pairs[k] = __floats2bfloat162_rn(in[2 * k], in[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = __float2bfloat16(in[k]);
  }
}

// VEC consecutive floats (one 16-byte access when VEC is 4).
template <int VEC>
__device__ inline void load_floats(const float* p, float (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == 4, "scalars or 16-byte vectors");
  if constexpr (VEC == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    out[0] = f.x, out[1] = f.y, out[2] = f.z, out[3] = f.w;
  } else {
    out[0] = *p;
  }
}
template <int VEC>
__device__ inline void store_floats(float* p, const float (&in)[VEC]) {
  static_assert(VEC == 1 || VEC == 4, "scalars or 16-byte vectors");
  if constexpr (VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    *p = in[0];
  }
}

// Tensor cores (sm_80+): c += a b for one m16n8k16 tile, bf16 operands, fp32 sums.
// Fragments (g = lane / 4, q = lane % 4): a = A rows g, g + 8 at columns 2q.. and 2q + 8..;
// b = B rows 2q.., 2q + 8.. at column g; c = C rows g, g + 8 at columns 2q, 2q + 1.
__device__ inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A shared-memory pointer as the 32-bit shared-window address that PTX instructions take.
__device__ inline unsigned shared_address(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// COUNT (2 or 4) 8x8 bf16 matrices from shared memory; lane i gives the address of row
// i % 8 of matrix i / 8 (lanes past 8 COUNT: any valid address). TRANS delivers each
// matrix transposed.
template <int COUNT, bool TRANS> __device__ inline void ldmatrix(uint32_t (&r)[COUNT], const void* shared_row) {
  static_assert(COUNT == 2 || COUNT == 4, "ldmatrix: 2 or 4 matrices");
  const unsigned address = shared_address(shared_row);
  if constexpr (COUNT == 2 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  else if constexpr (COUNT == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  else if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Asynchronous global -> shared copies (cp.async): BYTES of 4, 8 or a multiple of 16; zeros where !valid
// (global must still be a valid address).
template <int BYTES> __device__ inline void copy_async(void* shared, const void* global, bool valid) {
  const unsigned address = shared_address(shared);
  const int bytes = valid ? 16 : 0;
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int chunk = 0; chunk < BYTES / 16; ++chunk)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address + 16 * chunk),
                   "l"(static_cast<const unsigned char*>(global) + 16 * chunk), "r"(bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(address), "l"(global), "n"(BYTES),
                 "r"(valid ? BYTES : 0));
  }
}
// The first `bytes` (0 to 16, a multiple of 4) of a 16-byte chunk, zeros after. A part of a
// chunk goes as four 4-byte copies, so that nothing past `bytes` is addressed (a 16-byte copy
// of fewer source bytes reads only those, but compute-sanitizer takes it for 16).
__device__ inline void copy_async_prefix(void* shared, const void* global, int bytes) {
  const unsigned address = shared_address(shared);
  if (bytes == 0 || bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
    return;
  }
  const auto* from = static_cast<const unsigned char*>(global);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool in = 4 * k < bytes;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(address + 4 * k), "l"(in ? from + 4 * k : from),
                 "r"(in ? 4 : 0));
  }
}
__device__ inline void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING> __device__ inline void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

// Bulk copies (sm_90+): one thread moves a contiguous run of bytes global -> shared without
// per-chunk address arithmetic, and an mbarrier in shared memory counts its bytes in. The
// barrier's phase completes when its `arrivals` have arrived and every byte they announced
// has landed; waiters pass the parity of the phase they wait for (0, 1, 0, ... per use).
// Below sm_90 kBulkCopies is false and the helpers compile to nothing (callers test it, but
// a debug build keeps their dead branches, whose instructions that target would reject).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MHC_BULK_COPIES 1
#else
#define MHC_BULK_COPIES 0
#endif
constexpr bool kBulkCopies = MHC_BULK_COPIES;
__device__ inline void barrier_init(uint64_t* barrier, int arrivals) {
#if MHC_BULK_COPIES
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(arrivals) : "memory");
#endif
}
// Arrives, announcing `bytes` still to land (0: a plain arrival).
__device__ inline void barrier_arrive(uint64_t* barrier, unsigned bytes) {
#if MHC_BULK_COPIES
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
#endif
}
__device__ inline void barrier_wait(uint64_t* barrier, unsigned parity) {
#if MHC_BULK_COPIES
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
#endif
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned), counted on `barrier`. The
// block's earlier reads of `shared` need only a block barrier before it (the copy's writes
// are not ordered against them by a proxy fence, as for TMA loads).
__device__ inline void copy_bulk(void* shared, const void* global, unsigned bytes, uint64_t* barrier) {
#if MHC_BULK_COPIES
  const unsigned to = shared_address(shared), landed = shared_address(barrier);
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(to),
               "l"(global), "r"(bytes), "r"(landed)
               : "memory");
#endif
}
#undef MHC_BULK_COPIES

// A dropout spec's key where the kernel runs (cpu::DropoutSpec::key_on_device).
__device__ inline uint64_t dropout_key(const cpu::DropoutSpec& d) { return d.key_on_device ? *d.key_on_device : d.key; }

template <typename Launch> void dispatch_streams(int n, Launch&& launch) {
  switch (n) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 6: launch(std::integral_constant<int, 6>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    default: fail("num_residual_streams: " + std::to_string(n) + " has no CUDA kernel (1, 2, 4, 6 or 8)");
  }
}

// Where a kernel's dropout mask comes from: none (p = 0: the hash compiled out, which would
// otherwise hold registers in every kernel that has it), the Philox stream, or the bits an
// earlier kernel kept. launch(std::integral_constant<Drop, ...>).
enum class Drop { kOff, kPhilox, kBits };
template <typename Launch> void dispatch_drop(float p, bool bits, Launch&& launch) {
  if (p <= 0.0f) launch(std::integral_constant<Drop, Drop::kOff>{});
  else if (bits) launch(std::integral_constant<Drop, Drop::kBits>{});
  else launch(std::integral_constant<Drop, Drop::kPhilox>{});
}

// Whether address p is a multiple of `bytes` (vector accesses need it).
inline bool is_aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline unsigned blocks_for(int64_t count, int64_t per_block) {
  const int64_t blocks = (count + per_block - 1) / per_block;
  check(blocks >= 1 && blocks <= 0x7fffffff, "work size out of range for the CUDA kernels");
  return static_cast<unsigned>(blocks);
}

// A launch of a per-token kernel (TokenGroup): a warp a token where a row of C channels
// (in steps of `vec`) is at most 8 steps of a warp (GPT-2 widths: no block-wide
// synchronisation, several tokens a block); else a block a token, with enough whole warps
// for the row (at most 256).
struct TokenLaunch {
  unsigned grid, threads;
  int lanes;
};
inline TokenLaunch token_launch(int64_t tokens, int64_t C, int vec) {
  check(tokens >= 1 && tokens <= 0x7fffffff, "token count out of range for the CUDA kernels");
  const int64_t groups = (C + vec - 1) / vec;
  if (groups <= 8 * 32) return {blocks_for(tokens, kBlockThreads / 32), kBlockThreads, 32};
  const int64_t whole_warps = (groups + 31) / 32 * 32;
  const int threads = static_cast<int>(whole_warps < kBlockThreads ? whole_warps : kBlockThreads);
  return {static_cast<unsigned>(tokens), static_cast<unsigned>(threads), threads};
}

// Launches kernel<VEC = 8> when C % 8 == 0 (16-byte accesses), else kernel<1>:
// launch(kernel, TokenLaunch) with the kernel a function pointer.
template <typename Vec8, typename Vec1, typename Launch>
void launch_by_width(int64_t tokens, int64_t C, Vec8 vec8, Vec1 vec1, Launch&& launch) {
  if (C % 8 == 0) launch(vec8, token_launch(tokens, C, 8));
  else launch(vec1, token_launch(tokens, C, 1));
}

// The aggregate of one token at VEC channels: acc = sum_j gate[j] xs[j], in the order
// j = 0, 1, ... (every kernel that makes it gives the same bits), from the streams' values
// at those channels (aggregate_of) or from x (aggregate_values: channels c..c + VEC).
template <int N, int VEC>
__device__ inline void aggregate_of(const float (&xs)[N][VEC], const float* gate, float (&acc)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] += gate[j] * xs[j][v];
}
template <int N, int VEC>
__device__ inline void aggregate_values(const __nv_bfloat16* xt, const float* gate, int64_t C, int64_t c,
                                        float (&acc)[VEC]) {
  float xs[N][VEC];
#pragma unroll
  for (int j = 0; j < N; ++j) load_bf16<VEC>(xt + j * C + c, xs[j]);
  aggregate_of<N, VEC>(xs, gate, acc);
}
// The aggregate row of one token on its group's threads.
template <int N, int VEC>
__device__ inline void aggregate_row(const __nv_bfloat16* xt, const float (&gate)[N], int64_t C, const TokenGroup& tg,
                                     __nv_bfloat16* agg) {
  for (int64_t c = tg.lane * VEC; c < C; c += tg.lanes * VEC) {
    float acc[VEC];
    aggregate_values<N, VEC>(xt, gate, C, c, acc);
    store_bf16<VEC>(agg + c, acc);
  }
}

}  // namespace mhc::cuda::detail
