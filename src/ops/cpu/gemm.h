// Row-major GEMM through BLAS: C = alpha * op(A) @ op(B) + beta * C, with op(A) [M,K],
// op(B) [K,N], C [M,N]. beta = 1 accumulates, which parameter gradients rely on.
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace mhc::cpu
