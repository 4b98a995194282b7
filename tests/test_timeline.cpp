// Timeline summaries (core/timeline.h) on hand-made records whose busy, idle and
// two-stream times are worked out below by hand.
#include <gtest/gtest.h>

#include "core/timeline.h"

namespace mhc {
namespace {

constexpr uint64_t kMs = 1000000;  // ns

TEST(Timeline, BusyIdleAndTwoStreamTimes) {
  // stream 7: [0, 10] and [10, 20] back to back, [30, 40]; stream 3: [5, 15], [50, 60] (ms).
  // Something runs in [0, 20], [30, 40], [50, 60]: 40 of the 60 ms span, 20 idle; both
  // streams in [5, 15]: 10 ms.
  const std::vector<TimelineRecord> records = {{"a", 7, 0, 10 * kMs},
                                               {"b", 7, 10 * kMs, 20 * kMs},
                                               {"a", 7, 30 * kMs, 40 * kMs},
                                               {"c", 3, 5 * kMs, 15 * kMs},
                                               {"c", 3, 50 * kMs, 60 * kMs}};
  const TimelineSummary t = summarize_timeline(records);
  EXPECT_DOUBLE_EQ(t.span_ms, 60);
  EXPECT_DOUBLE_EQ(t.idle_ms, 20);
  EXPECT_DOUBLE_EQ(t.overlap_ms, 10);
  ASSERT_EQ(t.streams.size(), 2u);
  EXPECT_EQ(t.streams[0].stream, 7u);  // the busiest first
  EXPECT_DOUBLE_EQ(t.streams[0].busy_ms, 30);
  EXPECT_EQ(t.streams[0].records, 3);
  EXPECT_EQ(t.streams[1].stream, 3u);
  EXPECT_DOUBLE_EQ(t.streams[1].busy_ms, 20);
  ASSERT_EQ(t.names.size(), 3u);
  EXPECT_EQ(t.names[0].name, "a");  // the largest totals first, equal ones by name
  EXPECT_DOUBLE_EQ(t.names[0].total_ms, 20);
  EXPECT_EQ(t.names[0].calls, 2);
  EXPECT_DOUBLE_EQ(t.names[0].alone_ms, 15);  // [0, 5] and [30, 40]
  EXPECT_EQ(t.names[1].name, "c");
  EXPECT_DOUBLE_EQ(t.names[1].alone_ms, 10);  // [50, 60]
  EXPECT_EQ(t.names[2].name, "b");
  EXPECT_DOUBLE_EQ(t.names[2].total_ms, 10);
  EXPECT_EQ(t.names[2].calls, 1);
  EXPECT_DOUBLE_EQ(t.names[2].alone_ms, 5);  // [15, 20]
}

TEST(Timeline, OverlappingRecordsOfOneStreamCountOnce) {
  const TimelineSummary t = summarize_timeline({{"a", 1, 0, 10 * kMs}, {"b", 1, 5 * kMs, 12 * kMs}});
  EXPECT_DOUBLE_EQ(t.streams[0].busy_ms, 12);
  EXPECT_DOUBLE_EQ(t.names[0].alone_ms, 5);  // a: [0, 5]
  EXPECT_DOUBLE_EQ(t.names[1].alone_ms, 2);  // b: [10, 12]
  EXPECT_DOUBLE_EQ(t.overlap_ms, 0);
  EXPECT_DOUBLE_EQ(t.idle_ms, 0);
  EXPECT_DOUBLE_EQ(summarize_timeline({}).span_ms, 0);
}

TEST(Timeline, KernelNames) {
  EXPECT_EQ(timeline_kernel_name("_ZN3mhc4cuda12_GLOBAL__N_110foo_kernelILi4ELb1EEEvPKfl"), "foo_kernel<4, true>");
  // template arguments with namespaces keep them
  EXPECT_EQ(timeline_kernel_name("_ZN3mhc4cuda12_GLOBAL__N_16kernelINS0_4DropELi4EEEvPKfS4_l"),
            "kernel<mhc::cuda::Drop, 4>");
  EXPECT_EQ(timeline_kernel_name("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_TNT"),
            "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_TNT");
}

TEST(Timeline, ChromeTraceEvents) {
  const nlohmann::json events = timeline_trace_events({{"a", 7, 2000, 5000}, {"b", 3, 4000, 4500}}, 2, "mhc n=4");
  ASSERT_EQ(events.size(), 5u);  // the process's name, two streams' names, two records
  EXPECT_EQ(events[0]["args"]["name"], "mhc n=4");
  const nlohmann::json& a = events[3];
  EXPECT_EQ(a["name"], "a");
  EXPECT_EQ(a["ph"], "X");
  EXPECT_EQ(a["pid"], 2);
  EXPECT_EQ(a["tid"], 7);
  EXPECT_DOUBLE_EQ(a["ts"].get<double>(), 0.0);  // microseconds from the first start
  EXPECT_DOUBLE_EQ(a["dur"].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(events[4]["ts"].get<double>(), 2.0);
}

}  // namespace
}  // namespace mhc
