#include "core/cuda/device.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

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
void Event::synchronize() const { MHC_CUDA_CHECK(cudaEventSynchronize(event_)); }

namespace {

constexpr size_t kLargestReplacedMemset = size_t{1} << 20;

// A memset node's writes: `height` rows of `width` elements of `element_size` bytes (1, 2
// or 4) set to `value`, rows `pitch` bytes apart.
__global__ void memset_kernel(unsigned char* dst, size_t pitch, unsigned value, unsigned element_size, size_t width,
                              size_t height) {
  const size_t count = width * height;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned char* element = dst + (i / width) * pitch + (i % width) * element_size;
    if (element_size == 4)
      *reinterpret_cast<unsigned*>(element) = value;
    else if (element_size == 2)
      *reinterpret_cast<unsigned short*>(element) = static_cast<unsigned short>(value);
    else
      *element = static_cast<unsigned char>(value);
  }
}

// The nodes before (dependencies) or after (dependents) `node`, with their edges' data.
struct Edges {
  std::vector<cudaGraphNode_t> nodes;
  std::vector<cudaGraphEdgeData> data;
};
Edges edges_of(cudaGraphNode_t node, bool dependencies) {
  const auto get = dependencies ? cudaGraphNodeGetDependencies : cudaGraphNodeGetDependentNodes;
  size_t count = 0;
  MHC_CUDA_CHECK(get(node, nullptr, nullptr, &count));
  Edges e{std::vector<cudaGraphNode_t>(count), std::vector<cudaGraphEdgeData>(count)};
  MHC_CUDA_CHECK(get(node, e.nodes.data(), e.data.data(), &count));
  return e;
}

}  // namespace

void replace_memset_nodes(cudaGraph_t graph) {
  size_t count = 0;
  MHC_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  MHC_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    MHC_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeMemset) continue;
    cudaMemsetParams m{};
    MHC_CUDA_CHECK(cudaGraphMemsetNodeGetParams(node, &m));
    // Large fills are bandwidth-bound and left to the copy engine.
    if (m.width * m.height * m.elementSize > kLargestReplacedMemset) continue;
    auto* dst = static_cast<unsigned char*>(m.dst);
    void* args[] = {&dst, &m.pitch, &m.value, &m.elementSize, &m.width, &m.height};
    constexpr unsigned kThreads = 256;
    const size_t blocks = (m.width * m.height + kThreads - 1) / kThreads;
    cudaKernelNodeParams k{};
    k.func = reinterpret_cast<void*>(memset_kernel);
    k.gridDim = dim3(static_cast<unsigned>(std::min<size_t>(blocks, 4096)));
    k.blockDim = dim3(kThreads);
    k.kernelParams = args;
    const Edges before = edges_of(node, true), after = edges_of(node, false);
    cudaGraphNode_t fill = nullptr;
    MHC_CUDA_CHECK(cudaGraphAddKernelNode(&fill, graph, nullptr, 0, &k));
    for (size_t i = 0; i < before.nodes.size(); ++i)
      MHC_CUDA_CHECK(cudaGraphAddDependencies(graph, &before.nodes[i], &fill, &before.data[i], 1));
    for (size_t i = 0; i < after.nodes.size(); ++i)
      MHC_CUDA_CHECK(cudaGraphAddDependencies(graph, &fill, &after.nodes[i], &after.data[i], 1));
    MHC_CUDA_CHECK(cudaGraphDestroyNode(node));  // and its edges
  }
}

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
  try {
    replace_memset_nodes(graph);
  } catch (...) {
    cudaGraphDestroy(graph);
    throw;
  }
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
