// CUDA graphs (core/cuda/device.h): replace_memset_nodes keeps a graph's writes and its
// order, with kernel nodes where small memset nodes were; Graph::capture replays a
// capture's memsets. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/cuda/device.h"

namespace mhc {
namespace {

constexpr unsigned char kPoison = 0xEE;

std::vector<cudaGraphNode_t> nodes_of(cudaGraph_t graph) {
  size_t count = 0;
  MHC_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  MHC_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  return nodes;
}
int count_of(cudaGraph_t graph, cudaGraphNodeType type) {
  int n = 0;
  for (cudaGraphNode_t node : nodes_of(graph)) {
    cudaGraphNodeType t{};
    MHC_CUDA_CHECK(cudaGraphNodeGetType(node, &t));
    n += t == type;
  }
  return n;
}
size_t edge_count(cudaGraph_t graph) {
  size_t count = 0;
  MHC_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &count));
  return count;
}

// What a memset of `m` does to `bytes` (a host image of the buffer m.dst points into, at
// `offset`).
void apply(const cudaMemsetParams& m, size_t offset, std::vector<unsigned char>& bytes) {
  for (size_t row = 0; row < m.height; ++row)
    for (size_t i = 0; i < m.width; ++i)
      std::memcpy(bytes.data() + offset + row * m.pitch + i * m.elementSize, &m.value, m.elementSize);  // little endian
}

TEST(CudaGraph, MemsetNodesBecomeKernelsWithTheSameWritesAndOrder) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  const size_t size = 6000;
  cuda::DeviceBuffer<unsigned char> buffer(size), copy(size);
  buffer.fill_bytes(kPoison);
  copy.fill_bytes(kPoison);
  unsigned char* base = buffer.data();
  // Element sizes 4, 2 and 1; one of them 2D with gaps between its rows; odd counts.
  const size_t offsets[] = {4, 1002, 3001};
  cudaMemsetParams sets[3]{};
  sets[0] = {base + offsets[0], 4 * 241, 0xA1B2C3D4u, 4, 241, 1};
  sets[1] = {base + offsets[1], 100, 0xBEEFu, 2, 37, 9};
  sets[2] = {base + offsets[2], 1999, 0x5Au, 1, 1999, 1};

  cudaGraph_t graph = nullptr;
  MHC_CUDA_CHECK(cudaGraphCreate(&graph, 0));
  // set 0 -> set 1 -> copy of the buffer; set 2 after set 0 only, before the copy.
  cudaGraphNode_t set_nodes[3], copy_node;
  MHC_CUDA_CHECK(cudaGraphAddMemsetNode(&set_nodes[0], graph, nullptr, 0, &sets[0]));
  MHC_CUDA_CHECK(cudaGraphAddMemsetNode(&set_nodes[1], graph, &set_nodes[0], 1, &sets[1]));
  MHC_CUDA_CHECK(cudaGraphAddMemsetNode(&set_nodes[2], graph, &set_nodes[0], 1, &sets[2]));
  MHC_CUDA_CHECK(cudaGraphAddMemcpyNode1D(&copy_node, graph, &set_nodes[1], 2, copy.data(), buffer.data(), size,
                                          cudaMemcpyDeviceToDevice));
  const size_t edges = edge_count(graph);
  ASSERT_EQ(edges, 4u);

  cuda::replace_memset_nodes(graph);
  EXPECT_EQ(count_of(graph, cudaGraphNodeTypeMemset), 0);
  EXPECT_EQ(count_of(graph, cudaGraphNodeTypeKernel), 3);
  EXPECT_EQ(edge_count(graph), edges);
  size_t copy_dependencies = 0;
  MHC_CUDA_CHECK(cudaGraphNodeGetDependencies(copy_node, nullptr, nullptr, &copy_dependencies));
  EXPECT_EQ(copy_dependencies, 2u);

  cudaGraphExec_t exec = nullptr;
  MHC_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MHC_CUDA_CHECK(cudaGraphLaunch(exec, nullptr));
  MHC_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  MHC_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MHC_CUDA_CHECK(cudaGraphDestroy(graph));

  std::vector<unsigned char> expected(size, kPoison);
  for (int i = 0; i < 3; ++i) apply(sets[i], offsets[i], expected);
  EXPECT_EQ(buffer.download(), expected);
  EXPECT_EQ(copy.download(), expected);  // the copy ran after all three
}

TEST(CudaGraph, LargeMemsetNodesStay) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  const size_t size = (size_t{1} << 20) + 4;
  cuda::DeviceBuffer<unsigned char> buffer(size);
  const cudaMemsetParams large{buffer.data(), size, 0x33u, 1, size, 1}, small{buffer.data(), 4, 0x44u, 1, 4, 1};
  cudaGraph_t graph = nullptr;
  MHC_CUDA_CHECK(cudaGraphCreate(&graph, 0));
  cudaGraphNode_t nodes[2];
  MHC_CUDA_CHECK(cudaGraphAddMemsetNode(&nodes[0], graph, nullptr, 0, &large));
  MHC_CUDA_CHECK(cudaGraphAddMemsetNode(&nodes[1], graph, &nodes[0], 1, &small));
  cuda::replace_memset_nodes(graph);
  EXPECT_EQ(count_of(graph, cudaGraphNodeTypeMemset), 1);
  EXPECT_EQ(count_of(graph, cudaGraphNodeTypeKernel), 1);
  EXPECT_EQ(edge_count(graph), 1u);
  MHC_CUDA_CHECK(cudaGraphDestroy(graph));
}

TEST(CudaGraph, CaptureReplaysMemsets) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  const size_t size = 1000;
  cuda::DeviceBuffer<unsigned char> buffer(size), copy(size);
  buffer.fill_bytes(kPoison);
  copy.fill_bytes(kPoison);
  cuda::Stream stream;
  cuda::Graph graph;
  graph.capture(stream.get(), [&] {
    MHC_CUDA_CHECK(cudaMemsetAsync(buffer.data() + 3, 0x21, 501, stream.get()));
    MHC_CUDA_CHECK(cudaMemcpyAsync(copy.data(), buffer.data(), size, cudaMemcpyDeviceToDevice, stream.get()));
  });
  EXPECT_EQ(buffer.download(), std::vector<unsigned char>(size, kPoison));  // captured, not run
  graph.launch(stream.get());
  MHC_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
  std::vector<unsigned char> expected(size, kPoison);
  std::memset(expected.data() + 3, 0x21, 501);
  EXPECT_EQ(buffer.download(), expected);
  EXPECT_EQ(copy.download(), expected);
}

}  // namespace
}  // namespace mhc
