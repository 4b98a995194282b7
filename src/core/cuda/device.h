// The one place for CUDA error checking, device memory, streams and graphs. Every runtime
// call goes through MHC_CUDA_CHECK, which turns a failure into an mhc::Error naming the call
// and the place; DeviceBuffer owns one cudaMalloc allocation (never managed memory),
// HostBuffer one page-locked host allocation (both an Allocation); Stream and Graph own a
// stream and an instantiated CUDA graph.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace mhc::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line);

#define MHC_CUDA_CHECK(call)                                                                     \
  do {                                                                                           \
    const cudaError_t mhc_status_ = (call);                                                      \
    if (mhc_status_ != cudaSuccess) ::mhc::cuda::throw_cuda_error(mhc_status_, #call, __FILE__, __LINE__); \
  } while (0)

// True when a CUDA device can be used (GPU tests skip themselves otherwise).
bool device_available();
// The current device's multiprocessors (grids sized to whole waves of resident blocks).
int multiprocessor_count();
// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device: raises
// its limit (cudaFuncAttributeMaxDynamicSharedMemorySize) the first time and whenever a
// launch asks for more, never lowers it; a launch calls it each time, the runtime is asked
// only when the limit changes.
void allow_shared_bytes(const void* kernel, size_t bytes);
template <typename... Args>
void allow_shared_bytes(void (*kernel)(Args...), size_t bytes) {
  allow_shared_bytes(reinterpret_cast<const void*>(kernel), bytes);
}
// Blocks of `kernel` resident on one of the current device's multiprocessors at `threads`
// threads and `shared_bytes` of dynamic shared memory, which the kernel is also allowed.
// Asked of the runtime once per device, kernel and size (launches ask it every call).
int resident_blocks_per_sm(const void* kernel, int threads, size_t shared_bytes);

// Where an Allocation lives: device memory (cudaMalloc, never managed memory) or
// page-locked host memory (cudaMallocHost: the destination, or source, of copies that a
// stream runs without the host waiting; pageable memory would make it wait).
enum class Memory { kDevice, kPinnedHost };

// One allocation of `count` T, freed with it; movable, not copyable.
template <typename T, Memory M> class Allocation {
 public:
  Allocation() = default;
  explicit Allocation(size_t count) : count_(count) {
    if (!count) return;
    void* p = nullptr;
    MHC_CUDA_CHECK(M == Memory::kDevice ? cudaMalloc(&p, count * sizeof(T)) : cudaMallocHost(&p, count * sizeof(T)));
    data_ = static_cast<T*>(p);
  }
  ~Allocation() {
    if (!data_) return;
    if constexpr (M == Memory::kDevice)
      cudaFree(data_);
    else
      cudaFreeHost(data_);
  }
  Allocation(Allocation&& other) noexcept : data_(other.data_), count_(other.count_) {
    other.data_ = nullptr;
    other.count_ = 0;
  }
  Allocation& operator=(Allocation&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    return *this;
  }
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
};

template <typename T> using HostBuffer = Allocation<T, Memory::kPinnedHost>;

template <typename T> class DeviceBuffer : public Allocation<T, Memory::kDevice> {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : Allocation<T, Memory::kDevice>(count) {}
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }

  void upload(const std::vector<T>& host) {
    check(host.size() == this->size(), "DeviceBuffer::upload: size mismatch");
    if (!host.empty())
      MHC_CUDA_CHECK(cudaMemcpy(this->data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(this->size());
    if (!host.empty())
      MHC_CUDA_CHECK(cudaMemcpy(host.data(), this->data(), host.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // Fills every byte with `byte` (tests poison outputs with 0xFF: NaN in bf16 and fp32).
  void fill_bytes(int byte) {
    if (this->size()) MHC_CUDA_CHECK(cudaMemset(this->data(), byte, this->size() * sizeof(T)));
  }
};

// A blocking stream (cudaStreamCreate): the legacy default stream, on which
// DeviceBuffer's copies and fills run, stays ordered with its work. A high-priority
// stream's waiting blocks are scheduled before those of other streams.
class Stream {
 public:
  enum Priority { kNormal, kHigh };
  explicit Stream(Priority priority = kNormal);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// An event for ordering one stream after another's work (no timing). Its waits follow its
// latest record; inside a graph capture both become the graph's dependencies.
class Event {
 public:
  Event();
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t stream);
  // `stream` waits for the work before the latest record.
  void wait_on(cudaStream_t stream) const;
  // The host waits for the work before the latest record (at once where there is none).
  void synchronize() const;

 private:
  cudaEvent_t event_ = nullptr;
};

// Every memset node of `graph` of at most 1 MiB replaced by a kernel node that writes the
// same bytes, after and before the same nodes (Graph::capture does it). Replayed on an H200,
// a memset node took 9.6 us from the kernel before it to the one after it (median of a
// training step's 108: cuBLASLt's Hopper products each set a 4-byte counter in their
// workspace first), the kernel node 1.7.
void replace_memset_nodes(cudaGraph_t graph);

// A sequence of launches on one stream, captured once and replayed: capture() runs
// `launches` with the stream capturing (nothing executes then; a launch on another stream
// that has not waited for an event recorded in the capture, an allocation or a
// synchronising call fails the capture; other streams must be waited for before it ends)
// and instantiates the graph;
// launch() replays it with the arguments and pointers it was captured with.
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  bool ready() const { return exec_ != nullptr; }
  void capture(cudaStream_t stream, const std::function<void()>& launches);
  void launch(cudaStream_t stream) const;
  void reset();

 private:
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace mhc::cuda
