// Matrix products on tensor cores through cuBLASLt, column-major as in BLAS:
//
//   D = alpha op(A) op(B) + beta C      op(A) m×k, op(B) k×n, C and D m×n (ldd >= m)
//
// optionally strided-batched.
//
// A and B are bf16, the products are summed in fp32, C and D are fp32 or bf16; C is D
// itself (beta != 0 then reads the D it overwrites) unless given (same layout as D).
// Row-major callers swap the operands: a row-major [rows, cols] matrix is the
// column-major [cols, rows] one.
//
// One cuBLASLt handle per device, created on first use, and a workspace per stream: the
// one bound to the product's stream (StreamGemmWorkspace), else the device's, which all
// unbound streams share; the algorithm of each shape (and pointer alignment) is chosen once
// by cuBLASLt's heuristic and reused, and split-K reductions that accumulate in place
// (whose order can vary) are excluded, so the same inputs give the same bits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/device.h"

namespace mhc::cuda {

enum class GemmOutput { Fp32, Bf16 };

// The bytes of a product's workspace.
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

struct Gemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const __nv_bfloat16* a = nullptr;
  int64_t lda = 0;
  const __nv_bfloat16* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  GemmOutput output = GemmOutput::Fp32;
  float alpha = 1.0f, beta = 0.0f;
  const void* c = nullptr;  // null: C is D
  // batch > 1: that many products, the i-th at a + i stride_a, b + i stride_b, d + i stride_d
  // (in elements).
  int batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;
  // When set: D += bias broadcast over columns (bias[i] added to row i; m values, of D's type).
  const void* bias = nullptr;
};

void gemm(const Gemm& g, cudaStream_t stream = nullptr);

// A cuBLASLt workspace of kGemmWorkspaceBytes bound to `stream` (of the current device)
// for its life: the products on that stream use it. cuBLASLt's split-K products keep
// partial sums and counters in their workspace, so streams whose products may run at the
// same time (a model's main and side streams, two models' streams) each need one of their
// own; the products of one stream run in order and share it.
class StreamGemmWorkspace {
 public:
  explicit StreamGemmWorkspace(cudaStream_t stream);
  ~StreamGemmWorkspace();
  StreamGemmWorkspace(const StreamGemmWorkspace&) = delete;
  StreamGemmWorkspace& operator=(const StreamGemmWorkspace&) = delete;

 private:
  cudaStream_t stream_;
  DeviceBuffer<unsigned char> bytes_;
};

}  // namespace mhc::cuda
