#include "ops/cuda/column_sums.cuh"

#include <string>

namespace mhc::cuda::detail {
namespace {

// Blocks of 256 threads, `rows` rows of threads (a power of two, at most 32) across 256 /
// rows columns. A thread sums its column's chunks y, y + rows, ... with kChunkLoads loads in
// flight at a time (few chunks: one row of threads and one batch; the dbias/dalpha rows of
// grad_h's blocks: 1024 chunks, 32 rows of threads), then row 0 adds the rows' partials in
// order. (32 x 32 threads a block, one chunk a thread, was 9 us a dW sum of 22 chunks: nine
// waves of blocks whose threads mostly waited.)
constexpr int kChunkLoads = 16;
int chunk_sum_rows(int64_t chunks) {
  int rows = 1;
  while (rows < 32 && rows * kChunkLoads < chunks) rows *= 2;
  return rows;
}

struct ChunkSums {
  ChunkSum sum[kMaxChunkSums];
  int rows[kMaxChunkSums];
  int64_t first_block[kMaxChunkSums + 1];  // output k has blocks first_block[k] .. first_block[k + 1] - 1
  int size;
};

__global__ void add_chunk_sums_kernel(ChunkSums sums) {
  __shared__ float partials[256];
  int k = 0;
  while (k + 1 < sums.size && blockIdx.x >= sums.first_block[k + 1]) ++k;
  const ChunkSum& sum = sums.sum[k];
  const int rows = sums.rows[k], width = 256 / rows, x = threadIdx.x % width, y = threadIdx.x / width;
  const int64_t c = (blockIdx.x - sums.first_block[k]) * width + x;
  const bool valid = c < sum.count;
  const float* column = sum.partial + sum.first + c;
  float s = 0;
  if (valid)
    for (int64_t first = y; first < sum.chunks; first += static_cast<int64_t>(kChunkLoads) * rows) {
      float v[kChunkLoads];
#pragma unroll
      for (int u = 0; u < kChunkLoads; ++u) {
        const int64_t chunk = first + static_cast<int64_t>(u) * rows;
        v[u] = chunk < sum.chunks ? column[chunk * sum.stride] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kChunkLoads; ++u)
        if (first + static_cast<int64_t>(u) * rows < sum.chunks) s += v[u];
    }
  partials[threadIdx.x] = s;
  __syncthreads();
  if (y != 0 || !valid) return;
  float total = partials[x];
  for (int r = 1; r < rows; ++r) total += partials[r * width + x];
  sum.out[c] = sum.accumulate ? sum.out[c] + total : total;
}

}  // namespace

void add_chunk_sums(const ChunkSum* sums, int count, cudaStream_t stream) {
  ChunkSums launch{};
  for (int i = 0; i < count; ++i) {
    const ChunkSum& sum = sums[i];
    if (!sum.out || sum.count == 0) continue;
    check(launch.size < kMaxChunkSums, "add_chunk_sums: more than " + std::to_string(kMaxChunkSums) + " outputs");
    const int rows = chunk_sum_rows(sum.chunks);
    launch.sum[launch.size] = sum;
    launch.rows[launch.size] = rows;
    launch.first_block[launch.size + 1] = launch.first_block[launch.size] + blocks_for(sum.count, 256 / rows);
    ++launch.size;
  }
  if (launch.size == 0) return;
  add_chunk_sums_kernel<<<static_cast<unsigned>(launch.first_block[launch.size]), 256, 0, stream>>>(launch);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda::detail
