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

// Where the sums go: outputs(v, c, total) adds value v's total of column c (or, with
// accumulate false, stores it: the output is not read).
template <int V> struct ColumnOutputs {
  float* out[V];  // null: that sum is not wanted
  bool accumulate = true;
  __device__ void operator()(int v, int64_t c, float total) const {
    if (out[v]) out[v][c] = accumulate ? out[v][c] + total : total;
  }
};

// Second pass: blocks of 256 threads, `rows` rows of threads (a power of two, at most 32)
// across 256 / rows outputs. A thread sums its output's chunks y, y + rows, ... in order,
// kChunkLoads loads in flight at a time (few chunks: one row of threads and one batch; the
// dbias/dalpha rows of grad_h's blocks: 1024 chunks, 32 rows of threads), then row 0 adds
// the rows' partials in order. (32 x 32 threads a block, one chunk a thread, was 9 us a
// dW sum of 22 chunks: nine waves of blocks whose threads mostly waited.)
constexpr int kChunkLoads = 16;
inline int chunk_sum_rows(int64_t chunks) {
  int rows = 1;
  while (rows < 32 && rows * kChunkLoads < chunks) rows *= 2;
  return rows;
}

template <int V, typename Outputs>
__global__ void add_chunk_sums_kernel(const float* partial, int64_t chunks, int64_t cols, Outputs outputs) {
  __shared__ float sums[256];
  const int x = threadIdx.x, y = threadIdx.y, width = blockDim.x, rows = blockDim.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * width + x;
  const bool valid = e < V * cols;
  const int i = valid ? static_cast<int>(e / cols) : 0;
  const int64_t c = valid ? e % cols : 0;
  float s = 0;
  if (valid)
    for (int64_t first = y; first < chunks; first += static_cast<int64_t>(kChunkLoads) * rows) {
      float v[kChunkLoads];
#pragma unroll
      for (int u = 0; u < kChunkLoads; ++u) {
        const int64_t chunk = first + static_cast<int64_t>(u) * rows;
        v[u] = chunk < chunks ? partial[(chunk * V + i) * cols + c] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kChunkLoads; ++u)
        if (first + static_cast<int64_t>(u) * rows < chunks) s += v[u];
    }
  sums[y * width + x] = s;
  __syncthreads();
  if (y != 0 || !valid) return;
  float total = sums[x];
  for (int k = 1; k < rows; ++k) total += sums[k * width + x];
  outputs(i, c, total);
}

// The second pass alone, over partial[chunk][v][c]: outputs(v, c, sum over the chunks).
template <int V, typename Outputs>
void add_chunk_sums(const float* partial, int64_t chunks, int64_t cols, Outputs outputs, cudaStream_t stream) {
  const int rows = chunk_sum_rows(chunks), width = 256 / rows;
  add_chunk_sums_kernel<V><<<blocks_for(V * cols, width), dim3(width, rows), 0, stream>>>(partial, chunks, cols,
                                                                                         outputs);
  MHC_CUDA_CHECK(cudaGetLastError());
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
  ColumnOutputs<V> outputs;
  for (int i = 0; i < V; ++i) outputs.out[i] = out[i];
  outputs.accumulate = accumulate;
  add_chunk_sums<V>(workspace, chunks, cols, outputs, stream);
}

}  // namespace mhc::cuda::detail
