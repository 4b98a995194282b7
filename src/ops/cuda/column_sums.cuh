// Deterministic sums over rows, per column, of V values a (row, column) given by a functor:
// out_v[c] += sum_r value(r, c)[v]. Rows go in chunks of kColumnChunkRows (one fp32
// partial per chunk, 8 rows of threads summed in order), then the chunks in order, so the
// result does not depend on scheduling. Used for bias and norm-weight gradients.
#pragma once
#include <cuda_runtime.h>

#include <array>
#include <cstdint>

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda::detail {

constexpr int64_t kColumnChunkRows = 256;

inline int64_t column_chunks(int64_t rows) { return (rows + kColumnChunkRows - 1) / kColumnChunkRows; }
// Workspace floats of column_sums<V>.
inline size_t column_sums_workspace_floats(int V, int64_t rows, int64_t cols) {
  return static_cast<size_t>(column_chunks(rows) * V * cols);
}

// What a Value functor returns for one (row, column).
template <int V> struct ColumnValues {
  float v[V];
};

// partial[chunk][v][c]; block (32, 8), grid (column tiles of 32, chunks).
template <int V, typename Value>
__global__ void column_partials_kernel(Value value, int64_t rows, int64_t cols, float* partial) {
  __shared__ float sums[V][8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t begin = blockIdx.y * kColumnChunkRows, end = min(rows, begin + kColumnChunkRows);
  float s[V] = {};
  if (c < cols)
    for (int64_t r = begin + threadIdx.y; r < end; r += 8) {
      const ColumnValues<V> v = value(r, c);
#pragma unroll
      for (int i = 0; i < V; ++i) s[i] += v.v[i];
    }
#pragma unroll
  for (int i = 0; i < V; ++i) sums[i][threadIdx.y][threadIdx.x] = s[i];
  __syncthreads();
  if (threadIdx.y == 0 && c < cols)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float total = 0;
      for (int k = 0; k < 8; ++k) total += sums[i][k][threadIdx.x];
      partial[(blockIdx.y * V + i) * cols + c] = total;
    }
}

template <int V> struct ColumnOutputs {
  float* out[V];  // null: that sum is not wanted
};

template <int V>
__global__ void add_chunk_sums_kernel(const float* partial, int64_t chunks, int64_t cols, ColumnOutputs<V> outputs) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= V * cols) return;
  const int i = static_cast<int>(e / cols);
  const int64_t c = e % cols;
  if (!outputs.out[i]) return;
  float total = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[(chunk * V + i) * cols + c];
  outputs.out[i][c] += total;
}

template <int V, typename Value>
void column_sums(Value value, int64_t rows, int64_t cols, std::array<float*, V> out, float* workspace,
                 cudaStream_t stream) {
  const int64_t chunks = column_chunks(rows);
  const dim3 grid(blocks_for(cols, 32), static_cast<unsigned>(chunks));
  column_partials_kernel<V><<<grid, dim3(32, 8), 0, stream>>>(value, rows, cols, workspace);
  MHC_CUDA_CHECK(cudaGetLastError());
  ColumnOutputs<V> outputs;
  for (int i = 0; i < V; ++i) outputs.out[i] = out[i];
  add_chunk_sums_kernel<V><<<blocks_for(V * cols, 256), 256, 0, stream>>>(workspace, chunks, cols, outputs);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda::detail
