#include "core/cuda/device.h"

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace mhc::cuda {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  fail(std::string("CUDA error ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ") in " + call +
       " at " + file + ":" + std::to_string(line));
}

bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

int multiprocessor_count() {
  int device = 0, sms = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&device));
  MHC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void allow_shared_bytes(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;  // nothing set: not in the map
  int device = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  if (auto it = allowed.find(key); it != allowed.end() && it->second >= bytes) return;
  MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  allowed[key] = bytes;
}

int resident_blocks_per_sm(const void* kernel, int threads, size_t shared_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> known;
  int device = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, kernel, threads, shared_bytes);
  if (auto it = known.find(key); it != known.end()) return it->second;
  allow_shared_bytes(kernel, shared_bytes);
  int blocks = 0;
  MHC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared_bytes));
  return known[key] = blocks;
}

Stream::Stream(Priority priority) {
  int least = 0, greatest = 0;
  MHC_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  MHC_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamDefault, priority == kHigh ? greatest : least));
}
Stream::~Stream() {
  if (stream_) cudaStreamDestroy(stream_);
}

Event::Event() { MHC_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
Event::~Event() {
  if (event_) cudaEventDestroy(event_);
}
void Event::record(cudaStream_t stream) { MHC_CUDA_CHECK(cudaEventRecord(event_, stream)); }
void Event::wait_on(cudaStream_t stream) const { MHC_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }

Graph::~Graph() { reset(); }

void Graph::reset() {
  if (exec_) cudaGraphExecDestroy(exec_);
  exec_ = nullptr;
}

void Graph::capture(cudaStream_t stream, const std::function<void()>& launches) {
  reset();
  MHC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    launches();
  } catch (...) {
    cudaStreamEndCapture(stream, &graph);  // ends the capture; the error thrown is the first one
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  MHC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  const cudaError_t status = cudaGraphInstantiate(&exec_, graph, 0);
  cudaGraphDestroy(graph);
  if (status != cudaSuccess) {
    exec_ = nullptr;
    throw_cuda_error(status, "cudaGraphInstantiate", __FILE__, __LINE__);
  }
}

void Graph::launch(cudaStream_t stream) const {
  check(exec_ != nullptr, "Graph::launch: nothing captured");
  MHC_CUDA_CHECK(cudaGraphLaunch(exec_, stream));
}

}  // namespace mhc::cuda
