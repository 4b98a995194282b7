#include "ops/cuda/embedding.h"

#include <cub/device/device_radix_sort.cuh>

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

__global__ void embedding_forward_kernel(const int32_t* tokens, const float* wte, const float* wpe, int64_t seq,
                                         int64_t C, bf16* e) {
  const int64_t row = blockIdx.x, t = row % seq;
  const float* w = wte + static_cast<int64_t>(tokens[row]) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) e[row * C + c] = __float2bfloat16(w[c] + wpe[t * C + c]);
}

__global__ void iota_kernel(int32_t* out, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) out[i] = static_cast<int32_t>(i);
}

// dwte by runs of equal tokens in the sorted order, cut into chunks of kRunChunk entries so
// that no thread walks a long run (a byte-level corpus puts a sixth of a batch in the run
// of ' '; one block a run walked it one dependent load at a time). Each block takes a chunk
// and VEC channels a thread, the chunk's tokens and positions staged in shared memory.
// CONTINUATIONS: a chunk whose first entries continue a run from the chunk before sums
// them into its row of `continued` and does nothing else. Otherwise each run that starts in
// the chunk is summed over its entries there, then over the `continued` rows of the chunks
// it runs on into, in order, and added to dwte: a fixed order, so deterministic.
constexpr int kRunChunk = 32, kRunThreads = 128;

template <int VEC, bool CONTINUATIONS>
__global__ void __launch_bounds__(kRunThreads)
    run_sums_kernel(const bf16* grad_e, const int32_t* sorted_tokens, const int32_t* positions, int64_t rows, int64_t C,
                    float* continued, float* grad_wte) {
  __shared__ int32_t token_of[kRunChunk], position_of[kRunChunk];
  const int64_t chunk = blockIdx.x, first = chunk * kRunChunk;
  const int count = static_cast<int>(min(static_cast<int64_t>(kRunChunk), rows - first));
  if (threadIdx.x < count) {
    token_of[threadIdx.x] = sorted_tokens[first + threadIdx.x];
    position_of[threadIdx.x] = positions[first + threadIdx.x];
  }
  __syncthreads();
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kRunThreads + threadIdx.x) * VEC;
  if (c >= C) return;
  // The entries [0, head) continue a run from the chunk before.
  int head = 0;
  if (first > 0 && sorted_tokens[first - 1] == token_of[0])
    while (head < count && token_of[head] == token_of[0]) ++head;
  if (CONTINUATIONS && head == 0) return;
  float sum[VEC] = {};
  auto add_entry = [&](int e) {
    float v[VEC];
    detail::load_bf16<VEC>(grad_e + static_cast<int64_t>(position_of[e]) * C + c, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] += v[k];
  };
  if constexpr (CONTINUATIONS) {
    for (int e = 0; e < head; ++e) add_entry(e);
#pragma unroll
    for (int k = 0; k < VEC; ++k) continued[chunk * C + c + k] = sum[k];
  } else {
    for (int e = head; e < count;) {
      const int32_t token = token_of[e];
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] = 0;
      for (; e < count && token_of[e] == token; ++e) add_entry(e);
      if (e == count && first + count < rows) {
        // The chunk's last run may go on into the next chunks: its end by binary search (the
        // tokens ascend), so that the continued rows' loads need not wait on each other.
        int64_t end = first + count, high = rows;
        while (end < high) {
          const int64_t middle = (end + high) / 2;
          if (sorted_tokens[middle] <= token)
            end = middle + 1;
          else
            high = middle;
        }
        const int64_t last = (end + kRunChunk - 1) / kRunChunk;  // chunks before it begin with the run
#pragma unroll 4
        for (int64_t next = chunk + 1; next < last; ++next)
#pragma unroll
          for (int k = 0; k < VEC; ++k) sum[k] += continued[next * C + c + k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) grad_wte[static_cast<int64_t>(token) * C + c + k] += sum[k];
    }
  }
}

__global__ void position_sums_kernel(const bf16* grad_e, int64_t batch, int64_t seq, int64_t C, float* grad_wpe) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= seq * C) return;
  float s = 0;
  for (int64_t b = 0; b < batch; ++b) s += __bfloat162float(grad_e[b * seq * C + e]);
  grad_wpe[e] += s;
}

int vocab_bits(int64_t vocab) {
  int bits = 1;
  while ((int64_t{1} << bits) < vocab) ++bits;
  return bits;
}

// Workspace: the chunks' continued sums (fp32, [chunks][C]), sorted tokens, positions in,
// positions out (int32 each), then cub's storage.
struct SortLayout {
  size_t continued, ints, cub_bytes, total;
};
SortLayout sort_layout(int64_t rows, int64_t C) {
  SortLayout l{};
  l.continued = static_cast<size_t>((rows + kRunChunk - 1) / kRunChunk * C * sizeof(float) + 255) / 256 * 256;
  l.ints = static_cast<size_t>((rows + 63) / 64 * 64);
  MHC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, l.cub_bytes, static_cast<const int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), static_cast<int>(rows)));
  l.total = l.continued + 3 * l.ints * sizeof(int32_t) + l.cub_bytes;
  return l;
}

// One block a row, VEC adjacent logits a thread step (8: 16-byte accesses, when V % 8 == 0).
// Pass 1 keeps a running (max, sum of exponentials) pair per thread, rescaling the sum when
// the max grows; the pairs are merged in a fixed order. Pass 2 writes the gradient over the
// logits. STAGED: pass 1 also copies the row into shared memory and pass 2 reads it from
// there (one read of the row from memory), when V bf16 fit. Exponentials are exp2 of
// log2e-scaled logits on the special function unit (the kernel is bound by them and by
// memory). Pass 1 issues kLossLoads loads a thread before using them: at 512 threads and two
// rows a multiprocessor, one 16-byte load a thread in flight left the reads latency-bound.
constexpr int kLossThreads = 512, kLossLoads = 4;
constexpr float kLog2e = 1.4426950408889634f;
using detail::exp2_fast;
struct MaxSum {
  float max, sum;  // max of the logits times log2e; the sum of 2^(logit log2e - max)
};
__device__ inline MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.sum * exp2_fast(a.max - m) + b.sum * exp2_fast(b.max - m)};
}

template <int VEC, bool STAGED>
__global__ void __launch_bounds__(kLossThreads) cross_entropy_kernel(bf16* logits, const int32_t* __restrict__ targets,
                                                                     int64_t V, float scale, float* __restrict__ losses) {
  extern __shared__ __align__(16) bf16 staged[];
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * V;
  const int32_t target = targets[r];
  float target_logit = 0;
  if (threadIdx.x == 0) target_logit = __bfloat162float(row[target]);  // read before pass 2 overwrites it
  MaxSum ms{-INFINITY, 0.0f};
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t v0 = threadIdx.x * VEC; v0 < V; v0 += kLossLoads * step) {
    float x[kLossLoads][VEC];
#pragma unroll
    for (int u = 0; u < kLossLoads; ++u)
      if (v0 + u * step < V) detail::load_bf16<VEC>(row + v0 + u * step, x[u]);
#pragma unroll
    for (int u = 0; u < kLossLoads; ++u) {
      const int64_t v = v0 + u * step;
      if (v >= V) break;
      if constexpr (STAGED) detail::store_bf16<VEC>(staged + v, x[u]);
      float mx = x[u][0];
#pragma unroll
      for (int k = 1; k < VEC; ++k) mx = fmaxf(mx, x[u][k]);
      mx *= kLog2e;
      if (mx > ms.max) {
        ms.sum *= exp2_fast(ms.max - mx);
        ms.max = mx;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) ms.sum += exp2_fast(fmaf(x[u][k], kLog2e, -ms.max));
    }
  }
  for (int offset = 16; offset > 0; offset /= 2)
    ms = merge(ms, {__shfl_xor_sync(0xffffffffu, ms.max, offset), __shfl_xor_sync(0xffffffffu, ms.sum, offset)});
  __shared__ MaxSum warps[kLossThreads / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = ms;
  __syncthreads();
  MaxSum total = warps[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = merge(total, warps[w]);
  const float mx = total.max, inverse = 1.0f / total.sum;
  const bf16* source = STAGED ? staged : row;
  for (int64_t v = threadIdx.x * VEC; v < V; v += blockDim.x * VEC) {
    float x[VEC];
    detail::load_bf16<VEC>(source + v, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      x[k] = (exp2_fast(fmaf(x[k], kLog2e, -mx)) * inverse - (v + k == target ? 1.0f : 0.0f)) * scale;
    detail::store_bf16<VEC>(row + v, x);
  }
  if (threadIdx.x == 0) losses[r] = (log2f(total.sum) + mx) / kLog2e - target_logit;
}

}  // namespace

void embedding_forward(const int32_t* tokens, const float* wte, const float* wpe, int64_t batch, int64_t seq,
                       int64_t C, bf16* e, cudaStream_t stream) {
  check(batch >= 1 && seq >= 1 && C >= 1, "embedding: empty input");
  embedding_forward_kernel<<<detail::blocks_for(batch * seq, 1), 256, 0, stream>>>(tokens, wte, wpe, seq, C, e);
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t embedding_backward_workspace_bytes(int64_t batch, int64_t seq, int64_t C) {
  return sort_layout(batch * seq, C).total;
}

void embedding_backward(const bf16* grad_e, const int32_t* tokens, int64_t batch, int64_t seq, int64_t C,
                        int64_t vocab, float* grad_wte, float* grad_wpe, void* workspace, cudaStream_t stream) {
  const int64_t rows = batch * seq;
  check(rows >= 1 && C >= 1 && rows <= 0x7fffffff, "embedding: input size out of range");
  const SortLayout l = sort_layout(rows, C);
  float* continued = static_cast<float*>(workspace);
  int32_t* sorted_tokens = reinterpret_cast<int32_t*>(static_cast<unsigned char*>(workspace) + l.continued);
  int32_t* positions_in = sorted_tokens + l.ints;
  int32_t* positions = positions_in + l.ints;
  void* cub_storage = positions + l.ints;
  size_t cub_bytes = l.cub_bytes;
  iota_kernel<<<detail::blocks_for(rows, 256), 256, 0, stream>>>(positions_in, rows);
  MHC_CUDA_CHECK(cudaGetLastError());
  MHC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_storage, cub_bytes, tokens, sorted_tokens, positions_in,
                                                 positions, static_cast<int>(rows), 0, vocab_bits(vocab), stream));
  auto run_sums = [&](auto continuations_kernel, auto runs_kernel, int vec) {
    const dim3 grid(detail::blocks_for(rows, kRunChunk), detail::blocks_for((C + vec - 1) / vec, kRunThreads));
    continuations_kernel<<<grid, kRunThreads, 0, stream>>>(grad_e, sorted_tokens, positions, rows, C, continued,
                                                           grad_wte);
    MHC_CUDA_CHECK(cudaGetLastError());
    runs_kernel<<<grid, kRunThreads, 0, stream>>>(grad_e, sorted_tokens, positions, rows, C, continued, grad_wte);
    MHC_CUDA_CHECK(cudaGetLastError());
  };
  if (C % 8 == 0)
    run_sums(run_sums_kernel<8, true>, run_sums_kernel<8, false>, 8);
  else
    run_sums(run_sums_kernel<1, true>, run_sums_kernel<1, false>, 1);
  position_sums_kernel<<<detail::blocks_for(seq * C, 256), 256, 0, stream>>>(grad_e, batch, seq, C, grad_wpe);
  MHC_CUDA_CHECK(cudaGetLastError());
}

void cross_entropy(bf16* logits, const int32_t* targets, int64_t rows, int64_t V, float scale, float* losses,
                   cudaStream_t stream) {
  check(rows >= 1 && V >= 1, "cross_entropy: empty input");
  check(rows <= 0x7fffffff, "cross_entropy: too many rows");
  int device = 0, shared_limit = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&device));
  MHC_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t row_bytes = static_cast<size_t>(V) * sizeof(bf16);
  // Leave room for the kernel's static shared memory (the per-warp pairs).
  const bool staged = row_bytes + 1024 <= static_cast<size_t>(shared_limit);
  auto launch = [&](auto kernel, size_t shared) {
    allow_shared_bytes(kernel, shared);
    kernel<<<static_cast<unsigned>(rows), kLossThreads, shared, stream>>>(logits, targets, V, scale, losses);
  };
  if (V % 8 == 0) {
    if (staged) launch(cross_entropy_kernel<8, true>, row_bytes);
    else launch(cross_entropy_kernel<8, false>, 0);
  } else {
    if (staged) launch(cross_entropy_kernel<1, true>, row_bytes);
    else launch(cross_entropy_kernel<1, false>, 0);
  }
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
