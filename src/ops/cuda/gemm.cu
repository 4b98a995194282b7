#include "ops/cuda/gemm.h"

#include <cublasLt.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "core/cuda/device.h"

namespace mhc::cuda {
namespace {

void check_blas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    fail("cuBLASLt error " + std::to_string(static_cast<int>(status)) + " (cublasStatus_t) in " + call);
}
#define MHC_BLAS_CHECK(call) check_blas((call), #call)

// Largest power of two (at most 256) dividing the address of every column of every batch.
uint32_t alignment_of(const void* p, int64_t ld, int64_t stride, size_t element) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(p) | static_cast<uint64_t>(ld) * element |
                        static_cast<uint64_t>(stride) * element | 256;
  return static_cast<uint32_t>(bits & (~bits + 1));
}

using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, uint32_t, uint32_t,
                       uint32_t, bool, int, int64_t, int64_t, int64_t, bool>;

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// The handle, workspaces and plans of one device. Kept for the life of the process: their
// destruction at exit could run after the CUDA driver has shut down.
struct Context {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;  // of the streams without one bound, made when the first needs it
  std::mutex mutex;           // guards plans and bound
  std::map<Key, Plan> plans;
  std::map<cudaStream_t, void*> bound;
};

Context& context_of_current_device() {
  static std::mutex mutex;
  static std::map<int, Context*> contexts;
  int device = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  Context*& c = contexts[device];
  if (!c) {
    c = new Context;
    MHC_BLAS_CHECK(cublasLtCreate(&c->handle));
  }
  return *c;
}

Plan make_plan(cublasLtHandle_t handle, const Gemm& g, uint32_t align_a, uint32_t align_b, uint32_t align_d) {
  Plan p;
  const cudaDataType_t out = g.output == GemmOutput::Fp32 ? CUDA_R_32F : CUDA_R_16BF;
  MHC_BLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  MHC_BLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MHC_BLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (g.bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    MHC_BLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    MHC_BLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  MHC_BLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda));
  MHC_BLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb));
  MHC_BLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, out, g.m, g.n, g.ldd));
  if (g.batch > 1) {
    const int32_t count = g.batch;
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {{p.a, g.stride_a}, {p.b, g.stride_b}, {p.d, g.stride_d}};
    for (const auto& [layout, stride] : layouts) {
      MHC_BLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      MHC_BLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                      sizeof(stride)));
    }
  }

  cublasLtMatmulPreference_t pref = nullptr;
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace = kGemmWorkspaceBytes;
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                      sizeof(workspace)));
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                      sizeof(schemes)));
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                      sizeof(align_a)));
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                      sizeof(align_b)));
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d,
                                                      sizeof(align_d)));
  MHC_BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                                      sizeof(align_d)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0)
    fail("cuBLASLt has no algorithm for the bf16 product m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) +
         " k=" + std::to_string(g.k));
  p.algo = result.algo;
  return p;
}

}  // namespace

void gemm(const Gemm& g, cudaStream_t stream) {
  check(g.m >= 1 && g.n >= 1 && g.k >= 1 && g.batch >= 1, "gemm: empty product");
  check(g.lda >= (g.trans_a ? g.k : g.m) && g.ldb >= (g.trans_b ? g.n : g.k) && g.ldd >= g.m,
        "gemm: a leading dimension is smaller than its matrix");
  Context& c = context_of_current_device();
  const size_t out_bytes = g.output == GemmOutput::Fp32 ? 4 : 2;
  const void* c_matrix = g.c ? g.c : g.d;  // same layout as D
  const uint32_t align_a = alignment_of(g.a, g.lda, g.stride_a, 2), align_b = alignment_of(g.b, g.ldb, g.stride_b, 2),
                 align_d = std::min(alignment_of(g.d, g.ldd, g.stride_d, out_bytes),
                                    alignment_of(c_matrix, g.ldd, g.stride_d, out_bytes));
  const Key key{g.trans_a, g.trans_b, g.m,      g.n,      g.k,          g.lda,        g.ldb,
                g.ldd,     static_cast<int>(g.output), align_a, align_b, align_d, g.beta != 0.0f,
                g.batch,   g.stride_a, g.stride_b, g.stride_d, g.bias != nullptr};
  Plan p;
  void* workspace = nullptr;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (const auto b = c.bound.find(stream); b != c.bound.end()) {
      workspace = b->second;
    } else {
      if (!c.workspace) MHC_CUDA_CHECK(cudaMalloc(&c.workspace, kGemmWorkspaceBytes));
      workspace = c.workspace;
    }
    auto it = c.plans.find(key);
    if (it == c.plans.end()) it = c.plans.emplace(key, make_plan(c.handle, g, align_a, align_b, align_d)).first;
    p = it->second;
    if (g.bias)  // the plan was made with another call's bias pointer
      MHC_BLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  MHC_BLAS_CHECK(cublasLtMatmul(c.handle, p.desc, &g.alpha, g.a, p.a, g.b, p.b, &g.beta, c_matrix, p.d, g.d, p.d,
                                &p.algo, workspace, kGemmWorkspaceBytes, stream));
}

StreamGemmWorkspace::StreamGemmWorkspace(cudaStream_t stream) : stream_(stream), bytes_(kGemmWorkspaceBytes) {
  check(stream != nullptr, "StreamGemmWorkspace: the legacy default stream uses the device's workspace");
  Context& c = context_of_current_device();
  const std::lock_guard<std::mutex> lock(c.mutex);
  check(c.bound.emplace(stream, bytes_.data()).second, "StreamGemmWorkspace: the stream has one already");
}

StreamGemmWorkspace::~StreamGemmWorkspace() {
  Context& c = context_of_current_device();
  const std::lock_guard<std::mutex> lock(c.mutex);
  c.bound.erase(stream_);
}

}  // namespace mhc::cuda
