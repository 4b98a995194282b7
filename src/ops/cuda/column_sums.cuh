// Deterministic sums over rows, per column, of V values a (row, column) given by a functor:
// out_v[c] += sum_r value(r, c)[v]. Rows go in chunks (one fp32 partial per chunk, 8 rows
// of threads summed in order), then the chunks in a fixed order, so the result does not
// depend on scheduling. The chunk height depends only on the shape (rows, cols): narrow
// shapes take shorter chunks so that the first pass still has about kColumnBlocks blocks.
// Used for bias and norm-weight gradients.
#pragma once
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <initializer_list>

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda::detail {

constexpr int64_t kColumnBlocks = 1024;

// Columns a first-pass block covers: 32 threads of 8 columns (16-byte loads) when the
// width is a multiple of 8, else of 1.
inline int64_t column_tile(int64_t cols) { return cols % 8 == 0 ? 256 : 32; }
inline int64_t column_chunk_rows(int64_t rows, int64_t cols) {
  const int64_t tiles = (cols + column_tile(cols) - 1) / column_tile(cols);
  int64_t chunk = 256;
  while (chunk > 32 && tiles * ((rows + chunk - 1) / chunk) < kColumnBlocks) chunk /= 2;
  return chunk;
}
inline int64_t column_chunks(int64_t rows, int64_t cols) {
  const int64_t chunk = column_chunk_rows(rows, cols);
  return (rows + chunk - 1) / chunk;
}
// Workspace floats of column_sums<V>.
inline size_t column_sums_workspace_floats(int V, int64_t rows, int64_t cols) {
  return static_cast<size_t>(column_chunks(rows, cols) * V * cols);
}

// A Value functor fills out[v][k], value v of (row r, column c + k), for COLS adjacent
// columns: `template <int COLS> __device__ void operator()(int64_t r, int64_t c,
// float (&out)[V][COLS]) const`. COLS is 8 (16-byte loads) when the width is a multiple of
// 8, else 1.

// partial[chunk][v][c]; block (32, 8): 32 threads across COLS-column groups, 8 rows of
// threads; grid (column tiles of 32 COLS, chunks).
template <int V, int COLS, typename Value>
__global__ void column_partials_kernel(Value value, int64_t rows, int64_t cols, int64_t chunk_rows, float* partial) {
  __shared__ float sums[V][8][32 * COLS + 1];
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * COLS;
  const int64_t begin = blockIdx.y * chunk_rows, end = min(rows, begin + chunk_rows);
  float s[V][COLS] = {};
  if (c < cols)
    for (int64_t r = begin + threadIdx.y; r < end; r += 8) {
      float v[V][COLS];
      value.template operator()<COLS>(r, c, v);
#pragma unroll
      for (int i = 0; i < V; ++i)
#pragma unroll
        for (int k = 0; k < COLS; ++k) s[i][k] += v[i][k];
    }
#pragma unroll
  for (int i = 0; i < V; ++i)
#pragma unroll
    for (int k = 0; k < COLS; ++k) sums[i][threadIdx.y][threadIdx.x * COLS + k] = s[i][k];
  __syncthreads();
  // The block's 32 COLS columns, each summed over the 8 rows of threads in order.
  for (int e = threadIdx.y * 32 + threadIdx.x; e < V * 32 * COLS; e += 256) {
    const int i = e / (32 * COLS), local = e % (32 * COLS);
    const int64_t column = static_cast<int64_t>(blockIdx.x) * 32 * COLS + local;
    if (column >= cols) continue;
    float total = 0;
    for (int k = 0; k < 8; ++k) total += sums[i][k][local];
    partial[(blockIdx.y * V + i) * cols + column] = total;
  }
}

// One output of a second pass: out[k] (+)= sum over the chunks of partial[chunk stride + first
// + k], k < count (accumulate false: stored, the output is not read). A null out is skipped.
struct ChunkSum {
  const float* partial;
  int64_t chunks, stride, first, count;
  float* out;
  bool accumulate = true;
};

// Second pass, several outputs in one launch (an op's parameter gradients): each block
// serves one output, its threads in rows, each row summing a column's chunks y, y + rows,
// ... in order, then the rows in order (column_sums.cu); the rows depend only on the chunk
// count, so an output's bits do not depend on what else the launch sums.
constexpr int kMaxChunkSums = 4;
// The second pass alone: every output of `sums` (at most kMaxChunkSums) in one launch.
void add_chunk_sums(const ChunkSum* sums, int count, cudaStream_t stream);
inline void add_chunk_sums(std::initializer_list<ChunkSum> sums, cudaStream_t stream) {
  add_chunk_sums(sums.begin(), static_cast<int>(sums.size()), stream);
}

// The second pass over partials laid out [chunk][V][cols]: out[v] (+)= the sum over the
// chunks of each one's row v (a null out is skipped).
template <int V>
void add_column_chunk_sums(const float* partial, int64_t chunks, int64_t cols, std::array<float*, V> out,
                           cudaStream_t stream, bool accumulate = true) {
  std::array<ChunkSum, V> sums;
  for (int i = 0; i < V; ++i) sums[i] = {partial, chunks, V * cols, i * cols, cols, out[i], accumulate};
  add_chunk_sums(sums.data(), V, stream);
}

template <int V, typename Value>
void column_sums(Value value, int64_t rows, int64_t cols, std::array<float*, V> out, float* workspace,
                 cudaStream_t stream, bool accumulate = true) {
  const int64_t chunk_rows = column_chunk_rows(rows, cols), chunks = column_chunks(rows, cols);
  check(chunks <= 65535, "column sums: too many rows for the CUDA kernels");
  const dim3 grid(blocks_for(cols, column_tile(cols)), static_cast<unsigned>(chunks));
  if (cols % 8 == 0)
    column_partials_kernel<V, 8><<<grid, dim3(32, 8), 0, stream>>>(value, rows, cols, chunk_rows, workspace);
  else
    column_partials_kernel<V, 1><<<grid, dim3(32, 8), 0, stream>>>(value, rows, cols, chunk_rows, workspace);
  MHC_CUDA_CHECK(cudaGetLastError());
  add_column_chunk_sums<V>(workspace, chunks, cols, out, stream, accumulate);
}

}  // namespace mhc::cuda::detail
