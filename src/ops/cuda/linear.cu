#include "ops/cuda/linear.h"

#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/gemm.h"

namespace mhc::cuda {
namespace {

struct BiasGrad {
  const bf16* grad_y;
  int64_t cols;
  template <int COLS> __device__ void operator()(int64_t r, int64_t c, float (&out)[1][COLS]) const {
    detail::load_bf16<COLS>(grad_y + r * cols + c, out[0]);
  }
};

}  // namespace

void linear_forward(const bf16* x, const bf16* weight, const bf16* bias, int64_t rows, int64_t in, int64_t out, bf16* y,
                    cudaStream_t stream, const bf16* residual) {
  check(residual != y, "linear_forward: the residual must not be the output");
  // column-major: y^T [out, rows] = W [out, in] (W^T's storage, transposed) x^T [in, rows]
  Gemm g;
  g.trans_a = true;
  g.m = out, g.n = rows, g.k = in;
  g.a = weight, g.lda = in;
  g.b = x, g.ldb = in;
  g.d = y, g.ldd = out;
  g.output = GemmOutput::Bf16;
  g.bias = bias;
  if (residual) g.c = residual, g.beta = 1.0f;
  gemm(g, stream);
}

size_t column_sums_workspace_floats(int64_t rows, int64_t cols) {
  return detail::column_sums_workspace_floats(1, rows, cols);
}

void accumulate_column_sums(const bf16* grad_y, int64_t rows, int64_t cols, float* grad_bias, float* workspace,
                            cudaStream_t stream, bool accumulate) {
  detail::column_sums<1>(BiasGrad{grad_y, cols}, rows, cols, {grad_bias}, workspace, stream, accumulate);
}

size_t linear_backward_workspace_floats(int64_t rows, int64_t out) { return column_sums_workspace_floats(rows, out); }

void linear_backward_input(const bf16* grad_y, const bf16* weight, int64_t rows, int64_t in, int64_t out,
                           bf16* grad_x, cudaStream_t stream) {
  // dx^T [in, rows] = W^T [in, out] dy^T [out, rows]
  Gemm g;
  g.m = in, g.n = rows, g.k = out;
  g.a = weight, g.lda = in;
  g.b = grad_y, g.ldb = out;
  g.d = grad_x, g.ldd = in;
  g.output = GemmOutput::Bf16;
  gemm(g, stream);
}

void linear_backward_weight(const bf16* grad_y, const bf16* x, int64_t rows, int64_t in, int64_t out,
                            float* grad_weight, float* grad_bias, float* workspace, cudaStream_t stream,
                            bool accumulate) {
  // dW^T [in, out] += x^T [in, rows] dy [rows, out] (= without accumulate: beta 0, D not read)
  Gemm g;
  g.trans_b = true;
  g.m = in, g.n = out, g.k = rows;
  g.a = x, g.lda = in;
  g.b = grad_y, g.ldb = out;
  g.d = grad_weight, g.ldd = in;
  g.beta = accumulate ? 1.0f : 0.0f;
  gemm(g, stream);
  if (grad_bias) accumulate_column_sums(grad_y, rows, out, grad_bias, workspace, stream, accumulate);
}

void linear_backward(const bf16* grad_y, const bf16* x, const bf16* weight, int64_t rows, int64_t in, int64_t out,
                     bf16* grad_x, float* grad_weight, float* grad_bias, float* workspace, cudaStream_t stream,
                     bool accumulate) {
  if (grad_x) linear_backward_input(grad_y, weight, rows, in, out, grad_x, stream);
  linear_backward_weight(grad_y, x, rows, in, out, grad_weight, grad_bias, workspace, stream, accumulate);
}

}  // namespace mhc::cuda
