// Device timelines (core/cuda/cupti_timeline.h): kernels launched on two streams, and one
// replayed from a CUDA graph made before the recording began, come back with their names,
// streams and device times. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/cuda/cupti_timeline.h"
#include "core/cuda/device.h"
#include "ops/cuda/mhc_mappings.h"

namespace mhc {
namespace {

TEST(CudaTimeline, RecordsKernelsOfStreamsAndGraphs) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 64, K = 4096;
  cuda::DeviceBuffer<cuda::bf16> x(rows * K);
  x.fill_bytes(0);
  cuda::DeviceBuffer<float> sums(rows);
  cuda::Stream first, second;
  cuda::Graph graph;
  graph.capture(first.get(), [&] { cuda::row_sumsq(x.data(), rows, K, sums.data(), first.get()); });

  cuda::start_timeline();
  EXPECT_THROW(cuda::start_timeline(), Error);
  const uint64_t begin = cuda::timeline_now_ns();
  cuda::row_sumsq(x.data(), rows, K, sums.data(), first.get());
  cuda::row_sumsq(x.data(), rows, K, sums.data(), second.get());
  graph.launch(first.get());
  const std::vector<TimelineRecord> records = cuda::stop_timeline();
  EXPECT_THROW(cuda::stop_timeline(), Error);

  std::vector<TimelineRecord> kernels;
  for (const TimelineRecord& r : records)
    if (r.name.rfind("row_sumsq_kernel<", 0) == 0) kernels.push_back(r);
  ASSERT_EQ(kernels.size(), 3u) << records.size() << " records";
  for (const TimelineRecord& r : kernels) {
    EXPECT_GE(r.start_ns, begin);
    EXPECT_GT(r.end_ns, r.start_ns);
  }
  EXPECT_TRUE(std::is_sorted(records.begin(), records.end(),
                             [](const TimelineRecord& a, const TimelineRecord& b) { return a.start_ns < b.start_ns; }));
  std::set<uint32_t> streams;
  for (const TimelineRecord& r : kernels) streams.insert(r.stream);
  EXPECT_GE(streams.size(), 2u);  // the two launches' streams (the graph's may be either, or its own)
}

}  // namespace
}  // namespace mhc
